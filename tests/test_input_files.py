"""Inputs read from files and folders: regular files only, links kept inside an image folder.

Every case that could hang on today's code (a symlink loop, a FIFO) runs in a fresh
process under a timeout, so a regression fails the test instead of stopping the suite.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest

from softlabels.errors import DataError
from softlabels.inputs.files import require_regular, special_kind

Image = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]

_RESOLVE = """
import json, sys
from softlabels.errors import SoftLabelsError
results = []
for kind, spec, tokenizer, seq_len in json.loads(sys.argv[1]):
    try:
        if kind == "data":
            from softlabels.inputs.spec import resolve_data
            ds = resolve_data(spec)
            results.append({"ok": len(ds), "files": getattr(ds, "files", None)})
        else:
            from softlabels.inputs.text import resolve_token_data
            results.append({"ok": len(resolve_token_data(spec, tokenizer=tokenizer, seq_len=seq_len))})
    except SoftLabelsError as err:
        results.append({"error": type(err).__name__, "message": str(err)})
print(json.dumps(results))
"""


def resolve_all(cases: list[tuple], *, isolate: bool = True) -> list[dict]:
    """Resolve data (or token data) specs, ``(kind, spec, tokenizer, seq_len)`` each: in one fresh
    process bounded by a timeout where today's code could hang (``isolate``), else here."""
    args = json.dumps([list(case) + [None] * (4 - len(case)) for case in cases])
    if not isolate:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), mock.patch.object(sys, "argv", ["-c", args]):
            exec(_RESOLVE, {})  # noqa: S102 - the test's own code, run as in the child
        return json.loads(out.getvalue())
    p = subprocess.run([sys.executable, "-c", _RESOLVE, args], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    return json.loads(p.stdout)


def resolve(kind: str, spec: str, tokenizer: str | None = None, seq_len: int | None = None, *,
            isolate: bool = True) -> dict:
    return resolve_all([(kind, spec, tokenizer, seq_len)], isolate=isolate)[0]


def refused(result: dict, *needles: str) -> str:
    assert result.get("error") == "DataError", result
    message = result["message"]
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def png(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """DIR/a/{0,1}.png, DIR/b/{0,1}.png: 4 images."""
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        for i in range(2):
            png(root / c / f"{i}.png", seed=hash((c, i)) % 1000)
    return root


# -- links -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("links", [["a/self"], ["a/self", "a/again"], ["b/deep/up"]])
def test_directory_links_are_refused_not_looped(folder, links):
    """`a/self -> .` gave 336 rows from 16 images; two such links scanned exponentially (a hang)."""
    for link in links:
        (folder / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink("." if link.startswith("a/") else "../..", folder / link)
    message = refused(resolve("data", f"imagefolder:{folder}"), "link to a directory",
                      str(folder / sorted(links)[0]))
    assert "directory links are not followed" in message


def test_a_class_folder_that_is_a_link_is_refused(folder, tmp_path):
    png(tmp_path / "elsewhere" / "c" / "0.png")
    os.symlink(tmp_path / "elsewhere" / "c", folder / "c")
    refused(resolve("data", f"imagefolder:{folder}", isolate=False), "link to a directory", str(folder / "c"))


def test_a_file_link_out_of_the_folder_is_refused(folder, tmp_path):
    outside = png(tmp_path / "secret.png")
    os.symlink(outside, folder / "a" / "2.png")
    refused(resolve("data", f"imagefolder:{folder}", isolate=False), str(folder / "a" / "2.png"), f"links to '{outside}'",
            "outside the folder")
    os.remove(folder / "a" / "2.png")  # a chain of links that ends outside is caught too
    os.symlink(tmp_path / "hop.png", folder / "a" / "2.png")
    os.symlink(outside, tmp_path / "hop.png")
    refused(resolve("data", f"imagefolder:{folder}", isolate=False), "outside the folder")


def test_file_links_inside_the_folder_are_read(folder):
    os.symlink("../a/0.png", folder / "b" / "2.png")
    result = resolve("data", f"imagefolder:{folder}", isolate=False)
    assert result["ok"] == 5 and result["files"][-1] == str(folder / "b" / "2.png")
    from softlabels.inputs.spec import resolve_data

    ds = resolve_data(f"imagefolder:{folder}")
    assert np.array_equal(ds[4][0].numpy(), ds[0][0].numpy())


def test_the_folder_itself_may_be_a_link(folder, tmp_path):
    os.symlink(folder, tmp_path / "alias")
    os.symlink("../a/0.png", folder / "b" / "2.png")  # inside the real folder
    assert resolve("data", f"imagefolder:{tmp_path / 'alias'}", isolate=False)["ok"] == 5


def test_broken_and_looping_file_links_are_refused(folder):
    os.symlink(folder / "a" / "gone.png", folder / "a" / "2.png")
    refused(resolve("data", f"imagefolder:{folder}", isolate=False), f"'{folder / 'a' / '2.png'}' is a broken link")
    os.remove(folder / "a" / "2.png")
    os.symlink("3.png", folder / "a" / "2.png")
    os.symlink("2.png", folder / "a" / "3.png")
    refused(resolve("data", f"imagefolder:{folder}", isolate=False), f"'{folder / 'a' / '2.png'}' is a loop of links")


# -- regular files only ------------------------------------------------------------------------------
def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _socket(path: Path) -> Path:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()  # the socket file stays
    return path


def test_a_fifo_named_like_an_image_is_refused_before_it_is_opened(folder):
    """A FIFO named x.png blocked generate forever."""
    fifo = _fifo(folder / "a" / "x.png")
    refused(resolve("data", f"imagefolder:{folder}"), f"'{fifo}' is a FIFO, not a regular file")


def test_a_socket_or_a_device_in_the_folder_is_refused(folder):
    sock = _socket(folder / "b" / "s.png")
    refused(resolve("data", f"imagefolder:{folder}"), f"'{sock}' is a socket, not a regular file")
    os.remove(sock)
    try:
        os.mknod(folder / "b" / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("cannot make a device node here")
    refused(resolve("data", f"imagefolder:{folder}"), "is a character device, not a regular file")


def test_special_files_without_an_image_suffix_are_never_opened(folder):
    _fifo(folder / "a" / "notes")
    _fifo(folder / "top.png")  # directly in the root: not in a class folder, not read (E1403)
    assert resolve("data", f"imagefolder:{folder}")["ok"] == 4


def test_imagefolder_refusals_through_the_cli(folder):
    _fifo(folder / "a" / "x.png")
    os.symlink(".", folder / "b" / "self")
    p = subprocess.run([sys.executable, "-m", "softlabels", "generate", "--teacher", "mlp", "--random-teacher",
                        "--data", f"imagefolder:{folder}", "--out", str(folder.parent / "s.h5"), "--no-progress"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
    assert "is a FIFO" in p.stderr and not (folder.parent / "s.h5").exists()


def test_data_and_token_files_must_be_regular(tmp_path):
    tok = str(tmp_path / "tok.json")
    from softlabels.inputs.text import train_bpe

    train_bpe("some text to learn", 260).save(tok)
    (tmp_path / "real.txt").write_text("some text")
    fifos = [_fifo(tmp_path / name) for name in ("x.npz", "x.npy", "x.h5", "t.txt", "fifo.json")]
    cases = {  # (kind, spec, tokenizer, seq_len): what the one line names
        **{("data", str(f)): f"'{f}' is a FIFO, not a regular file" for f in fifos[:3]},
        **{("tokens", str(f)): f"'{f}' is a FIFO, not a regular file" for f in fifos[:3]},
        ("data", f"{fifos[2]}:x,y"): f"'{fifos[2]}' is a FIFO",
        ("tokens", f"text:{fifos[3]}", tok, 4): f"'{fifos[3]}' is a FIFO, not a regular file",
        ("tokens", f"text:{tmp_path / 'real.txt'}", str(fifos[4]), 4): f"'{fifos[4]}' is a FIFO",
        ("tokens", f"text:{tmp_path}", tok, 4): f"'{tmp_path}' is a directory, not a regular file",
    }
    for result, needle in zip(resolve_all(list(cases)), cases.values()):
        refused(result, needle)


def test_links_to_regular_files_named_on_the_command_line_are_followed(tmp_path):
    np.savez(tmp_path / "real.npz", x=np.zeros((3, 2), np.float32))
    os.symlink(tmp_path / "real.npz", tmp_path / "link.npz")
    assert resolve("data", str(tmp_path / "link.npz"), isolate=False)["ok"] == 3
    with h5py.File(tmp_path / "t.h5", "w") as f:
        f["tokens"] = np.zeros((2, 3), np.int64)
    os.symlink(tmp_path / "t.h5", tmp_path / "tl.h5")
    assert resolve("tokens", str(tmp_path / "tl.h5"), isolate=False)["ok"] == 2


def test_require_regular_and_special_kind(tmp_path):
    (tmp_path / "f").write_text("x")
    require_regular(tmp_path / "f")
    assert special_kind(os.stat(tmp_path / "f").st_mode) is None
    assert special_kind(os.stat(tmp_path).st_mode) == "a directory"
    with pytest.raises(DataError, match="is a FIFO, not a regular file"):
        require_regular(_fifo(tmp_path / "p"))
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(DataError, match="is a broken link"):
        require_regular(tmp_path / "dangling")
    with pytest.raises(FileNotFoundError):
        require_regular(tmp_path / "missing")

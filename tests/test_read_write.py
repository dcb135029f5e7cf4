"""The read and write paths: checksums, value checks, worker transport and errors, reservation."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader, Dataset, IterableDataset

from softlabels.errors import CorruptStore, DataError
from softlabels.inputs.loader import batch_loader
from softlabels.store.reader import UnitStore
from softlabels.store.schema import StoreMetaV2
from softlabels.store.writer import UnitWriter
from softlabels.student.dataset import SoftLabelDataset, SoftLabelMapDataset
from tests.conftest import make_rows, read_plain, run_cli, write_store

N, C, CHUNK = 40, 5, 8
SUFFIXES = [".h5", ".zarr"]
# docs/FORMAT.md, "Checksum": a sample store's layout arrays, then labels and sample ids
ORDER = ("logits", "topk_values", "topk_indices", "logsumexp", "labels", "sample_ids")


def _crc(arrays: dict[str, np.ndarray], u: int) -> int:
    """The documented unit checksum, computed independently: CRC-32C over the unit's arrays' bytes in order."""
    import google_crc32c

    crc = 0
    for k in ORDER:
        if k in arrays:
            crc = google_crc32c.extend(crc, np.ascontiguousarray(arrays[k][u * CHUNK:(u + 1) * CHUNK]).tobytes())
    return crc


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_new_stores_record_crc32c_and_match_an_independent_crc32c(tmp_path, suffix):
    path = write_store(tmp_path / f"s{suffix}", make_rows(N, C, layout="topk", k=3), num_classes=C, chunk_rows=CHUNK)
    arrays, attrs = read_plain(path)
    assert attrs["checksum"] == "crc32c"
    for u in range(N // CHUNK):
        assert arrays["unit_checksums"][u] == _crc(arrays, u)
    assert UnitStore(path).verify() == []


def test_unknown_checksum_algorithm_is_refused_by_name(tmp_path):
    path = write_store(tmp_path / "s.h5", make_rows(N, C), num_classes=C, chunk_rows=CHUNK)
    with h5py.File(path, "r+") as f:
        f.attrs["checksum"] = "md5"
    with pytest.raises(CorruptStore, match="checksum 'md5' is not one of crc32, crc32c"):
        UnitStore(path)


# -- values checked as units are read ---------------------------------------------------------------
def _set(path: Path, name: str, row: int, value: int) -> None:
    """Damage one value and re-checksum its unit, so only the value check can see it."""
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as f:
            f[name][row] = value
    else:
        zarr.open_array(str(path / name), mode="r+")[row] = value
    arrays, _ = read_plain(path)
    u = row // CHUNK
    if path.suffix == ".h5":
        with h5py.File(path, "r+") as f:
            f["unit_checksums"][u] = _crc(arrays, u)
    else:
        zarr.open_array(str(path / "unit_checksums"), mode="r+")[u] = _crc(arrays, u)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name, value, what", [("labels", 99, "label 99, outside -1..4"),
                                               ("labels", -5, "label -5, outside -1..4"),
                                               ("topk_indices", C + 2, f"holds class id {C + 2} but there are {C}")])
def test_out_of_range_values_name_the_unit(tmp_path, suffix, name, value, what):
    layout = {"layout": "topk", "k": 3} if name == "topk_indices" else {}
    path = write_store(tmp_path / f"s{suffix}", make_rows(N, C, **layout), num_classes=C, chunk_rows=CHUNK)
    _set(path, name, 21, value)  # unit 2, samples 16..24
    needle = f"unit 2 (samples 16..24) of {path} holds "
    store = UnitStore(path)
    with pytest.raises(CorruptStore, match=r"^" + needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        store.read_unit(2)
    with pytest.raises(CorruptStore, match=what.replace(".", r"\.")):
        store.read_unit(2, verify=False)  # checked even without the checksum
    assert store.verify() == [2]  # so generate --repair regenerates it
    for verify in (True, False):
        with pytest.raises(CorruptStore, match="unit 2 "):
            list(SoftLabelDataset([(path, None)], batch_size=4, rank=0, world_size=1, verify=verify))
    with pytest.raises(CorruptStore, match="unit 2 "):
        SoftLabelMapDataset(path)[17]
    with pytest.raises(CorruptStore) as err:  # through workers: the same one-line error
        list(batch_loader(SoftLabelDataset([(path, None)], batch_size=4, rank=0, world_size=1), num_workers=2))
    assert str(err.value).startswith(needle) and "\n" not in str(err.value)


def test_cli_errors_from_workers_are_the_same_one_line(tmp_path):
    """A damaged chunk read by train's DataLoader workers: the line train prints without workers."""
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((N, 6)).astype(np.float32), y=np.arange(N) % C)
    store = tmp_path / "s.h5"
    r = run_cli("generate", "--teacher", "mlp", "--random-teacher", "--data", str(data), "--out", str(store), "--chunk-rows", str(CHUNK),
                "--no-progress")
    assert r.exit_code == 0, r.output
    _set(store, "labels", 21, 99)
    lines = []
    for workers in ("0", "2"):
        r = run_cli("train", "--store", str(store), "--student", "mlp", "--epochs", "1", "--batch-size", "8",
                    "--out", str(tmp_path / f"run{workers}"), "--num-workers", workers)
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        last = r.output.strip().splitlines()[-1]  # after train's progress lines, on stdout
        assert "error: unit 2 (samples 16..24)" in last and "holds label 99" in last, r.output
        lines.append(last[last.index("error: "):])
    assert lines[0] == lines[1]


# -- the worker transport --------------------------------------------------------------------------
class _Uneven(IterableDataset):
    """Worker w yields 3 + 2 w batches of mixed keys and dtypes (bfloat16, bool, int16, empty)."""

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = 0 if info is None else info.id
        for i in range(3 + 2 * w):
            n = 1 + (i % 3)
            yield {"w": torch.full((n,), w), "i": torch.full((n,), i), "bf": torch.randn(n, 3).bfloat16(),
                   "mask": torch.rand(n) > 0.5, "small": torch.arange(n, dtype=torch.int16),
                   "empty": torch.empty(0, 4), "tag": f"{w}-{i}"}


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batch_loader_equals_a_plain_dataloader(workers, monkeypatch):
    import softlabels.inputs.loader as loader

    torch.manual_seed(0)
    plain = list(DataLoader(_Uneven(), batch_size=None, num_workers=workers))
    monkeypatch.setattr(loader, "MESSAGE_BATCHES", 2)  # several messages per worker, the last one short
    torch.manual_seed(0)
    packed = list(batch_loader(_Uneven(), num_workers=workers))
    assert [b["tag"] for b in packed] == [b["tag"] for b in plain]
    for a, b in zip(packed, plain):
        for k in ("w", "i", "bf", "mask", "small", "empty"):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(a["w"], b["w"]) and torch.equal(a["small"], b["small"])


def test_batch_loader_sends_messages_larger_than_a_slot(monkeypatch):
    import softlabels.inputs.loader as loader

    monkeypatch.setattr(loader, "SLOT_BYTES", 64)
    got = list(batch_loader(_Uneven(), num_workers=2))
    assert len(got) == 3 + 5


class _Items(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 4:
            raise KeyError("item 4 is gone\nsecond line")
        return i, torch.full((2,), i)


def test_map_style_items_and_one_line_errors():
    got = list(batch_loader(_Items(), num_workers=2, sampler=[3, 1, 0]))
    assert [(i, t.tolist()) for i, t in got] == [(3, [3, 3]), (1, [1, 1]), (0, [0, 0])]
    with pytest.raises(DataError) as err:
        list(batch_loader(_Items(), num_workers=2))
    assert str(err.value) == ("a DataLoader worker failed: KeyError: 'item 4 is gone\\nsecond line'; fix the dataset, "
                              "or rerun with --num-workers 0 to see where it is raised")


# -- writing -----------------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="needs posix_fallocate")
def test_hdf5_space_is_reserved_at_creation_without_writing_it(tmp_path):
    n, c = 4096, 512
    path = tmp_path / "s.h5"
    w = UnitWriter.create(path, StoreMetaV2(positions="sample", layout="dense", num_samples=n, num_classes=c,
                                            logits_dtype="float16", chunk_samples=512))
    st = os.stat(path)
    assert st.st_blocks * 512 >= n * c * 2  # reserved on disk (a sparse file would have ~nothing)
    w.close()
    with h5py.File(path, "r") as f:  # unwritten rows read as zeros, as with HDF5's own fill
        assert not f["logits"][...].any() and not f["unit_done"][...].any()


def test_generate_input_loader_errors_are_one_line(tmp_path, monkeypatch):
    """generate --num-workers 2 with a dataset that fails only in a worker: one line, no traceback."""
    (tmp_path / "rw_worker_data.py").write_text(
        "import torch\n"
        "from torch.utils.data import Dataset\n"
        "class WorkerOnly(Dataset):\n"
        "    num_classes = 4\n"
        "    def __len__(self): return 40\n"
        "    def __getitem__(self, i):\n"
        "        if torch.utils.data.get_worker_info() is not None:\n"
        "            raise OSError('cannot open image 7')\n"
        "        return torch.zeros(6), i % 4\n"
        "def make(): return WorkerOnly()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = run_cli("generate", "--teacher", "mlp", "--random-teacher", "--data", "rw_worker_data:make", "--out", str(tmp_path / "s.h5"),
                "--num-workers", "2", "--no-progress")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    last = r.output.strip().splitlines()[-1]
    # a factory dataset's own error is wrapped where it is raised (E1105), in a worker as in the main process
    assert last == ("error: dataset 'rw_worker_data:make' failed on item 0 (OSError: cannot open image 7); "
                    "fix the dataset"), r.output

"""Stores on object storage, against a real S3 server (moto's server mode) started here on 127.0.0.1.

Through the real console script: generate -> inspect --verify -> train -> eval, each store
bit-identical to the same job on a local store; two writers on one store; bad URLs; and,
under ``-m extended`` (a minute or more each on 2 busy cores): a writer killed and rerun, a
server that answers 500s and stalls some requests (a proxy in front of moto) with a
transient-error storm past the retry budget, and a two-node ``torchrun --nnodes 2`` job
(loopback rendezvous) writing one store.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from softlabels.errors import StoreLocked
from softlabels.store.location import parse_storage_options, set_storage_options
from softlabels.store.lock import Lease
from tests.test_errors import ROWS
from tests.test_generate import assert_same_store, gen_args, tiny  # noqa: F401 - tiny is a fixture

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

CLI = str(Path(sys.executable).with_name("softlabels"))
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 for the whole session: its endpoint."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(s3, monkeypatch):
    """A new bucket; the environment (for this process and the CLI's) points at the server."""
    import boto3

    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    for k, v in {**KEYS, "AWS_ENDPOINT_URL": s3, "SOFTLABELS_LEASE_TIMEOUT": "2"}.items():
        monkeypatch.setenv(k, v)
    set_storage_options({})
    return name


def cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def download(url: str, to: Path) -> Path:
    """The objects under ``url`` as a local folder (for plain zarr reads), asserting no lease is left."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    fs.invalidate_cache()
    root = url[len("s3://"):]
    assert not fs.exists(f"{root}/_lease") or not fs.ls(f"{root}/_lease"), "a lease object was left behind"
    fs.get(root, str(to), recursive=True)
    return to


def test_cli_round_trip_equals_local(bucket, tiny, tmp_path):
    """generate -> inspect --verify -> train -> eval on S3: the store, the run and the report equal local ones."""
    from tests.conftest import run_cli

    url, local = f"s3://{bucket}/a.zarr", tmp_path / "a.zarr"
    assert ok(cli(*gen_args(tiny, url))).startswith(f"wrote 100 samples to {url}")
    assert run_cli(*map(str, gen_args(tiny, local))).exit_code == 0  # the local side in-process: half the start-ups
    assert_same_store(download(url, tmp_path / "copy.zarr"), local)
    report = json.loads(ok(cli("inspect", url, "--verify", "--json")))
    assert report["status"] == "complete" and report["corrupt_chunks"] == [] and report["path"] == url
    assert "already complete" in run_cli(*map(str, gen_args(tiny, url))).output
    train = ("train", "--student", "mlp", "--epochs", "2", "--batch-size", "16", "--threads", "1", "--no-progress")
    ok(cli(*train, "--store", url, "--out", tmp_path / "run_s3"))
    assert run_cli(*map(str, (*train, "--store", local, "--out", tmp_path / "run_local"))).exit_code == 0
    assert (tmp_path / "run_s3" / "model.pt").read_bytes() == (tmp_path / "run_local" / "model.pt").read_bytes()
    summary = json.loads((tmp_path / "run_s3" / "summary.json").read_text())
    assert url in json.dumps(summary) and "testing" not in json.dumps(summary)  # the URL, never a credential
    args = [("eval", "--checkpoint", tmp_path / run, "--data", tiny["data"], "--store", s, "--json", "--threads", "1")
            for run, s in (("run_s3", url), ("run_local", local))]
    evals = [json.loads(ok(cli(*args[0]))), json.loads(run_cli(*map(str, args[1])).output)]
    numbers = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in evals]
    assert numbers[0] == numbers[1] and "accuracy" in numbers[0]


def test_read_ahead_and_cache_give_the_same_batches(bucket, tiny, tmp_path, monkeypatch):
    """The read-ahead (off, on) and the local cache (cold, warm, capped) change nothing in what a dataset yields."""
    from softlabels.student.dataset import SoftLabelDataset

    from tests.conftest import run_cli

    url = f"s3://{bucket}/r.zarr"
    assert run_cli(*map(str, gen_args(tiny, url, "--shard-chunks", "2"))).exit_code == 0

    def epoch() -> list[np.ndarray]:
        ds = SoftLabelDataset([(url, None)], batch_size=8, seed=3)
        return [b["logits"].numpy().copy() for b in ds]

    monkeypatch.setenv("SOFTLABELS_READ_AHEAD", "0")
    plain = epoch()
    monkeypatch.setenv("SOFTLABELS_READ_AHEAD", "3")
    cache = tmp_path / "cache"
    monkeypatch.setenv("SOFTLABELS_CACHE_DIR", str(cache))
    monkeypatch.setenv("SOFTLABELS_CACHE_MAX_BYTES", "6000")
    for _ in range(2):  # cold, then warm
        assert all(np.array_equal(a, b) for a, b in zip(epoch(), plain, strict=True))
    cached = [p for p in cache.rglob("*") if p.is_file()]
    assert cached and sum(p.stat().st_size for p in cached) <= 6000


@pytest.mark.extended  # ~1-3 minutes on 2 busy cores: `tools/test -m extended`
def test_killed_writer_resumes_bit_identical(bucket, tiny, tmp_path):
    """SIGKILL right after a unit, and at a random moment mid-write: the rerun takes the stale lease over, says
    so, and the store equals an uninterrupted one."""
    local = tmp_path / "ref.zarr"
    ok(cli(*gen_args(tiny, local)))
    url = f"s3://{bucket}/k.zarr"
    killed = cli(*gen_args(tiny, url), env={"SOFTLABELS_TEST_KILL_AFTER_UNITS": "2"})
    assert killed.returncode == -signal.SIGKILL
    time.sleep(2.2)
    resumed = cli(*gen_args(tiny, url))
    assert "took over the lease" in resumed.stderr and "wrote 68 samples" in ok(resumed)  # 5 of 7 units left
    assert_same_store(download(url, tmp_path / "first.zarr"), local)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    url = f"s3://{bucket}/k2.zarr"
    proc = subprocess.Popen([CLI, *map(str, gen_args(tiny, url))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "SOFTLABELS_TEST_DELAY_PER_UNIT": "1"})
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:  # wait for its first flag
        fs.invalidate_cache()
        if len(fs.find(f"{url[5:]}/unit_done")) > 1:
            break
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1.0))  # somewhere in the middle of a unit, or between its objects
    proc.kill()
    proc.wait()
    time.sleep(2.2)  # no heartbeat for the lease timeout: the lease is stale
    resumed = cli(*gen_args(tiny, url))
    assert "took over the lease" in resumed.stderr and "wrote" in ok(resumed)
    assert_same_store(download(url, tmp_path / "copy.zarr"), local)


def test_two_writers_one_store(bucket, tiny):
    """A live lease refuses a second writer; of two jobs racing for one lease generation exactly one wins."""
    url = f"s3://{bucket}/w.zarr"
    holder = Lease(url)
    holder.acquire()
    try:
        time.sleep(1.2)  # past half the timeout: the heartbeat keeps it live
        assert ROWS["E2508"].pattern.search(one_line_error(cli(*gen_args(tiny, url)), url))
    finally:
        holder.release()
    results: list[str] = []

    def race() -> None:
        lease = Lease(url)
        try:
            lease.acquire()
            results.append("won")
            time.sleep(0.5)
            lease.release()
        except Exception as err:  # noqa: BLE001
            results.append(type(err).__name__)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results).count("won") >= 1
    assert set(results) <= {"won", "StoreLocked"}
    lost = Lease(url)
    lost.acquire()
    newer = f"{lost._key(lost.generation + 1)}"
    lost._files.fs.pipe_file(newer, b"{}")  # another job took the lease over
    time.sleep(1.0)
    with pytest.raises(StoreLocked) as err:
        lost.check()
    assert ROWS["E2509"].pattern.search(str(err.value))
    lost.release()


def test_the_lease_of_a_process_that_exited_here_is_taken_over_at_once():
    """A fresh heartbeat from a pid of this machine that no longer exists does not hold the store; the same
    lease from another boot (another machine, as far as pids go) does, until its timeout."""
    url = "memory://lease-exited/s.zarr"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    holder = Lease(url)
    body = {**json.loads(holder._body()), "pid": gone.pid}
    holder._files.fs.pipe_file(holder._key(0), json.dumps(body).encode())
    said: list[str] = []
    taker = Lease(url, say=said.append)
    taker.acquire()
    assert taker.generation == 1 and f"pid {gone.pid}, the process has exited" in said[0], said
    taker.release()
    for edited in ({"boot_id": "another boot"}, {"pid": 2**40}, {"pid": os.getpid(), "renewed_at": str(time.time())}):
        holder._files.fs.pipe_file(holder._key(0), json.dumps({**body, **edited}).encode())
        with pytest.raises(StoreLocked, match="is being written by another job"):
            Lease(url).acquire()
    holder._files.fs.rm(holder._key(0))


class FaultyProxy(http.server.ThreadingHTTPServer):
    """Forwards to the S3 server; ``fail(n)`` decides per request number: "500", "stall" or None."""

    daemon_threads = True

    def __init__(self, upstream: str, fail) -> None:
        host, port = upstream.rsplit("/", 1)[-1].split(":")
        self.upstream, self.fail, self.count, self.faults = (host, int(port)), fail, itertools.count(), 0
        super().__init__(("127.0.0.1", 0), _Forward)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _any(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = self.server.fail(next(self.server.count))
        if fault:
            self.server.faults += 1
        if fault == "stall":
            time.sleep(2.5)  # past the client's read timeout
        if fault == "500":
            data = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
            self.send_response(500)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


QUICK = ("--storage-option", "config_kwargs.read_timeout=1", "--storage-option", "config_kwargs.connect_timeout=1",
         "--storage-option", "config_kwargs.retries.max_attempts=1")


@pytest.mark.extended  # ~1-3 minutes on 2 busy cores: `tools/test -m extended`
def test_faults_are_retried_never_wrong(bucket, tiny, tmp_path):
    """Every 4th request a 500 and every 23rd a stall: generate, inspect --verify and a read still give the
    exact store; an error storm past the retry budget is one line, and a rerun resumes."""
    local = tmp_path / "ref.zarr"
    ok(cli(*gen_args(tiny, local)))
    proxy = FaultyProxy(os.environ["AWS_ENDPOINT_URL"], lambda n: "stall" if n % 23 == 5 else
                        ("500" if n % 4 == 3 else None))
    env = {"AWS_ENDPOINT_URL": proxy.url}
    url = f"s3://{bucket}/f.zarr"
    ok(cli(*gen_args(tiny, url), *QUICK, env=env, timeout=240))
    report = json.loads(ok(cli("inspect", url, "--verify", "--json", *QUICK, env=env, timeout=240)))
    assert report["corrupt_chunks"] == [] and report["status"] == "complete"
    assert proxy.faults > 10
    assert_same_store(download(url, tmp_path / "copy.zarr"), local)

    storm = FaultyProxy(os.environ["AWS_ENDPOINT_URL"], lambda n: "500" if n >= 30 else None)
    url2 = f"s3://{bucket}/g.zarr"
    line = one_line_error(cli(*gen_args(tiny, url2), *QUICK, env={"AWS_ENDPOINT_URL": storm.url,
                                                                  "SOFTLABELS_STORAGE_RETRIES": "2"}), url2)
    assert ROWS["E2510"].pattern.search(line) and "testing" not in line
    time.sleep(2.2)  # the dead job's lease goes stale
    ok(cli(*gen_args(tiny, url2)))
    assert_same_store(download(url2, tmp_path / "copy2.zarr"), local)


def test_bad_urls_one_line(bucket, tiny, tmp_path, monkeypatch):
    """Each object-storage refusal is one line matching its docs/ERRORS.md row (in-process: no startup cost)."""
    import s3fs

    from tests.conftest import run_cli

    def refused(cid: str, *args: str) -> None:
        result = run_cli(*map(str, args))
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert ROWS[cid].pattern.search(lines[0]), (cid, lines[0])
        assert "testing" not in lines[0]  # never a credential
        set_storage_options({})

    url, endpoint = f"s3://{bucket}/x.zarr", os.environ["AWS_ENDPOINT_URL"]
    refused("E2501", *gen_args(tiny, "s3://no-such-bucket-here/x.zarr"))
    refused("E2501", "inspect", "s3://no-such-bucket-here/x.zarr")
    refused("E2505", *gen_args(tiny, f"s3://{bucket}/x.h5"))
    refused("E2503", *gen_args(tiny, f"gs://{bucket}/x.zarr"))
    refused("E2504", "inspect", f"nosuchfs://{bucket}/x.zarr")
    refused("E2507", "inspect", url)
    refused("E2511", "inspect", url, "--storage-option", "novalue")
    s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).pipe_file(f"{bucket}/other.zarr/notes.txt", b"x")
    for extra in ((), ("--overwrite",)):
        refused("E2506", *gen_args(tiny, f"s3://{bucket}/other.zarr"), *extra)
    assert s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).cat(f"{bucket}/other.zarr/notes.txt") == b"x"

    async def denied(self, path, **kw):
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(s3fs.S3FileSystem, "_ls", denied)
    s3fs.S3FileSystem.clear_instance_cache()  # instances bind their sync methods when made
    refused("E2502", "inspect", url)
    monkeypatch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                 "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    refused("E2512", "inspect", url)
    monkeypatch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    assert parse_storage_options(["a.b=1", "c=true", "d=x"]) == {"a": {"b": 1}, "c": True, "d": "x"}


@pytest.mark.extended  # ~1-3 minutes on 2 busy cores: `tools/test -m extended`
def test_two_nodes_write_one_store(bucket, tiny, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 1 (static rendezvous on 127.0.0.1): one store, equal to one process."""
    local = tmp_path / "ref.zarr"
    ok(cli(*gen_args(tiny, local, "--shard-chunks", "2")))
    url = f"s3://{bucket}/n.zarr"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = _free_port()
    procs = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), CLI,
                               *map(str, gen_args(tiny, url, "--shard-chunks", "2"))],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0].startswith("wrote 100 samples") and outs[1][0] == ""
    copy = download(url, tmp_path / "copy.zarr")
    assert_same_store(copy, local)
    assert json.loads((copy / "zarr.json").read_text())["attributes"]["created_by"]["timings"]["ranks"] == 2


def test_memory_and_file_urls(tiny, tmp_path):
    """memory:// (fsspec's in-process filesystem, with its conditional create) and file:// (a local path) hold the
    same store as a plain local path."""
    from softlabels.store.reader import open_store
    from tests.conftest import run_cli

    local = tmp_path / "a.zarr"
    for out in (local, "memory://softlabels-test/a.zarr", f"file://{tmp_path}/b.zarr"):
        assert run_cli(*map(str, gen_args(tiny, out))).exit_code == 0
    with open_store(local) as a, open_store("memory://softlabels-test/a.zarr") as m, \
            open_store(f"file://{tmp_path}/b.zarr") as f:
        assert isinstance(f.path, Path) and m.path == "memory://softlabels-test/a.zarr"
        for u in range(a.num_units):
            want = a.read_unit(u)
            for other in (m, f):
                got = other.read_unit(u)
                assert all(np.array_equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("raw", ["٣", "²", "-1", "1e3", " 7", ""])
def test_environment_integers_are_ascii_digits_or_the_default(monkeypatch, raw):
    from softlabels.store.format import env_int

    monkeypatch.setenv("SOFTLABELS_TEST_INT", raw)
    assert env_int("SOFTLABELS_TEST_INT", 5) == 5  # Unicode digits once gave 3, or a traceback for '²'


@pytest.mark.parametrize("raw", ["inf", "nan", "1e300", "-5", "soon"])
def test_a_lease_timeout_that_no_heartbeat_can_hold_is_the_default(monkeypatch, raw):
    from softlabels.store.lock import lease_timeout

    monkeypatch.setenv("SOFTLABELS_LEASE_TIMEOUT", raw)
    assert lease_timeout() == 60.0  # inf once killed the heartbeat thread with OverflowError

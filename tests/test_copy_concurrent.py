"""`logitstore copy` with many keys in flight: the same guarantees as one at a time, and no hang when
anything fails (a corrupt chunk in a worker, an exception in the caller's callback, Ctrl-C)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import logitstore
from logitstore.errors import IntegrityError, StoreStateError
from logitstore.tools.transfer import copy_store

from conftest import REPO, TESTS, assert_one_line_error, ctrl_c_at_call, flip_byte, interruptible, invoke, run_cli

JOBS = 8


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus, teacher_ckpt) -> Path:
    """120 images in chunks of 4 rows: about 160 keys, so many are in flight at once."""
    out = tmp_path_factory.mktemp("conc") / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, chunk_rows=4, views=2, seed=1)
    return out


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_progress_counts_every_byte_once(tmp_path, store):
    totals, arrived = [], []
    rep = copy_store(str(store), str(tmp_path / "c.zarr"), on_start=totals.append, on_key=arrived.append, jobs=JOBS)
    source_bytes = sum(len(b) for b in files(store).values())
    assert totals == [source_bytes] == [rep.bytes_total] and sum(arrived) == source_bytes == rep.bytes_copied
    assert len(arrived) == rep.keys == rep.copied == len(files(store)) > 100
    assert files(tmp_path / "c.zarr") == files(store)


def test_an_interrupted_concurrent_copy_redoes_at_most_the_keys_in_flight(tmp_path, store):
    dst = tmp_path / "dst.zarr"
    stop_after_five = ctrl_c_at_call(5)
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        copy_store(str(store), str(dst), on_key=stop_after_five, jobs=JOBS)
    assert time.monotonic() - t < 30
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(dst)
    rep = copy_store(str(store), str(dst), jobs=JOBS)
    # The five reported keys arrived; at most the rest of the window (JOBS - 1 more, started before the
    # stop was seen) arrived besides; every other key is copied by the re-run.
    assert 5 <= rep.skipped <= 5 + JOBS - 1 and rep.skipped + rep.copied == rep.keys
    assert files(dst) == files(store)


def test_a_corrupt_chunk_among_many_in_flight_stops_the_copy_in_one_line(tmp_path, store):
    import shutil

    bad = Path(shutil.copytree(store, tmp_path / "bad.zarr"))
    flip_byte(bad / "logits" / "c" / "17" / "0" / "0", 3, 0x40)
    with pytest.raises(IntegrityError, match="logits/c/17/0/0"):
        copy_store(str(bad), str(tmp_path / "lib.zarr"), jobs=64)
    dst = tmp_path / "cli.zarr"
    r = run_cli("logitstore", "copy", str(bad), str(dst), "--jobs", "64", check=False, timeout=120)
    assert_one_line_error(r, "logits/c/17/0/0", "CRC32C")
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(dst)


def test_jobs_must_be_positive():
    assert_one_line_error(invoke("logitstore", "copy", "a.zarr", "b.zarr", "--jobs", "0"), "--jobs")


def test_ctrl_c_stops_a_concurrent_copy_from_s3_promptly_and_the_same_command_finishes(tmp_path, store, s3):
    from benchmarks.copy_throughput import LatencyProxy

    url = "s3://caches/conc/s.zarr"
    copy_store(str(store), url, jobs=JOBS)
    proxy = LatencyProxy(int(s3.rsplit(":", 1)[1]), delay=0.03)  # ~160 keys at 30 ms, 2 at once: seconds
    dst = tmp_path / "down.zarr"
    cmd = ["logitstore", "copy", url, str(dst), "--jobs", "2", "--storage-option", f"endpoint_url={proxy.url}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    try:
        proc = subprocess.Popen([sys.executable, "-m", *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, preexec_fn=interruptible)
        deadline = time.monotonic() + 120
        while not (dst / "logits").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 10
    finally:
        proxy.close()
    assert_one_line_error(subprocess.CompletedProcess(cmd, proc.returncode, out, err), "interrupted",
                          "run the same command again", code=130)
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(dst)
    again = run_cli("logitstore", "copy", url, str(dst), "--json")
    assert '"skipped": 0' not in again.stdout
    assert files(dst) == files(store)

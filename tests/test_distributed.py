"""A dump spread over torchrun processes (gloo on CPU) writes the same store as one process does."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import zarr

import logitstore
from logitstore import schema
from logitstore.errors import StoreStateError

from conftest import REPO, TESTS, ctrl_c_at_call, run_cli, save_teacher


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", "logitstore", "dump", *args]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra,
            "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}


def _child_with_rank(parent: int, rank: int, tag: str) -> int | None:
    """The torchrun worker (a direct child of `parent`) with RANK=rank, found through /proc."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"DUMP_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def kill_rank_one(cmd: list[str], out: Path, rows: int, before_kill: Callable[[], None] = lambda: None
                  ) -> subprocess.Popen:
    """Run a 2-process torchrun dump `cmd` into `out` and SIGKILL rank 1 once its segment holds `rows` rows
    (mid-segment; torchrun then stops rank 0); `before_kill` looks at the store first. The ended process."""
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, env=_env(DUMP_TAG=tag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _segment_rows(out, 1) < rows:
            time.sleep(0.02)
        assert proc.poll() is None, f"the dump ended before a rank could be killed:\n{proc.stdout.read()}"
        before_kill()
        victim = _child_with_rank(proc.pid, 1, tag)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc


def _segment_rows(out: Path, k: int) -> int:
    try:
        group = zarr.open_group(str(out / schema.SEGMENTS / f"{k:06d}"), mode="r")
        return int((group.attrs.get(schema.ATTR_PROGRESS) or {}).get("rows", 0))
    except Exception:
        return 0


def _same_store(ref: str, out: str, **kw) -> None:
    a, b = logitstore.open_store(ref), logitstore.open_store(out, **kw)
    ra, rb = a[:], b[:]
    assert list(ra.ids) == list(rb.ids) and len(a) == 120
    for name in ("digests", "image_hw", "view_params"):
        assert np.array_equal(getattr(ra, name), getattr(rb, name)), name
    assert ra.logits.tobytes() == rb.logits.tobytes()
    assert a.failures() == b.failures() and len(a.failures()) == 1
    assert a.meta.fingerprints == b.meta.fingerprints


@pytest.fixture
def images(tmp_path, corpus) -> Path:
    """The 120-digit corpus plus one broken file, so segments hold different numbers of rows."""
    root = tmp_path / "imgs"
    shutil.copytree(corpus, root)
    (root / "part1" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


def test_torchrun_dump_with_a_killed_rank_resumes_to_the_single_process_store(tmp_path, images):
    ckpt = save_teacher(tmp_path / "slow.pt", arch="nets:slow_cnn", seconds=0.2)
    args = ["--teacher", str(ckpt), "--images", str(images), "--views", "2", "--batch-size", "8",
            "--chunk-rows", "16", "--num-workers", "0", "--quiet"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    run_cli("logitstore", "dump", *args, "--out", str(ref))

    # 121 listed files in segments of 32 positions: rank 0 dumps segments 0 and 2, rank 1 segments 1 and 3.
    cmd = _torchrun(2, *args, "--out", str(out), "--segment-rows", "32")
    proc = kill_rank_one(cmd, out, 16)
    assert proc.returncode != 0
    kept = _segment_rows(out, 1)
    assert 16 <= kept < 32 and kept % 16 == 0  # whole committed chunks of the killed rank's segment survive
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(out)

    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    resumed = int(next(ln for ln in r.stdout.splitlines() if "resumed from row" in ln).split("│")[2].strip()
                  .replace(",", ""))
    assert resumed >= kept  # only what was missing was dumped again
    _same_store(str(ref), str(out))
    assert not (out / schema.SEGMENTS).exists()
    assert "OK" in run_cli("logitstore", "verify", str(out)).stdout


def test_torchrun_dump_to_s3_matches_a_local_single_process_dump(tmp_path, images, teacher_ckpt, s3):
    args = ["--teacher", str(teacher_ckpt), "--images", str(images), "--views", "2", "--batch-size", "8",
            "--chunk-rows", "16", "--num-workers", "0", "--quiet"]
    ref = tmp_path / "ref.zarr"
    run_cli("logitstore", "dump", *args, "--out", str(ref))
    url = f"s3://caches/dist-{uuid.uuid4().hex[:8]}.zarr"
    r = subprocess.run(_torchrun(2, *args, "--out", url, "--segment-rows", "24"), env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    _same_store(str(ref), url)


def test_a_distributed_dump_is_finished_by_one_process_and_refuses_a_mismatched_restart(tmp_path, images,
                                                                                        teacher_ckpt):
    from logitstore.device import Torchrun
    from logitstore.teacher.distributed import dump_distributed
    from logitstore.errors import DumpInterrupted, ResumeMismatchError
    from logitstore.teacher.job import DumpConfig, prepare_dump

    out = str(tmp_path / "out.zarr")
    kw = dict(views=2, batch_size=8, chunk_rows=16, num_workers=0)
    job = prepare_dump(DumpConfig(str(teacher_ckpt), str(images), out, **kw))
    interrupt_in_the_second_segment = ctrl_c_at_call(3)
    with pytest.raises(DumpInterrupted):
        dump_distributed(job, out, Torchrun(), segment_rows=16, on_batch=interrupt_in_the_second_segment)
    with pytest.raises(ResumeMismatchError, match="segment-rows 16"):
        logitstore.dump(str(teacher_ckpt), str(images), out, segment_rows=32, **kw)
    # Without torchrun, the same dump call finishes every segment in this one process.
    s = logitstore.dump(str(teacher_ckpt), str(images), out, **kw)
    assert s.n_images == 120 and s.n_failed == 1
    ref = tmp_path / "ref.zarr"
    logitstore.dump(str(teacher_ckpt), str(images), str(ref), **kw)
    _same_store(str(ref), out)

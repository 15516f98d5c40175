"""SIGKILL at random moments of dump, copy, pack and fit: the same command then finishes the job, and
the result has the same bytes (stores) or the same weights (students) as an uninterrupted run."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import logitstore

from conftest import REPO, TESTS, run_cli, save_teacher

SEED = 7
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}


def files(root: Path) -> dict[str, bytes]:
    """A store's bytes, file by file: the root zarr.json compared by meaning (its `created` differs)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def kill_after(args: list[str], seconds: float) -> int:
    """Start `python -m <args>`, SIGKILL it after `seconds` (if still running); its exit status."""
    proc = subprocess.Popen([sys.executable, "-m", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


@pytest.fixture(scope="module")
def slow_teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("kill") / "slow.pt", arch="nets:slow_cnn", seconds=0.05)


def test_killed_dumps_copies_and_packs_finish_with_the_same_bytes(tmp_path, corpus, slow_teacher):
    rng = random.Random(SEED)
    args = ["--teacher", str(slow_teacher), "--images", str(corpus), "--batch-size", "8", "--chunk-rows", "16",
            "--num-workers", "0", "--quiet", "--views", "2"]
    ref = tmp_path / "ref.zarr"
    run_cli("logitstore", "dump", *args, "--out", str(ref))
    ref_files = files(ref)
    for i in range(3):
        out = tmp_path / f"d{i}.zarr"
        kill_after(["logitstore", "dump", *args, "--out", str(out)], rng.uniform(3.0, 7.0))
        run_cli("logitstore", "dump", *args, "--out", str(out))
        assert files(out) == ref_files, f"dump killed at try {i}"
        assert logitstore.open_store(out).meta.fingerprints == logitstore.open_store(ref).meta.fingerprints
    for i in range(2):
        dst, zipped = tmp_path / f"c{i}.zarr", tmp_path / f"p{i}.zarr.zip"
        kill_after(["logitstore", "copy", str(ref), str(dst)], rng.uniform(2.0, 3.5))
        run_cli("logitstore", "copy", str(ref), str(dst))
        assert files(dst) == ref_files
        kill_after(["logitstore", "pack", str(ref), str(zipped)], rng.uniform(2.0, 3.5))
        run_cli("logitstore", "pack", str(ref), str(zipped))
        assert logitstore.open_store(zipped).meta.fingerprints == logitstore.open_store(ref).meta.fingerprints


def test_a_killed_fit_resumes_to_the_same_student(tmp_path, world):
    args = ["--store", str(world.store), "--epochs", "3", "--num-workers", "0", "--cache-images", "0", "--quiet",
            "--batch-size", "64", "--seed", "3"]
    ref = tmp_path / "ref"
    run_cli("trainer", "fit", *args, "--out", str(ref))
    out = tmp_path / "run"
    kill_after(["trainer", "fit", *args, "--out", str(out)], random.Random(SEED).uniform(5.0, 9.0))
    again = args + (["--resume"] if (out / "checkpoint.pt").exists() else ["--overwrite"] if out.exists() else [])
    run_cli("trainer", "fit", *again, "--out", str(out))
    a = torch.load(ref / "checkpoint.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

"""Two processes (torchrun, gloo on CPU) train one student, each reading its own share of the rows."""
from __future__ import annotations

import pytest

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.order import epoch_share
from trainer.storeset import open_stores

from conftest import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster


def test_torchrun_two_cpu_processes_train_with_ddp(world: World, tmp_path: Path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer",
           "fit", "--store", str(world.store), "--student", "lenet", "--out", str(out), "--epochs", "2",
           "--batch-size", "32", "--warmup-epochs", "0.2", "--num-workers", "0", "--device", "cpu",
           "--eval", str(world.labeled), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    history = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    n_train = open_stores([world.store]).n_train
    assert all(h["samples"] == 2 * (n_train // 2) for h in history)  # each rank's half, summed
    assert history[-1]["eval_top1"] > 0.4
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not any(k.startswith("module.") for k in ckpt["state_dict"])


def test_each_rank_reads_a_disjoint_share_of_the_store(world: World):
    data = open_stores([world.store], min_block_rows=64)  # one block per chunk
    for epoch in range(2):
        shares = [epoch_share(data.train_blocks, seed=0, epoch=epoch, rank=r, world=2) for r in range(2)]
        rows = [{(s.store, i) for s in share for i in range(s.start, s.stop)} for share in shares]
        assert len(rows[0]) == len(rows[1]) == data.n_train // 2 and not rows[0] & rows[1]
        # Whole chunks, not scattered rows: at most one chunk is split between the two ranks.
        chunks = [{(s.store, s.start // 64) for s in share} for share in shares]
        assert len(chunks[0] & chunks[1]) <= 1


def test_ddp_with_skipped_images_never_leaves_a_rank_waiting(world: World, tmp_path: Path):
    """A batch whose every image is skipped on one rank only: every rank skips that step together."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(world.corpus, corpus)
    changed = set()
    for i, path in enumerate(sorted(corpus.rglob("*.png"))):
        if i % 5 < 2:  # 40% of the images differ from what the teacher saw
            img = np.asarray(Image.open(path)).copy()
            img[0, 0] ^= 0xFF
            Image.fromarray(img).save(path)
            changed.add(path.relative_to(corpus).as_posix())
    data = open_stores([world.store], images=[corpus])
    steps = [[set(r.ids) <= changed for r in data.requests(0, 2, seed=0, rank=k, world=2)] for k in range(2)]
    assert any(a != b for a, b in zip(*steps))  # the case that used to hang: one rank empty, one not
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "trainer",
           "fit", "--store", str(world.store), "--images", str(corpus), "--student", "lenet", "--out", str(out),
           "--epochs", "1", "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--skip-mismatched",
           "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped"] > 0 and 0 < record["samples"] < 2 * (data.n_train // 2)

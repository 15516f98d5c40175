"""What made trainer fit's steady epochs slower than the same student on tensors in RAM (issue 16), removed
without changing a result: the C heap keeps a step's memory (no page faults every step), the next epoch's
requests are read while this one ends, and the benchmark's ratios are bracketed by ceiling runs."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from benchmarks.fit_throughput import bracketed, spread
from trainer.fit import EpochRequests
from trainer.storeset import open_stores

from conftest import World

# A step's pattern in miniature: ten 2 MiB tensors alive at once, then all freed, ten times, in a process whose heap
# thresholds ended where glibc's own rule leaves them after the largest block freed so far was 2 MiB (mapped above
# 2 MiB, trimmed above 4 MiB; what a process reaches or not depending on what it freed before, so set here). Each
# round's 20 MiB then come from the heap top and go back to the system when freed: ~5,000 faults a round.
FAULTS = """
import ctypes, resource, sys, torch
from logitstore.allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.mallopt(-3, 2 << 20), libc.mallopt(-1, 4 << 20)  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
applied = keep_freed_memory() if sys.argv[1] == "fixed" else None
for _ in range(2):
    [torch.empty(1 << 19).fill_(1.0) for _ in range(10)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    [torch.empty(1 << 19).fill_(1.0) for _ in range(10)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, applied)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_fixed_heap_thresholds_stop_the_per_step_page_faults():
    def faults(mode: str) -> tuple[int, str]:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": ":".join(sys.path), "OMP_NUM_THREADS": "1"})
        n, applied = out.stdout.split()
        return int(n), applied

    low, _ = faults("low")
    fixed, applied = faults("fixed")
    assert applied == "True"
    assert low > 10 * 4000              # every round faults its 20 MiB back in
    assert fixed < 2000                 # the heap keeps them: ~0 after the first rounds


def test_epoch_requests_are_each_epochs_requests_and_read_ahead_into_the_next(world: World):
    data = open_stores([world.store], min_block_rows=64)
    started: list[int] = []

    def make(epoch: int):
        started.append(epoch)
        return data.requests(epoch, 50, seed=3)

    stream = EpochRequests(make, range(1, 4), run=8)
    try:
        for epoch in (1, 2, 3):
            got = [r.keys.copy() for r in stream.epoch()]
            want = [r.keys for r in data.requests(epoch, 50, seed=3)]
            assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
            if epoch < 3:  # the next epoch is under way before it is asked for
                deadline = time.monotonic() + 5
                while epoch + 1 not in started and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert epoch + 1 in started
        assert list(stream.epoch()) == [] and started == [1, 2, 3]  # nothing past the range
    finally:
        stream.close()


def test_closing_the_epoch_requests_early_releases_the_thread(world: World):
    data = open_stores([world.store], min_block_rows=64)
    before = threading.active_count()
    stream = EpochRequests(lambda e: data.requests(e, 50, seed=3), range(0, 100), run=8)
    first = stream.epoch()
    next(first)  # the thread runs
    stream.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_benchmark_ratios_are_to_the_ceiling_runs_on_either_side():
    # A ceiling drifting from 100 to 80 (a machine getting busier): the arm at 81 between 90 and 80 is at 0.95.
    assert bracketed([90.0, 81.0], [100.0, 90.0, 80.0]) == pytest.approx([90 / 95, 81 / 85])
    with pytest.raises(AssertionError):
        bracketed([1.0, 2.0], [1.0, 2.0])  # every arm run needs a ceiling run after it
    s = spread([0.91, 0.95, 0.93, 0.97, 0.89], aim=0.9)
    assert s["median"] == pytest.approx(0.93) and (s["min"], s["max"]) == (0.89, 0.97)
    assert (s["q1"], s["q3"]) == pytest.approx((0.91, 0.95))
    assert s["reach"] == 4 and s["n"] == 5
    assert 0.89 <= s["ci"][0] <= s["median"] <= s["ci"][1] <= 0.97
    assert spread([0.91, 0.95, 0.93, 0.97, 0.89])["ci"] == s["ci"]  # a fixed seed: the same runs, the same interval

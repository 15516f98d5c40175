"""Where a steady step of `trainer fit` goes (issue 16): py-spy samples of epochs 2.. of a default-flag run
(--optimizer adamw), split into the student's step (what the in-RAM ceiling of fit_throughput --defaults
also pays) and the loop's own parts (data, clipping, meter, normalisation, scheduler).

    python -m benchmarks.fit_profile [--store S] [--epochs 5] [--threads 1] [--tree DIR]

py-spy (the `profile` extra) attaches once the first epoch is in metrics.jsonl (the decode cache is then
warm) and samples every thread of the process and of its DataLoader workers (`--threads --subprocesses`) until
it ends. The training thread's samples under `train_one_epoch` are split by part; the other threads and processes
are counted by name (the read-ahead, zarr's event loop and pool, the block readers, the workers): the CPU they
take beside the student, on a 2-core machine the core it does not use. Shares of samples hold up better than
wall time on a machine other jobs share; ms per step converts them at the profiled epochs' own seconds per
step (the training thread is busy for the whole epoch). Minor page faults of the process per step (from
/proc) show whether the C heap maps and unmaps the step's tensors every step (logitstore/allocator.py).
`--tree` profiles another checkout of the code (PYTHONPATH and working directory), for before/after.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The first frame under train_one_epoch (or under train_step) names the part; the rest is the student step.
PARTS = {
    "data (batches, read-ahead hand-off)": ("log_every", "Batches.__call__"),
    "gradient clipping": ("clip_grad_norm", "_no_grad_wrapper"),
    "epoch meter": ("EpochMeter.add", "EpochMeter.diverged", "EpochMeter.live"),
    "normalisation (to_input)": ("InputSpec.to_input",),
    "LR scheduler": ("LRScheduler.step",),
    "targets to device": ("targets_to",),
}
STEP = "student step (forward, loss, backward, AdamW, zero_grad)"
# Threads and processes beside the training thread, by name (thread names lose their pool index).
THREADS = {
    "logitstore-read-ahead": "read-ahead thread (cuts the epoch's groups into requests)",
    "trainer-read": "block readers (trainer-read pool: zarr reads of a group's blocks)",
    "zarr_io": "zarr's event loop and its pool (chunk decoding)",
    "asyncio": "zarr's event loop and its pool (chunk decoding)",
    "QueueFeederThread": "DataLoader queue feeder (main process)",
}
WORKERS = "DataLoader worker process(es)"
OTHER_MAIN = "training thread outside train_one_epoch (held-out pass, checkpoint)"


def _name(frame: str) -> str:
    """'thread (123): asyncio_0' -> 'asyncio' (py-spy --threads names a thread by its id and name)."""
    name = frame.split(": ", 1)[1] if ": " in frame else frame
    return name.rstrip("0123456789").rstrip("_") or name


def classify(raw: Path) -> tuple[int, collections.Counter, collections.Counter]:
    """py-spy's raw (collapsed) output -> (samples under train_one_epoch, those by part, every other sample by
    thread or process)."""
    total, parts, beside = 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.split(" (")[0] if not f.startswith(("thread ", "process ")) else f for f in stack.split(";")]
        if len(frames) > 1 and frames[0].startswith("process ") and frames[1].startswith("process "):
            beside[WORKERS] += int(n)  # a child process of the fit: the DataLoader's workers
            continue
        thread = next((_name(f) for f in frames if f.startswith("thread ")), "MainThread")
        if thread != "MainThread":
            beside[THREADS.get(thread, f"other thread ({thread})")] += int(n)
            continue
        if "train_one_epoch" not in frames:
            beside[OTHER_MAIN] += int(n)
            continue
        total += int(n)
        below = frames[frames.index("train_one_epoch") + 1:]
        for name, prefixes in PARTS.items():
            if any(f.endswith(p) for f in below[:2] for p in prefixes):
                parts[name] += int(n)
                break
        else:
            parts[STEP if below[:1] == ["train_step"] else "the loop itself"] += int(n)
    return total, parts, beside


def minor_faults(pid: int) -> int | None:
    """The process's minor page faults so far (/proc/PID/stat field 10), None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("/tmp/logitstore-fit-bench/store.zarr"),
                    help="A store (fit_throughput --defaults makes one in its --workdir).")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second.")
    ap.add_argument("--tree", type=Path, default=None, help="Profile this checkout of the code instead.")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C/C++ frames too; costs more samples).")
    ap.add_argument("--batch-size", type=int, default=128, help="trainer fit's default batch (steps per epoch).")
    args = ap.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy not found: pip install -e '.[profile]'")
    tree = str(args.tree or Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out, raw = Path(tmp) / "run", Path(tmp) / "samples.txt"
        proc = subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--store", str(args.store), "--out", str(out),
                                 "--optimizer", "adamw", "--epochs", str(args.epochs), "--overwrite", "--json"],
                                cwd=tree, env=env, stdout=subprocess.PIPE, text=True)
        metrics = out / "metrics.jsonl"
        while proc.poll() is None and not (metrics.is_file() and metrics.stat().st_size):
            time.sleep(0.1)
        spy_cmd = [spy, "record", "--pid", str(proc.pid), "--rate", str(args.rate), "--nonblocking", "--threads",
                   "--subprocesses", "--format", "raw", "-o", str(raw)] + (["--native"] if args.native else [])
        faults = [minor_faults(proc.pid)]
        spy_proc = subprocess.Popen(spy_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:  # the last count read before the process ends
            now = minor_faults(proc.pid)
            if now is not None:
                faults.append(now)
            time.sleep(0.05)
        spy_proc.wait()
        result = json.loads(proc.communicate()[0])
        total, parts, beside = classify(raw)
    history = result["history"]
    rates = [h["samples_per_s"] for h in history]
    steps = sum(math.ceil(h["samples"] / args.batch_size) for h in history[1:])
    seconds = sum(h["seconds"] for h in history[1:])
    ms_per_sample = 1e3 * seconds / max(1, total)  # the training thread is busy through every profiled epoch
    per_step = lambda n: n * ms_per_sample / max(1, steps)  # noqa: E731
    print(f"trainer fit (default flags, adamw), {args.store}: epochs at {', '.join(f'{r:,.0f}' for r in rates)} "
          f"samples/s (profiled: 2..{len(rates)}, {steps} steps, {1e3 * seconds / max(1, steps):.2f} ms a step); "
          f"{total} samples in train_one_epoch; workers: {result['info'].get('workers')}")
    print(f"{'part of a steady step (training thread)':72s} {'share':>7s} {'ms/step':>8s}")
    for name, n in parts.most_common():
        print(f"{name:72s} {100 * n / max(1, total):6.2f}% {per_step(n):8.3f}")
    rest = total - parts[STEP]
    print(f"{'not the student step (what the ceiling does not pay)':72s} {100 * rest / max(1, total):6.2f}% "
          f"{per_step(rest):8.3f}")
    print(f"{'beside the training thread (CPU taken, all samples after epoch 1)':72s} {'x step':>7s} {'ms/step':>8s}")
    for name, n in beside.most_common():
        print(f"{name:72s} {100 * n / max(1, total):6.2f}% {per_step(n):8.3f}")
    seen = [f for f in faults if f is not None]
    if len(seen) > 1:
        print(f"minor page faults of the fit process after epoch 1: {seen[-1] - seen[0]:,} "
              f"({(seen[-1] - seen[0]) / max(1, steps):,.1f} a step)")


if __name__ == "__main__":
    main()

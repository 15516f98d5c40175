"""Where a steady step of `trainer fit` goes (issue 16): py-spy samples of epochs 2.. of a default-flag run
(--optimizer adamw), split into the student's step (what the in-RAM ceiling of fit_throughput --defaults
also pays) and the loop's own parts (data, clipping, meter, normalisation, scheduler).

    python -m benchmarks.fit_profile [--store S] [--epochs 5] [--threads 1] [--tree DIR]

py-spy (the `profile` extra) attaches once the first epoch is in metrics.jsonl (the decode cache is then
warm) and samples the training thread until the process ends; only samples under `train_one_epoch` count.
Shares of samples, not seconds: they hold up better than wall time on a machine other jobs share.
`--tree` profiles another checkout of the code (PYTHONPATH and working directory), for before/after.
"""
from __future__ import annotations

import argparse
import collections
import json
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


def classify(raw: Path) -> tuple[int, collections.Counter]:
    """Samples under train_one_epoch in py-spy's raw (collapsed) output, by part."""
    total, parts = 0, collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if "train_one_epoch" not in frames:
            continue
        total += int(n)
        below = frames[frames.index("train_one_epoch") + 1:]
        for name, prefixes in PARTS.items():
            if any(f.endswith(p) for f in below[:2] for p in prefixes):
                parts[name] += int(n)
                break
        else:
            parts[STEP if below[:1] == ["train_step"] else "the loop itself"] += int(n)
    return total, parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=Path("/tmp/logitstore-fit-bench/store.zarr"),
                    help="A store (fit_throughput --defaults makes one in its --workdir).")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rate", type=int, default=100, help="py-spy samples per second.")
    ap.add_argument("--tree", type=Path, default=None, help="Profile this checkout of the code instead.")
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
        subprocess.run([spy, "record", "--pid", str(proc.pid), "--rate", str(args.rate), "--nonblocking",
                        "--format", "raw", "-o", str(raw)], capture_output=True)
        result = json.loads(proc.communicate()[0])
        total, parts = classify(raw)
    rates = [h["samples_per_s"] for h in result["history"]]
    print(f"trainer fit (default flags, adamw), {args.store}: epochs at {', '.join(f'{r:,.0f}' for r in rates)} "
          f"samples/s (profiled: 2..{len(rates)}); {total} samples in train_one_epoch")
    print(f"{'part of a steady step':60s} {'share':>7s}")
    for name, n in parts.most_common():
        print(f"{name:60s} {100 * n / max(1, total):6.2f}%")
    print(f"{'not the student step (what the ceiling does not pay)':60s} "
          f"{100 * (total - parts[STEP]) / max(1, total):6.2f}%")


if __name__ == "__main__":
    main()

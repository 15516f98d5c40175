"""The same dump in fresh processes under several environments or checkouts, interleaved: wall seconds, CPU
seconds (user + system, the whole process tree), system seconds and minor page faults, medians.

    python -m benchmarks.dump_env [--images 20000] [--repeats 4] [--workdir /tmp/logitstore-dump-env] \\
        folder shards folder:THP_MEM_ALLOC_ENABLE=1 shards:TREE=/path/to/other/checkout ...

Each variant is SOURCE[:KEY=VALUE...]: SOURCE is `folder` (PNGs in folders of 1,000) or `shards` (local WebDataset
shards of 1,000 samples, benchmarks/corpus_sources.py's layouts of the same MNIST images); KEY=VALUE sets an
environment variable of the dump's process (THP_MEM_ALLOC_ENABLE=1 is what the `logitstore` command sets for
itself, logitstore/entry.py), except TREE=DIR, which runs the library of another checkout (`git archive` of the
code before a change). The dump is benchmarks.corpus_sources' `--dump-child`: `logitstore.dump` with the teacher
of benchmarks.dump_throughput, batch 256, one decoding worker, one torch thread, the listing beside the teacher.
The variants' order rotates every repeat. Results: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def corpus(workdir: Path, images: int, mnist: Path) -> Path:
    """The folder, the shards and the teacher under `workdir`, made once."""
    if not (workdir / "teacher.pt").exists():
        from benchmarks.corpus_sources import pngs, save_teacher, write_layouts

        write_layouts(pngs(mnist, images), workdir)
        save_teacher(workdir / "teacher.pt")
    return workdir / "teacher.pt"


def one_dump(workdir: Path, ckpt: Path, variant: str) -> dict[str, float]:
    source, *settings = variant.split(":")
    env = dict(os.environ)
    for kv in settings:
        key, _, value = kv.partition("=")
        env[key] = value
    tree = env.pop("TREE", str(HERE))
    env["PYTHONPATH"] = tree
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-m", "benchmarks.corpus_sources", "--dump-child", str(workdir / source),
                        str(ckpt), str(workdir / "out.zarr"), "while", "1"], capture_output=True, text=True, env=env,
                       cwd=tree)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        raise RuntimeError(f"{variant}: {r.stderr[-2000:]}")
    return {"wall s": float(r.stdout.split()[-1]),
            "CPU s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
            "system s": after.ru_stime - before.ru_stime, "minor faults": after.ru_minflt - before.ru_minflt}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/logitstore-dump-env"))
    ap.add_argument("--mnist", type=Path, default=HERE.parent / "shared/datasets/mnist.npz")
    args = ap.parse_args(argv)
    for v in args.variants:
        if v.split(":")[0] not in ("folder", "shards"):
            ap.error(f"{v}: the source must be folder or shards")
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = corpus(args.workdir, args.images, args.mnist)
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for rep in range(args.repeats):
        k = rep % len(args.variants)
        for v in args.variants[k:] + args.variants[:k]:
            runs[v].append(one_dump(args.workdir, ckpt, v))
            print(f"  {rep + 1}/{args.repeats} {v}: " + ", ".join(f"{m} {x:,.2f}" for m, x in runs[v][-1].items()),
                  flush=True)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.images:,} MNIST PNGs, one dump per process, medians of {args.repeats}; "
                    f"load average {os.getloadavg()[0]:.1f} after")
    t.add_column("variant")
    metrics = list(runs[args.variants[0]][0])
    for m in metrics:
        t.add_column(m, justify="right")
    t.add_column("wall x first", justify="right")
    first = statistics.median(r["wall s"] for r in runs[args.variants[0]])
    for v, rs in runs.items():
        med = {m: statistics.median(r[m] for r in rs) for m in metrics}
        t.add_row(v, *(f"{med[m]:,.2f}" if m != "minor faults" else f"{med[m]:,.0f}" for m in metrics),
                  f"{first / med['wall s']:.3f}")
    Console(width=160).print(t)


if __name__ == "__main__":
    main()

"""A teacher teaches on unlabeled out-of-distribution data: MNIST, end to end with logitstore + trainer.

    python -m examples.mnist_ood            # the small embedded demo: about a minute on 2 CPU cores
    python -m examples.mnist_ood --full --mnist ../shared/datasets/mnist.npz   # the whole experiment

The pipeline (each step is one call; the table says which numbers came from where):

  MNIST (labels) --train--> teacher.pt
  letters / noise / MNIST-without-labels --logitstore.dump(teacher)--> stores/*.zarr
  store --trainer.fit (no labels)--> student --trainer.evaluate--> MNIST test top-1

Every step's result goes into OUT/results.json as soon as it is done; running the same command
again skips the steps already there (delete the file, or pass --fresh, to start over).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import logitstore
import trainer
from logitstore import LogitStore
from logitstore.arch import build_model
from logitstore.tools.inspect_store import info as store_info
from logitstore.tools.show import contact_sheet

from . import corpora, mnist
from . import supervised as sup
from .nets import TEACHER_ARCH, TRUSTED, teacher_cnn

console = Console(stderr=True, highlight=False)           # progress
report = Console(width=None if sys.stdout.isatty() else 130)  # the tables, unwrapped when piped


@dataclass(frozen=True)
class Plan:
    """How big each part of the experiment is. Everything else (architectures, seeds) is fixed."""

    name: str
    train_images: int | None      # labeled MNIST images the teacher trains on (None: all given)
    letters: int                  # rendered glyphs in the letters corpus
    noise: int                    # uniform-noise images
    teacher_epochs: float
    student_epochs: int           # `trainer fit --epochs` for the main students
    temperature: float = 4.0
    mnist_unlabeled: bool = False # the in-distribution reference: MNIST's training images, no labels
    letters_views: int = 0        # >1: also a store of that many random crops per letter image
    label_runs: bool = False      # supervised reference, and 1% / 10% labels: scratch vs fine-tuned
    temperatures: tuple[float, ...] = ()
    sizes: tuple[int, ...] = ()   # transfer-set sizes (first n rows of the one letters store)
    seed: int = 0                 # teacher, corpora, and the first seed of every student
    extra_seeds: tuple[int, ...] = ()  # the letters student (and the label runs) again with these seeds
    lookalike_ablation: bool = False   # a student from the letters minus every digit look-alike glyph


PLANS = {
    # For tests and CI (about 30 s): only checks that the pipeline teaches at all. The students
    # train until their loss has flattened (12 epochs of 3,000 images, 276 steps): stopped
    # earlier, still on the steep part of the curve, the letters student's accuracy swings
    # with any change in floating-point rounding (0.31 to 0.80 at 4 epochs, depending on the
    # seed, the fonts on the machine, or just torch's thread count), and a passing CI run
    # could fail on another machine.
    "tiny": Plan("tiny", train_images=3000, letters=3000, noise=3000, teacher_epochs=2, student_epochs=12),
    # The README's first command: the embedded MNIST subset, about a minute on 2 cores.
    "demo": Plan("demo", train_images=None, letters=10_000, noise=10_000, teacher_epochs=2, student_epochs=6),
    # The whole experiment (20-30 minutes on 2 cores; examples/mnist_ood/README.md has its numbers).
    "full": Plan("full", train_images=None, letters=50_000, noise=50_000, teacher_epochs=3, student_epochs=8,
                 mnist_unlabeled=True, letters_views=4, label_runs=True,
                 temperatures=(1, 2, 4, 8, 16), sizes=(2_500, 5_000, 10_000, 25_000, 50_000), extra_seeds=(1, 2),
                 lookalike_ablation=True),
}
LABEL_FRACTIONS = (0.01, 0.1)
STUDENT = "lenet"  # trainer's built-in LeNet-5: 62k parameters against the teacher's 422k


# --------------------------------------------------------------------------------------------
# Results: one JSON file, written after every step, so a rerun picks up where it stopped
# --------------------------------------------------------------------------------------------
# What every step builds on; a plan that only adds steps (sweeps, seeds) keeps the results.
CORE = ("train_images", "letters", "noise", "teacher_epochs", "student_epochs", "temperature", "seed")


class Results:
    """OUT/results.json: the plan, the machine, and every finished step's result under its key."""

    def __init__(self, path: Path, plan: Plan, mnist_source: str, fresh: bool):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() and not fresh else {}
        core = lambda p: {k: p.get(k) for k in CORE}  # noqa: E731
        same = old.get("mnist") == mnist_source and core(old.get("plan", {})) == core(dataclasses.asdict(plan))
        self.data: dict[str, Any] = old if same else {"machine": machine(), "steps": {}}
        self.data.update(plan=dataclasses.asdict(plan), mnist=mnist_source)

    def step(self, key: str, fn: Callable[[], Any]) -> Any:
        if key in self.data["steps"]:
            console.print(f"[dim]  {key}: done before (in {self.path.name}), skipped[/dim]")
            return self.data["steps"][key]
        console.print(f"[bold]{key}[/bold]")
        value = fn()
        self.data["steps"][key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")
        return value

    def get(self, key: str) -> Any:
        return self.data["steps"].get(key)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None, "python": platform.python_version(), "torch": torch.__version__,
            "os": f"{platform.system()} {platform.release()}"}


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def train_teacher(data: mnist.Mnist, plan: Plan, path: Path) -> dict[str, Any]:
    idx = (mnist.balanced_subset(data.train_labels, plan.train_images, plan.seed) if plan.train_images
           else np.arange(len(data.train_images)))
    torch.manual_seed(plan.seed)
    model = teacher_cnn()
    fit = sup.train_classifier(model, data.train_images[idx], data.train_labels[idx], epochs=plan.teacher_epochs,
                               seed=plan.seed, log=console.print)
    sup.save_checkpoint(model, TEACHER_ARCH, {}, path)
    return {"checkpoint": str(path), "train_images": int(len(idx)), "epochs": plan.teacher_epochs,
            "seconds": fit["seconds"], "params": sum(p.numel() for p in model.parameters())}


def dump(teacher: Path, corpus: Path, store: Path, progress: bool, **kw: Any) -> dict[str, Any]:
    s = logitstore.dump(str(teacher), str(corpus), str(store), overwrite=True, progress=progress,
                        trust_modules=TRUSTED, **kw)
    d = store_info(logitstore.open_store(store))
    return {"store": str(store), "images": s.n_images, "failed": s.n_failed, "views": s.views,
            "seconds": s.seconds, "bytes": s.bytes_on_disk, "histogram": d["class_histogram"],
            "confidence_mean": d["confidence"]["mean"], "entropy_mean": d["entropy_nats"]["mean"]}


def first_rows(path: Path, n: int) -> LogitStore:
    """The first n rows of a store, read as a store: how the size sweep re-uses one dump.

    The letters corpus is generated i.i.d. in id order, so its first n rows are a random sample.
    """
    store = logitstore.open_store(path)
    if n > len(store):
        raise SystemExit(f"{path}: asked for {n:,} rows, the store has {len(store):,}")
    return store.head(n)


def distil(store: Path | LogitStore, run: Path, test_dir: Path, *, epochs: int, temperature: float, seed: int,
           progress: bool) -> dict[str, Any]:
    res, seconds = timed(lambda: trainer.fit([store], run, student=STUDENT, epochs=epochs,
                                             temperature=temperature, seed=seed, overwrite=True,
                                             progress=progress))
    ev = trainer.evaluate(res.checkpoint, test_dir)
    return {"checkpoint": res.checkpoint, "top1": ev.top1, "n_test": ev.n, "epochs": epochs, "T": temperature,
            "store_rows": len(store) if isinstance(store, LogitStore) else len(logitstore.open_store(store)),
            "seconds": seconds, "agree_holdout": res.final.get("agree")}


def label_run(data: mnist.Mnist, fraction: float, out: Path, test_dir: Path, init: Path | None,
              seed: int) -> dict[str, Any]:
    """LeNet on a balanced `fraction` of MNIST's labels, from scratch or from a distilled student.

    Both start the same schedule (Adam, one-cycle, max lr 1e-3, the usual MNIST jitter) and see
    the same number of labeled samples: max(8 epochs, 30,000 samples). 8 epochs is what the
    distilled students get, so the 100% run is "the same student, labels instead of logits".
    """
    n = round(fraction * len(data.train_images))
    idx = mnist.balanced_subset(data.train_labels, n, seed + 100)
    torch.manual_seed(seed)
    if init is not None:
        model, ckpt = sup.load_checkpoint(init)
        arch, kwargs = ckpt["arch"], ckpt.get("arch_kwargs") or {}
    else:
        arch, kwargs = f"trainer.students:{STUDENT}", {"num_classes": 10, "in_channels": 1}
        model = build_model(arch, kwargs)
    epochs = max(8.0, 30_000 / n)
    fit = sup.train_classifier(model, data.train_images[idx], data.train_labels[idx], epochs=epochs, lr=1e-3,
                               seed=seed)
    path = sup.save_checkpoint(model, arch, kwargs, out / "checkpoint.pt")
    ev = trainer.evaluate(path, test_dir)
    return {"checkpoint": str(path), "labels": n, "epochs": epochs, "init": str(init) if init else None,
            "top1": ev.top1, "seconds": fit["seconds"]}


def run(plan: Plan, out: Path, mnist_source: str | None, fresh: bool = False, progress: bool = False) -> dict[str, Any]:
    data = mnist.load(mnist_source)
    results = Results(out / "results.json", plan, data.source, fresh)
    console.print(f"[bold]mnist_ood[/bold] plan={plan.name} mnist={data} out={out}")
    R = results.step
    corp, stores, runs = out / "corpora", out / "stores", out / "runs"
    test_dir = out / "mnist_test"
    teacher_pt = out / "teacher.pt"

    def write_test() -> dict[str, Any]:
        mnist.write_folder(data.test_images, fresh_dir(test_dir), data.test_labels)
        return {"images": len(data.test_images)}

    R("mnist test folder", write_test)
    R("teacher", lambda: train_teacher(data, plan, teacher_pt))
    R("teacher accuracy", lambda: {"top1": trainer.evaluate(teacher_pt, test_dir, trust_modules=TRUSTED).top1})

    # --- corpora: no digit in them -----------------------------------------------------------
    def make(name: str, fn: Callable[[Path], dict[str, Any]]) -> None:
        def build() -> dict[str, Any]:
            facts, seconds = timed(lambda: fn(fresh_dir(corp / name)))
            return {**facts, "seconds": seconds}

        R(f"corpus {name}", build)

    def mnist_unlabeled(p: Path) -> dict[str, Any]:
        mnist.write_folder(data.train_images, p)
        return {"images": len(data.train_images)}

    make("letters", lambda p: corpora.write_letters(p, plan.letters, seed=plan.seed))
    make("noise", lambda p: corpora.write_noise(p, plan.noise, seed=plan.seed + 1))
    if plan.mnist_unlabeled:
        make("mnist", mnist_unlabeled)

    # --- one dump per corpus, then students with no labels ---------------------------------
    names = ["letters", "noise"] + (["mnist"] if plan.mnist_unlabeled else [])
    stores_of = {name: stores / f"{name}.zarr" for name in names}
    for name in names:
        R(f"dump {name}", lambda: dump(teacher_pt, corp / name, stores_of[name], progress))
    if plan.letters_views > 1:
        v = plan.letters_views
        stores_of[f"letters x{v}"] = stores / f"letters_v{v}.zarr"
        # Crops of at least half the glyph image: smaller ones are mostly empty black squares.
        R(f"dump letters x{v}", lambda: dump(teacher_pt, corp / "letters", stores_of[f"letters x{v}"], progress,
                                             views=v, crop_scale=(0.5, 1.0), seed=plan.seed))
    E, T = plan.student_epochs, plan.temperature

    def students(seed: int, only: tuple[str, ...] | None = None) -> None:
        for name, store in stores_of.items():
            if only is not None and name not in only:
                continue
            R(seeded(f"student {name}", seed, plan), lambda: distil(
                store, runs / seeded(name, seed, plan).replace(" ", "_").replace("=", ""), test_dir, epochs=E,
                temperature=T, seed=seed, progress=progress))

    def label_runs(seed: int) -> None:
        """The supervised reference, and what a few labels add to a blind student (paired by seed)."""
        if seed == plan.seed:
            R("labels 100% scratch", lambda: label_run(data, 1.0, runs / "labels100", test_dir, None, seed))
        blind = Path(results.get(seeded("student letters", seed, plan))["checkpoint"])
        for f in LABEL_FRACTIONS:
            pct = f"{100 * f:g}%"
            tag = f"labels{100 * f:g}" + ("" if seed == plan.seed else f"_seed{seed}")
            R(seeded(f"labels {pct} scratch", seed, plan),
              lambda: label_run(data, f, runs / tag, test_dir, None, seed))
            R(seeded(f"labels {pct} from letters student", seed, plan),
              lambda: label_run(data, f, runs / f"{tag}_ft", test_dir, blind, seed))

    students(plan.seed)

    # --- sweeps on the one letters store ---------------------------------------------------
    for temp in plan.temperatures:
        if temp == T:
            continue  # the main letters student is this point of the sweep
        R(f"sweep T={temp:g}", lambda: distil(stores_of["letters"], runs / f"T{temp:g}", test_dir, epochs=E,
                                             temperature=temp, seed=plan.seed, progress=progress))
    for n in plan.sizes:
        if n == plan.letters:
            continue
        # The same number of optimiser steps for every size: fewer images, more epochs.
        R(f"sweep n={n}", lambda: distil(first_rows(stores_of["letters"], n), runs / f"n{n}", test_dir,
                                        epochs=max(1, round(E * plan.letters / n)), temperature=T,
                                        seed=plan.seed, progress=progress))
    if plan.label_runs:
        label_runs(plan.seed)

    # --- what the teacher saw ---------------------------------------------------------------
    for name in ("letters", "noise"):
        R(f"sheet {name}", lambda: {"png": str(contact_sheet(stores_of[name], None, out / f"{name}_sheet.png",
                                                             per_class=8, seed=plan.seed).out)})

    R("teacher reading letters", lambda: teacher_reading(stores_of["letters"], corp / "letters"))
    if plan.lookalike_ablation:
        # Is it only the letters that look like digits (O, l, S, Z, B, g ...) that teach?
        name = "letters-no-lookalikes"
        listing = corp / f"{name}.txt"
        R(f"corpus {name}", lambda: corpora.write_listing_without(
            corp / "letters", "".join(corpora.LOOKALIKES.values()), listing))
        R(f"dump {name}", lambda: dump(teacher_pt, listing, stores / f"{name}.zarr", progress))
        R(f"student {name}", lambda: distil(stores / f"{name}.zarr", runs / name, test_dir, epochs=E,
                                            temperature=T, seed=plan.seed, progress=progress))

    # --- more seeds for the main table, last so an interrupted run has the rest -------------
    for seed in plan.extra_seeds:
        students(seed, only=("letters",))
        if plan.label_runs:
            label_runs(seed)
    return results.data


def teacher_reading(store_path: Path, letters_root: Path, top: int = 8) -> dict[str, Any]:
    """Which glyphs the teacher calls each digit: {digit: [(glyph, images), ...]}, and how much of
    the letters store is a look-alike glyph read as its digit."""
    glyphs = corpora.read_glyphs(letters_root)
    store = logitstore.open_store(store_path)
    rows = store[0:len(store)]
    pred = rows.logits[:, 0, :].astype(np.float32).argmax(axis=1)
    per_digit: dict[str, dict[str, int]] = {c: {} for c in store.classes}
    lookalike_hits = 0
    for image_id, k in zip(rows.ids, pred):
        ch, digit = glyphs[str(image_id)], store.classes[int(k)]
        per_digit[digit][ch] = per_digit[digit].get(ch, 0) + 1
        lookalike_hits += ch in corpora.LOOKALIKES.get(digit, "")
    return {"top_glyphs": {d: sorted(g.items(), key=lambda kv: -kv[1])[:top] for d, g in per_digit.items()},
            "images": len(store), "lookalike_read_as_its_digit": lookalike_hits}


def seeded(key: str, seed: int, plan: Plan) -> str:
    """Step keys: the plan's own seed is implicit, others are named ("student letters seed=1")."""
    return key if seed == plan.seed else f"{key} seed={seed}"


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------
def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


CORPUS_NAMES = {"letters": "letters and symbols", "noise": "uniform-noise images", "mnist": "MNIST train images",
                "letters-no-lookalikes": "letters and symbols without digit look-alikes"}


def by_seed(steps: dict[str, Any], prefix: str) -> dict[str, list[dict[str, Any]]]:
    """Steps whose key starts with `prefix`, grouped over seeds: {"student letters": [seed 0, seed 1, ...]}."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for key, value in steps.items():
        if key.startswith(prefix):
            groups.setdefault(key.split(" seed=")[0], []).append(value)
    return groups


def top1_cell(runs: list[dict[str, Any]]) -> str:
    acc = [100 * r["top1"] for r in runs]
    if len(acc) == 1:
        return f"{acc[0]:.2f}%"
    return f"{np.mean(acc):.2f}% ({min(acc):.2f}-{max(acc):.2f}, {len(acc)} seeds)"


def summary_rows(data: dict[str, Any]) -> list[tuple[str, ...]]:
    """(model, trained on, MNIST test top-1, dump time, store size) for the main table."""
    s = data["steps"]
    rows = [("teacher", f"{s['teacher']['train_images']:,} labeled MNIST images",
             top1_cell([s["teacher accuracy"]]), "", "")]
    students = by_seed(s, "student ")
    order = ["letters", "noise", "mnist"]  # then the letters variants, in the order they were run
    for key in sorted(students, key=lambda k: (order.index(k[8:]) if k[8:] in order else len(order))):
        runs, name = students[key], key[len("student "):]
        d = s[f"dump {name}"]
        corpus, _, views = name.partition(" x")
        what = f"{d['images']:,} {CORPUS_NAMES.get(corpus, corpus)}" + (f" x {views} crops" if views else "")
        rows.append(("student", f"{what}, no labels", top1_cell(runs), f"{d['seconds']:.1f} s", _size(d["bytes"])))
    labels = by_seed(s, "labels ")

    def label_order(key: str) -> tuple[bool, float, bool]:  # 100% first, then 1%, 10%; scratch first
        pct = float(key.split()[1].rstrip("%"))
        return pct != 100, pct, "letters" in key

    for key in sorted(labels, key=label_order):
        runs = labels[key]
        frac, _, how = key[len("labels "):].partition(" ")
        start = "the letters student" if "letters" in how else "scratch"
        rows.append(("student", f"{runs[0]['labels']:,} labeled MNIST images ({frac}), from {start}",
                     top1_cell(runs), "", ""))
    rows.append(("chance", "", "10.00%", "", ""))
    return rows


def print_summary(data: dict[str, Any]) -> None:
    s = data["steps"]
    table = Table(title=f"mnist_ood ({data['plan']['name']}): top-1 on MNIST's test set "
                        f"({s['mnist test folder']['images']:,} images)")
    for col in ("model", "trained on", "top-1", "dump time", "store size"):
        table.add_column(col, justify="right" if col in ("top-1", "dump time", "store size") else "left")
    for row in summary_rows(data):
        table.add_row(*row)
    report.print(table)
    sweeps = [v for k, v in s.items() if k.startswith("sweep ")]
    if sweeps:
        total = sum(v["seconds"] for v in sweeps) + s["student letters"]["seconds"]
        report.print(f"letters dump once: {s['dump letters']['seconds']:.1f} s; the sweep's "
                        f"{len(sweeps) + 1} students on that one store: {total:.0f} s")


@click.command()
@click.option("--full", "plan_name", flag_value="full", help="The whole experiment (20-30 minutes on 2 cores).")
@click.option("--tiny", "plan_name", flag_value="tiny", help="A smoke test (under a minute).")
@click.option("--mnist", "mnist_source", default=None, type=click.Path(exists=True),
              help="MNIST: an .npz like ../shared/datasets/mnist.npz or a folder with train/ and test/ ImageFolders "
                   "[default: the 12,000/2,000-image subset shipped in examples/mnist_ood/data].")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Working folder [default: demo-out/ for the demo, runs/mnist_ood/ for --full].")
@click.option("--fresh", is_flag=True, help="Redo every step, ignoring OUT/results.json.")
@click.option("--progress/--no-progress", default=None, help="Progress bars [default: when stderr is a terminal].")
def main(plan_name: str | None, mnist_source: str | None, out: str | None, fresh: bool, progress: bool | None) -> None:
    """Train an MNIST teacher, dump its logits over letters and noise, distil students with no labels,
    and print their MNIST accuracy. With no options: the small embedded demo."""
    plan = PLANS[plan_name or "demo"]
    out_dir = Path(out or ("runs/mnist_ood" if plan.name == "full" else "demo-out" if plan.name == "demo"
                           else "demo-out/tiny"))
    t0 = time.perf_counter()
    data = run(plan, out_dir, mnist_source, fresh=fresh, progress=sys.stderr.isatty() if progress is None else progress)
    print_summary(data)
    report.print(f"[dim]{time.perf_counter() - t0:.0f} s; results in {out_dir / 'results.json'}; what the teacher "
                    f"saw: {out_dir / 'letters_sheet.png'}, {out_dir / 'noise_sheet.png'}[/dim]")


if __name__ == "__main__":
    main()

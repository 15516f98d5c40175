"""Function matching from a cache (issue 15): offline stores of 1..256 views per image against online
distillation with the teacher in memory, side by side, on the MNIST demo's teacher and letters corpus.

    python -m benchmarks.function_matching [--letters 500] [--epochs 64] [--seeds 3] [--views 1,4,16,64,256]
        [--families "crops,crops + mixup/cutmix,crops + RandAugment"]   # default: the first two

  online      the reference, written only here: the teacher in memory, a fresh random view of every image at
              every step (logitstore/views.py's and logitstore/augment.py's samplers and replay, the parameters drawn from a new generator
              per step), the loss, optimizer and schedule of `trainer fit`'s defaults (trainer/fit.py's own
              `train_step`, `make_optimizer`, `warmup_cosine`).
  offline V   `logitstore.dump(views=V)` once, then `trainer.fit` (library API, its defaults): each epoch
              replays a different stored view of each image, so a store serves min(V, epochs) distinct views.
  + mix       the same with mixup / cutmix views (the teacher run on the mixed image; online, the partner is
              another image of the batch), and likewise + RandAugment: an online arm per family.

Every arm trains the same student (LeNet-5) for the same epochs over the same images, with the same seeds
(the same initial weights per seed), and is scored on MNIST's test digits. The table gives top-1 mean and
min-max over seeds, seconds per training epoch (median) and its ratio to online's, the dump's time and the
store's size; the figure (accuracy against views, log x) goes to benchmarks/function_matching.png.
Plain V = 1 is the eval view (the image as it is): a dump of one plain view stores no crop. The fits use
holdout=0, so offline arms train on the same images as online.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import logitstore
import trainer
from examples.mnist_ood import corpora, mnist
from examples.mnist_ood.run import Plan, dump as dump_store, train_teacher
from examples.mnist_ood.nets import TRUSTED
from logitstore.cli_common import human_bytes
from logitstore.corpus import decode_image
from logitstore.schema import ViewSpec
from logitstore.teacher.job import DumpConfig
from logitstore import augment, schema
from logitstore.views import apply_views, sample_view_params
from trainer.evaluate import load_checkpoint, model_from_checkpoint
from trainer.fit import FitConfig, make_optimizer, train_step, warmup_cosine
from trainer.inputs import NO_LABEL, InputSpec, make_input_spec
from trainer.order import batches_per_epoch
from trainer.students import build_student, resolve_student

from .fit_throughput import machine

HERE = Path(__file__).resolve().parent
STUDENT = "lenet"
# The stored-view families: the dump's extra options for each (mixup/cutmix as in DeiT/timm's defaults).
FAMILIES: dict[str, dict[str, Any]] = {
    "crops": {},
    "crops + mixup/cutmix": {"mixup": 0.2, "cutmix": 1.0, "mix_prob": 1.0},
    "crops + RandAugment": {"augment": "rand-augment"},
}
console = Console(stderr=True, highlight=False)


# --------------------------------------------------------------------------------------------
# Inputs: the demo's teacher, its letters corpus, MNIST's test digits
# --------------------------------------------------------------------------------------------
def make_teacher(data: mnist.Mnist, images: int, epochs: float, where: Path) -> Path:
    """The demo's teacher CNN (examples/mnist_ood), trained once per (images, epochs) and kept."""
    path = where / f"teacher_{images}_{epochs:g}.pt"
    if not path.is_file():
        plan = Plan("function_matching", train_images=images, letters=0, noise=0, teacher_epochs=epochs,
                    student_epochs=0)
        train_teacher(data, plan, path)
    return path


def make_letters(n: int, where: Path) -> Path:
    """The demo's letters corpus (seed 0), rendered once per size and kept."""
    root = where / f"letters_{n}"
    if not (root / "glyphs.csv").is_file():
        shutil.rmtree(root, ignore_errors=True)
        corpora.write_letters(root, n, seed=0)
    return root


def corpus_pixels(store_path: Path, root: Path) -> tuple[np.ndarray, list[torch.Tensor]]:
    """The store's image ids, in row order, and their decoded uint8 [C, H, W] pixels (the dump's decode)."""
    store = logitstore.open_store(store_path)
    ids = store.read(0, len(store)).ids
    mode = store.meta.preprocess.mode
    return ids, [decode_image((root / i).read_bytes(), mode) for i in ids]


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 on inputs already normalised (the test digits through the store's eval preprocessing)."""
    model.eval()
    hits = sum(int((model(x[a:a + batch]).argmax(1) == labels[a:a + batch]).sum()) for a in range(0, len(x), batch))
    return hits / len(x)


# --------------------------------------------------------------------------------------------
# The online reference
# --------------------------------------------------------------------------------------------
def step_seed(seed: int, epoch: int, step: int) -> int:
    """The view seed of one training step: a fresh generator per step (and per image, inside the sampler)."""
    words = np.random.SeedSequence([seed, epoch, step, 0x0F]).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def fresh_views(imgs: list[torch.Tensor], ids: np.ndarray, view: ViewSpec, spec: InputSpec, seed: int) -> torch.Tensor:
    """One new view of each image (uint8 [n, C, H, W]) under the dump's policy `view` (count 1), its parameters
    drawn from generators seeded by (`seed`, id), as a dump with that seed would draw them. Mixing (issue 15's
    augment module) pairs each image with a partner from this batch, as timm's in-batch mixup does; the dump
    pairs it within its fixed mix group of the listing instead."""
    params = np.concatenate([sample_view_params(*img.shape[-2:], view, seed, i) for img, i in zip(imgs, ids)])
    if not view.augmented:
        return apply_views(imgs, params, spec.pre, view.kind)
    drawn = [augment.sample_extras(view, seed, i, spec.pre.size) for i in ids]
    extras = {k: np.stack([d[0][k] for d in drawn]) for k in drawn[0][0]}  # [n, 1, ...] each
    first = lambda name: extras[name][:, 0] if name in extras else None  # noqa: E731
    premix = augment.premix_views(imgs, params, first(schema.AUGMENT_OPS), first(schema.ERASE_BOXES), spec.pre,
                                  view)
    if view.mix is None:
        return premix
    u = np.stack([d[1] for d in drawn])  # [n, 1]
    mixed = augment.mix_group([p[None] for p in premix], u, extras[schema.MIX_PARAMS], extras[schema.MIX_LAMBDA])
    return torch.stack([mixed[r][0] for r in range(len(imgs))])


def family_view(family: str, args: argparse.Namespace) -> ViewSpec:
    """One random view under a family's policy, built by the dump's own DumpConfig (two views, then one: a dump
    of a single plain view stores the eval view, not a crop)."""
    cfg = DumpConfig("", "", "", views=2, crop_scale=tuple(args.crop_scale), flip_prob=args.flip_prob,
                     **FAMILIES[family])
    return dataclasses.replace(cfg.view_spec(), count=1)


def online(teacher: torch.nn.Module, ids: np.ndarray, imgs: list[torch.Tensor], spec: InputSpec, view: ViewSpec,
           cfg: FitConfig, classes: int) -> tuple[torch.nn.Module, list[float]]:
    """Distil with the teacher in memory: every step draws new views, runs the teacher on them, and takes one
    `trainer.fit.train_step` of the student on the same pixels. Returns the student and seconds per epoch."""
    dev = torch.device("cpu")
    torch.manual_seed(cfg.seed)  # the same initial weights as trainer.fit with this seed
    model, _ = build_student(resolve_student(cfg.student), classes, spec.channels, spec.size, cfg.student_kwargs)
    optimizer = make_optimizer(model, cfg)
    steps = batches_per_epoch(len(ids), cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps, round(cfg.warmup_epochs * steps)))
    params = [p for p in model.parameters() if p.requires_grad]
    no_labels = torch.full((cfg.batch_size,), NO_LABEL, dtype=torch.int64)
    teacher.eval()
    seconds = []
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(ids))
        for step in range(steps):
            rows = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            pixels = fresh_views([imgs[r] for r in rows], ids[rows], view, spec, step_seed(cfg.seed, epoch, step))
            with torch.no_grad():
                logits = teacher(spec.to_input(pixels))
            train_step(model, optimizer, params, pixels, logits, no_labels[:len(rows)], spec, dev, cfg, "fp32")
            scheduler.step()
        seconds.append(time.perf_counter() - t0)
    return model, seconds


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Arm:
    name: str
    family: str                # a FAMILIES key
    views: int                 # stored views; 0: online (fresh views every step)
    top1: list[float] = dataclasses.field(default_factory=list)
    epoch_s: list[float] = dataclasses.field(default_factory=list)
    dump_s: float = 0.0
    store_bytes: int = 0


def suffix(family: str) -> str:
    """An arm's name after "online" / "offline V": nothing for plain crops, else what the family adds."""
    return "" if family == "crops" else f", {family.split(' + ')[1]}"


def offline_arm(family: str, v: int, args: argparse.Namespace, teacher: Path, letters: Path,
                test: tuple[torch.Tensor, torch.Tensor], stores: Path, runs: Path) -> Arm:
    arm = Arm(f"offline {v}{suffix(family)}", family, v)
    store = stores / f"{family.replace(' ', '').replace('/', '_').replace('+', '_')}_v{v}.zarr"
    opts = {} if v == 1 and family == "crops" else {"crop_scale": tuple(args.crop_scale), "flip_prob": args.flip_prob}
    d = dump_store(teacher, letters, store, False, views=v, seed=0, **opts, **FAMILIES[family])
    arm.dump_s, arm.store_bytes = d["seconds"], d["bytes"]
    for seed in range(args.seeds):
        res = trainer.fit([store], runs / f"{store.stem}_s{seed}", student=STUDENT, epochs=args.epochs, seed=seed,
                          holdout=0.0, overwrite=True)
        ckpt = load_checkpoint(res.checkpoint)
        arm.top1.append(top1(model_from_checkpoint(ckpt, res.checkpoint), *test))
        arm.epoch_s.append(statistics.median(r["seconds"] for r in res.history))
        console.print(f"  {arm.name} seed {seed}: top-1 {arm.top1[-1]:.2%}, {arm.epoch_s[-1]:.2f} s/epoch")
    return arm


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    work = args.workdir
    stores, runs = work / "stores", work / "runs"
    for p in (stores, runs):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    data = mnist.load(args.mnist)
    t0 = time.perf_counter()
    teacher_pt = make_teacher(data, args.teacher_images, args.teacher_epochs, work)
    letters = make_letters(args.letters, work)
    console.print(f"teacher and corpus ready in {time.perf_counter() - t0:.0f} s")

    # The plain store fixes what every arm shares: the ids in row order, the preprocessing, the classes.
    plain = stores / "plain.zarr"
    dump_store(teacher_pt, letters, plain, False)
    meta = logitstore.open_store(plain).meta
    spec = make_input_spec(meta.preprocess, None, meta.preprocess.channels)
    n_test = min(args.test_images, len(data.test_images))
    test_x = spec.to_input(torch.from_numpy(data.test_images[:n_test])[:, None])
    test = (test_x, torch.from_numpy(data.test_labels[:n_test]))
    teacher_ckpt = load_checkpoint(teacher_pt)
    teacher = model_from_checkpoint(teacher_ckpt, str(teacher_pt), TRUSTED)
    result: dict[str, Any] = {"teacher_top1": top1(teacher, *test), "machine": machine(), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "arms": []}

    ids, imgs = corpus_pixels(plain, letters)
    for family in args.families:
        arm = Arm(f"online{suffix(family)}", family, 0)
        console.print(f"[bold]{arm.name}[/bold]")
        for seed in range(args.seeds):
            cfg = FitConfig(stores=[], out="", student=STUDENT, epochs=args.epochs, seed=seed)
            model, seconds = online(teacher, ids, imgs, spec, family_view(family, args), cfg, len(meta.classes))
            arm.top1.append(top1(model, *test))
            arm.epoch_s.append(statistics.median(seconds))
            console.print(f"  {arm.name} seed {seed}: top-1 {arm.top1[-1]:.2%}, {arm.epoch_s[-1]:.2f} s/epoch")
        result["arms"].append(dataclasses.asdict(arm))
        for v in args.views:
            console.print(f"[bold]{family}, {v} view(s)[/bold]")
            result["arms"].append(dataclasses.asdict(offline_arm(family, v, args, teacher_pt, letters, test,
                                                                 stores, runs)))
    result["seconds"] = time.perf_counter() - t0
    return result


def spread(xs: list[float]) -> str:
    return f"{100 * min(xs):.2f}-{100 * max(xs):.2f}"


def print_table(result: dict[str, Any]) -> None:
    a = result["args"]
    arms = result["arms"]
    online_of = {x["family"]: x for x in arms if x["views"] == 0}
    table = Table(title=f"function matching: LeNet-5 from the MNIST teacher on {a['letters']:,} letters, "
                        f"{a['epochs']} epochs, {a['seeds']} seeds; MNIST test top-1 (teacher "
                        f"{100 * result['teacher_top1']:.2f}%); 'vs online' and 'x online': against the online "
                        "arm of the same views")
    for col in ("arm", "views", "top-1 % (mean)", "min-max", "vs online (points)", "s / epoch", "x online",
                "dump s", "store"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for x in arms:
        base = online_of[x["family"]]
        acc, sec = statistics.mean(x["top1"]), statistics.median(x["epoch_s"])
        on_acc, on_s = statistics.mean(base["top1"]), statistics.median(base["epoch_s"])
        is_online = x["views"] == 0
        table.add_row(x["name"], "fresh" if is_online else str(x["views"]), f"{100 * acc:.2f}", spread(x["top1"]),
                      "" if is_online else f"{100 * (acc - on_acc):+.2f}", f"{sec:.2f}",
                      f"{sec / on_s:.2f}", "" if is_online else f"{x['dump_s']:.1f}",
                      "" if is_online else human_bytes(x["store_bytes"]))
    Console(width=170).print(table)
    print(f"machine: {result['machine']}; whole run {result['seconds']:.0f} s")


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = result["args"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = dict(zip(FAMILIES, ("tab:blue", "tab:orange", "tab:green")))
    for family in FAMILIES:
        arms = [x for x in result["arms"] if x["family"] == family and x["views"] > 0]
        base = [x for x in result["arms"] if x["family"] == family and x["views"] == 0]
        if not arms:
            continue
        c = colors[family]
        if base:
            on = [100 * t for t in base[0]["top1"]]
            ax.axhspan(min(on), max(on), color=c, alpha=0.12, lw=0)
            ax.axhline(statistics.mean(on), color=c, ls="--", lw=1, label=f"online{suffix(family)} (min-max band)")
        v = [x["views"] for x in arms]
        mean = np.array([100 * statistics.mean(x["top1"]) for x in arms])
        lo = mean - [100 * min(x["top1"]) for x in arms]
        hi = [100 * max(x["top1"]) for x in arms] - mean
        ax.errorbar(v, mean, yerr=[lo, hi], marker="o", capsize=3, color=c, label=f"offline{suffix(family)}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(a["views"], [str(v) for v in a["views"]])
    ax.set_xlabel("views stored per image (plain crops: 1 = the image as it is)")
    ax.set_ylabel("MNIST test top-1 (%)")
    ax.set_title(f"LeNet-5 from the MNIST teacher on {a['letters']:,} letters, {a['epochs']} epochs, "
                 f"{a['seeds']} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, default=HERE.parents[1] / "shared/datasets/mnist.npz",
                    help="MNIST .npz: the teacher's training digits and the test digits every arm is scored on.")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/logitstore-function-matching"))
    ap.add_argument("--letters", type=int, default=500, help="Images in the letters corpus (the transfer set).")
    ap.add_argument("--epochs", type=int, default=64, help="Student epochs, the same for every arm.")
    ap.add_argument("--seeds", type=int, default=3, help="Students per arm (seeds 0..N-1).")
    ap.add_argument("--views", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16, 64, 256])
    ap.add_argument("--families", type=lambda s: s.split(","), default=list(FAMILIES)[:2],
                    help=f"Comma-separated stored-view families of {list(FAMILIES)}.")
    ap.add_argument("--crop-scale", type=float, nargs=2, default=[0.5, 1.0],
                    help="Crop area range (the demo's: smaller crops of a glyph are mostly black).")
    ap.add_argument("--flip-prob", type=float, default=0.5)
    ap.add_argument("--teacher-images", type=int, default=12000, help="Labeled MNIST digits the teacher trains on.")
    ap.add_argument("--teacher-epochs", type=float, default=2)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, every arm.")
    ap.add_argument("--png", type=Path, default=HERE / "function_matching.png")
    ap.add_argument("--json", type=Path, default=None, help="Also write the raw results here.")
    args = ap.parse_args(argv)
    unknown = [f for f in args.families if f not in FAMILIES]
    if unknown:
        ap.error(f"--families: {unknown} not in {list(FAMILIES)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    result = run(args)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        plot(result, args.png)
        print(f"figure: {args.png}")


if __name__ == "__main__":
    main()

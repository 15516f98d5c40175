"""The training loop: distil a student from stores of teacher logits, with checkpoints, resume and DDP.

Reads top to bottom: `fit` sets up (stores, student, optimizer, schedule, resume), then each
epoch runs `train_one_epoch`, measures the student (held-out agreement with the teacher, and a
labeled folder if given), saves the checkpoint and the metrics. No teacher is ever loaded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from logitstore.allocator import keep_freed_memory
from logitstore.augment import describe_policy
from logitstore.cli_common import human_bytes, progress_bar
from logitstore.destination import check_local_destination
from logitstore.device import TRAIN_PRECISIONS, Torchrun, autocast, resolve_device, resolve_precision, torchrun_env
from logitstore.limits import Limit
from logitstore.locations import StoreLock
from logitstore.prefetch import read_ahead_in_runs
from logitstore.store import LogitStore
from logitstore.views import EVAL

from . import report
from .batches import (SKIPPED, Batches, Request, default_cache_bytes, make_batches, targets_to,
                      time_source)
from .errors import ConfigError, DivergedError, ImageError, RunDirError, StoreMismatchError
from .evaluate import evaluate_model, labeled_folder, load_checkpoint
from .inputs import InputSpec, make_input_spec
from .compile import compile_student
from .ema import ModelEMA
from .loss import DISTILL_MODES, objective, soft_target_loss, teacher_top1
from .order import batches_per_epoch
from .storeset import open_stores
from .students import (build_student, load_student_weights, natural_in_channels, parse_student_kwargs,
                       resolve_student, training_heads)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
OPTIMIZERS = ("sgd", "adamw")


LIMITS: dict[str, Limit] = {
    "epochs": Limit(int, 1),
    "batch_size": Limit(int, 1),
    "lr": Limit(float, 0, lo_open=True),
    "momentum": Limit(float, 0, 1, hi_open=True),      # 1 never forgets a gradient: the steps grow without bound
    "weight_decay": Limit(float, 0),
    "warmup_epochs": Limit(float, 0),                  # and at most --epochs (FitConfig.check)
    "clip_grad": Limit(float, 0),
    "temperature": Limit(float, 0, lo_open=True),
    "alpha": Limit(float, 0),
    "holdout": Limit(float, 0, 1, hi_open=True),
    "shuffle_blocks": Limit(int, 1),
    "cache_images": Limit(float, 0, 1e6),              # GiB; the bound keeps GiB -> bytes an integer
    "in_channels": Limit(int, 1, 64),
    "num_workers": Limit(int, 0),
    "seed": Limit(int, 0, 2 ** 32 - 1),                # what every RNG we seed (torch, numpy) accepts
    "stop_after": Limit(int, 1),
    "ema": Limit(float, 0, 1, lo_open=True, hi_open=True),  # the decay of --ema
}


@dataclass
class FitConfig:
    """Every choice of a run, as plain values: built once (by the CLI or `trainer.fit`), passed as is, and
    saved in the checkpoint as `args`. See `trainer fit --help` for what each means.

    Paths may be os.PathLike, a store may be given open (its location is kept) and `student_kwargs` as
    JSON text: each becomes a plain value on construction.
    """

    stores: list[str]                    # paths, zip files or URLs
    out: str
    student: str = "lenet"
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    images: list[str] | None = None
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None              # None: 0.1 for sgd, 1e-3 for adamw
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None    # None: 5e-4 for sgd, 0.05 for adamw
    warmup_epochs: float = 1.0
    clip_grad: float = 5.0               # max global gradient norm; 0 turns clipping off
    temperature: float = 4.0
    alpha: float = 0.0
    labels: str | None = None
    labels_from_folders: bool = False
    eval_images: str | None = None
    holdout: float = 0.02
    shuffle_blocks: int = 8
    cache_images: float | None = None    # GiB; None: half the available memory
    skip_mismatched: bool = False
    input_size: tuple[int, int] | None = None
    in_channels: int | None = None
    device: str | None = None
    precision: str = "auto"
    num_workers: int | None = None
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None
    teachers: list[str] | None = None          # ensemble of a store's teachers; None: the primary
    teacher_weights: list[float] | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for URL stores
    student_weights: str | None = None         # initial weights: .safetensors, a state dict or a checkpoint
    ema: float | None = None                   # decay of an exponential moving average of the weights; None: off
    compile: bool = False                      # torch.compile the student
    distill: str = "soft"                      # "soft": T^2 KL to the teacher's softmax; "hard": CE to its top-1

    def __post_init__(self) -> None:
        self.stores = [str(s.location) if isinstance(s, LogitStore) or hasattr(s, "meta") else os.fspath(s)
                       for s in self.stores]
        self.out = os.fspath(self.out)
        self.student_kwargs = parse_student_kwargs(self.student_kwargs)
        self.images = [os.fspath(p) for p in self.images] if self.images else None
        self.labels = os.fspath(self.labels) if self.labels else None
        self.eval_images = os.fspath(self.eval_images) if self.eval_images else None
        self.input_size = tuple(self.input_size) if self.input_size else None
        self.teachers = list(self.teachers) if self.teachers else None
        self.teacher_weights = list(self.teacher_weights) if self.teacher_weights else None
        self.storage_options = dict(self.storage_options or {})
        self.student_weights = os.fspath(self.student_weights) if self.student_weights else None

    def check(self) -> None:
        """Refuse, in one line, what cannot work: the same values the CLI's flag types refuse."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.distill not in DISTILL_MODES:
            raise ConfigError(f"--distill {self.distill!r} is not one of {', '.join(DISTILL_MODES)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is None and defaults[name] is None:  # None asks for the default
                continue
            if not limit.allows(value):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: must be {limit.describe()}")
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"--warmup-epochs {self.warmup_epochs:g} is longer than --epochs {self.epochs}: the "
                              "learning rate would never reach --lr")
        if self.labels is not None and self.labels_from_folders:
            raise ConfigError("--labels FILE and --labels-from-folders: pass one (the file's labels would hide the "
                              "folders'); put every label in the file, or use the folders alone")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite starts it again: pass one")
        if self.teacher_weights is not None:
            problem = teacher_weights_problem(self.teacher_weights)
            if problem:
                raise ConfigError(f"--teacher-weights {list(self.teacher_weights)}: {problem}")


def teacher_weights_problem(weights: Sequence[Any]) -> str:
    """'' for usable ensemble weights (finite and positive: a weight of 0 would leave a teacher out), else
    what is wrong."""
    if not all(Limit(float, 0, lo_open=True).allows(w) for w in weights):
        return "every weight must be a finite number > 0"
    return ""


@dataclass
class FitResult:
    """What a run leaves: its directory, its checkpoint, and one metrics record per epoch."""

    run_dir: str
    checkpoint: str
    history: list[dict[str, Any]]     # one record per epoch (also in metrics.jsonl)
    info: dict[str, Any]              # facts about the run, for the summary table

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record ({} when no epoch ran)."""
        return self.history[-1] if self.history else {}


def setup_distributed(device: str | None) -> tuple[Torchrun, torch.device]:
    """torchrun's environment -> a process group (nccl on GPUs, gloo on CPUs) and this rank's device."""
    job = torchrun_env()
    dev = resolve_device(device)
    if job is None or job.world == 1:
        return Torchrun(), dev
    if dev.type == "cuda":
        dev = torch.device("cuda", job.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return job, dev


def default_workers(local_world: int) -> int:
    """The most workers a process may start: one core stays with the training loop, the rest may decode.
    How many it does start is measured (`choose_workers`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, max(0, cores // local_world - 1))


# Workers pay for themselves when the work they take off the training loop is at least this share of a
# student step: below it, handing each batch over from another process (and, on a machine with few
# cores, the core a worker takes from the student) costs about as much as the work itself.
WORKER_SHARE = 0.25


@dataclass(frozen=True)
class WorkerChoice:
    """How a run feeds its student: `workers` DataLoader workers for the first pass (the decode cache
    still cold), and whether the later passes run in the training process (`in_process_when_warm`)."""

    workers: int
    in_process_when_warm: bool
    reason: str


def choose_workers(spare: int, cold_s: float, warm_s: float, step_s: float, warm_is_cached: bool) -> WorkerChoice:
    """The workers for a run, from what was measured in this process: seconds per batch to make it with the
    decode cache cold (`cold_s`: read, check and decode the images, replay the views) and warm (`warm_s`:
    replay only), and one student step (`step_s`). `spare`: the most workers allowed (default_workers).
    `warm_is_cached`: later passes find every image of theirs in the cache (it fits, and one process reads
    every training row each epoch); else they decode too, and count as cold. A pure function of its
    inputs, so the choice can be checked and is logged with them."""
    warm = warm_s if warm_is_cached else cold_s
    step = max(step_s, 1e-9)
    facts = (f"a batch takes {1e3 * cold_s:.1f} ms cold, {1e3 * warm:.1f} ms warm, the student step "
             f"{1e3 * step_s:.1f} ms; {spare} spare core(s)")
    if spare == 0:
        return WorkerChoice(0, False, f"0: no core to spare ({facts})")
    if cold_s < WORKER_SHARE * step and warm < WORKER_SHARE * step:
        return WorkerChoice(0, False, f"0: the data work is under {WORKER_SHARE:.0%} of a step ({facts})")
    if warm < WORKER_SHARE * step:
        return WorkerChoice(spare, True, f"{spare} while decoding, then 0 once the images are cached ({facts})")
    return WorkerChoice(spare, False, f"{spare}: the data work is {warm / step:.0%} of a step even when "
                                      f"cached ({facts})")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, params: list[torch.Tensor], pixels: torch.Tensor,
               teacher: Any, labels: torch.Tensor, spec: InputSpec, device: torch.device, cfg: FitConfig,
               precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step of the student on a batch already on `device`: (loss, soft, hard), unsynced."""
    x = spec.to_input(pixels)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(precision, device):
        out = model(x)
    loss, soft, hard = objective(out, teacher, labels, cfg.temperature, cfg.alpha, cfg.distill)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip_grad > 0:
        clip_grad_norm(params, cfg.clip_grad)
    optimizer.step()
    return loss, soft, hard


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_(params, max_norm), bit for bit, in fewer steps when every gradient is a
    dense tensor of one device and dtype (a student's usual case): the same foreach norms, total norm and
    scaling, without the per-call grouping by device and dtype (about half of its cost for a small student)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    first = grads[0]
    if not all(g.device == first.device and g.dtype == first.dtype and g.layout == torch.strided for g in grads):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    # On the CPU nothing is queued, so reading the factor waits for nothing; at 1 (the norm within max_norm,
    # most steps) the multiplications would leave every gradient as it is (x * 1.0 == x), so they are skipped.
    if first.device.type == "cpu" and float(coef) == 1.0:
        return
    torch._foreach_mul_(grads, coef)


def student_step_seconds(model: nn.Module, batch: dict[str, Any], spec: InputSpec, device: torch.device,
                         cfg: FitConfig, precision: str, repeats: int = 3) -> float:
    """Seconds of one training step of `model` on `batch` (the best of `repeats` after a first one), on a
    copy with its own optimizer, and the RNG state restored: the run trains exactly as if unmeasured."""
    import copy

    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None
    twin = copy.deepcopy(model).train()
    opt = make_optimizer(twin, cfg)
    params = [p for p in twin.parameters() if p.requires_grad]
    pixels = batch["pixels"].to(device)
    teacher, labels = targets_to(batch["logits"], device), batch["labels"].to(device)
    best = math.inf
    try:
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            train_step(twin, opt, params, pixels, teacher, labels, spec, device, cfg, precision)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i > 0:
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return best


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup from ~0 to 1, then a half cosine down to 0 at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# (lr, weight decay) when not given.
OPTIMIZER_DEFAULTS = {"sgd": (0.1, 5e-4), "adamw": (1e-3, 0.05)}


def lr_and_decay(optimizer: str, lr: float | None, weight_decay: float | None) -> tuple[float, float]:
    default_lr, default_wd = OPTIMIZER_DEFAULTS[optimizer]
    return (default_lr if lr is None else lr), (default_wd if weight_decay is None else weight_decay)


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales: decaying them only fights the normalisation.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    lr, wd = lr_and_decay(cfg.optimizer, cfg.lr, cfg.weight_decay)
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def _shareable_args(cfg: FitConfig) -> dict[str, Any]:
    """The run's args for the checkpoint, without storage option values (they may be credentials)."""
    args = dataclasses.asdict(cfg)
    args["storage_options"] = sorted(cfg.storage_options)
    return args


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """Write to a temporary file then rename: a crash mid-save leaves the previous checkpoint whole."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _same_stores(saved: list[dict[str, Any]], now: list[dict[str, Any]]) -> str:
    """'' if the stores are the same ones (wherever they now live), else what differs."""
    strip = lambda fps: [{k: v for k, v in fp.items() if k != "location"} for fp in fps]  # noqa: E731
    if len(saved) != len(now):
        return f"the checkpoint was trained on {len(saved)} store(s), this run gives {len(now)}"
    for i, (a, b) in enumerate(zip(strip(saved), strip(now))):
        diff = [k for k in b if a.get(k) != b.get(k)]
        if diff:
            return (f"store {i + 1} ({now[i]['location']}) differs from the checkpoint's "
                    f"({saved[i]['location']}) in {', '.join(diff)}")
    return ""


# What defines a run's training beyond its stores and student: a resumed run that changed any of
# these would not continue the same run (the optimizer state, the schedule, the sample order and
# the loss would no longer match what the checkpoint was trained with).
RECIPE = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "warmup_epochs", "clip_grad",
          "temperature", "alpha", "labels_from_folders", "holdout", "shuffle_blocks", "seed", "teachers",
          "teacher_weights", "ema", "distill")


def _recipe(args: dict[str, Any]) -> dict[str, Any]:
    """RECIPE's values as the run uses them (defaults resolved, weights normalised), from FitConfig
    fields: a checkpoint's saved args or this run's."""
    out = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in args.items() if k in RECIPE}
    opt = out.get("optimizer", "sgd")
    if opt in OPTIMIZER_DEFAULTS:
        out["lr"], out["weight_decay"] = lr_and_decay(opt, out.get("lr"), out.get("weight_decay"))
    if opt != "sgd":
        out.pop("momentum", None)  # AdamW has none
    names = out.get("teachers") or []
    weights = out.get("teacher_weights") or [1.0] * len(names)
    out["teacher_weights"] = [w / sum(weights) for w in weights] if weights else []
    return out


def _changed_recipe(saved: dict[str, Any], cfg: FitConfig) -> str:
    """'' if the checkpoint's args agree with this run's on RECIPE, else which flags differ and how."""
    old, new = _recipe(saved), _recipe(dataclasses.asdict(cfg))
    diffs = [f"--{k.replace('_', '-')} {new[k]} (checkpoint: {old[k]})"
             for k in RECIPE if k in old and k in new and old[k] != new[k]]
    return "this run gives other " + ", ".join(diffs) if diffs else ""


def _every_rank_has_rows(n: int, cfg: FitConfig, ddp: Torchrun, device: torch.device) -> bool:
    """Whether this step trains: not when a batch lost every image to --skip-mismatched. Under DDP the
    ranks decide together (one tiny all-reduce a step, only with --skip-mismatched): a rank that
    skipped a step alone would leave the others waiting in the gradient all-reduce."""
    if ddp.world == 1 or not cfg.skip_mismatched:
        return n > 0
    has = torch.tensor([1 if n > 0 else 0], dtype=torch.int32, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MIN)
    return bool(has.item())


# Batches the epoch's read-ahead thread hands over at a time: one queue hand-off (two thread wake-ups, and
# the training thread waiting for the GIL while the reader runs) per step cost a steady step of a small
# student ~4% (py-spy, benchmarks/RESULTS.md, issue 16).
READ_AHEAD_RUN = 8

_EPOCH_END = object()


class EpochRequests:
    """The requests of a run's epochs from one read-ahead thread, which reads on into the next epoch (its first
    shuffle group) while this one's last batches train and while it is scored and saved. Each epoch's own
    read-ahead used to start with it, so its first step waited for a whole group to be read (~1% of a steady
    epoch of a small student; benchmarks/RESULTS.md, issue 16). The same requests in the same order."""

    def __init__(self, make: Callable[[int], Iterable[Request]], epochs: range, run: int):
        def tagged() -> Iterator[Any]:
            for epoch in epochs:
                yield from make(epoch)
                yield _EPOCH_END
        self._items = read_ahead_in_runs(tagged(), run)

    def epoch(self) -> Iterator[Request]:
        """The next epoch's requests; iterate them to the end before asking for the next epoch."""
        return iter(lambda: next(self._items), _EPOCH_END)

    def close(self) -> None:
        """Release the thread (a run that stops early: an error, divergence)."""
        self._items.close()


# A non-finite loss is looked for every this many steps, where the progress bar reads the running
# loss: both wait for the device, so they wait at the same steps.
CHECK_EVERY = 20


class EpochMeter:
    """One epoch's running sums, kept off the host until it waits for the device anyway: reading a loss every
    step would stall the GPU queue.

    A step only keeps its three loss tensors (detached); every CHECK_EVERY steps they become one
    [k, 3] stack on the device (no wait), and they are summed on the host, in step order, where the host
    waits for the device anyway: every CHECK_EVERY steps, where the progress bar reads the loss and a single
    process looks for a non-finite loss (and stops there), and once at the end of the epoch
    (`_first_bad_step`), before the caller measures or saves anything, so NaN weights never reach a checkpoint.
    Per step that is a list append where a fused add on the device cost ~10x more (issue 16); the sums are
    the same bits (each x * n is exact in float64 and is added in the same order).
    """

    def __init__(self, device: torch.device, world: int = 1):
        self.device, self.world, self.t0 = device, world, time.perf_counter()
        self.cpu0 = time.process_time()  # every thread of this process: what the epoch cost, whatever else runs
        self._pending: list[torch.Tensor] = []   # loss, soft, hard of each step not yet stacked
        self._steps: list[tuple[int, int]] = []  # (step, n) of each of those
        self._stacked: list[tuple[list[tuple[int, int]], torch.Tensor]] = []
        self._sums = [0.0, 0.0, 0.0, 0.0]        # loss*n, soft*n, hard*n, n (summed so far)
        self._first_bad = -1                     # first step with a non-finite loss

    def add(self, step: int, n: int, loss: torch.Tensor, soft: torch.Tensor, hard: torch.Tensor) -> None:
        self._pending += (loss.detach(), soft, hard)
        self._steps.append((step, n))
        if len(self._steps) >= CHECK_EVERY:
            self._stack()

    def _stack(self) -> None:
        if self._steps:
            self._stacked.append((self._steps, torch.stack(self._pending).view(-1, 3).double()))
            self._pending, self._steps = [], []

    def _fold(self) -> None:
        """Sum what was added so far into the host sums, in step order (waits for the device)."""
        self._stack()
        sums = self._sums
        for steps, values in self._stacked:
            for (step, n), (loss, soft, hard) in zip(steps, values.tolist()):
                if self._first_bad < 0 and not math.isfinite(loss):
                    self._first_bad = step
                sums[0] += loss * n
                sums[1] += soft * n
                sums[2] += hard * n
                sums[3] += n
        self._stacked = []

    @property
    def sums(self) -> torch.Tensor:
        """[4] float64 on the device: loss*n, soft*n, hard*n and n summed over the steps so far."""
        self._fold()
        return torch.tensor(self._sums, dtype=torch.float64, device=self.device)

    @property
    def first_bad(self) -> torch.Tensor:
        """The first step (0-based) whose loss was not finite, -1 if none, as an int64 tensor on the device."""
        self._fold()
        return torch.tensor(self._first_bad, dtype=torch.int64, device=self.device)

    def diverged(self) -> bool:
        """Whether a loss of this process was not finite so far (waits for the device)."""
        self._fold()
        return self._first_bad >= 0

    def live(self) -> dict[str, float]:
        """The progress bar's fields: samples/s of every rank so far, and this rank's mean loss (waits for
        the device)."""
        self._fold()
        n = self._sums[3]
        return {"rate": n * self.world / max(1e-9, time.perf_counter() - self.t0),
                "loss": self._sums[0] / max(1.0, n)}


def train_one_epoch(model: nn.Module, batches: Iterable[dict[str, Any]], meter: EpochMeter,
                    optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                    spec: InputSpec, device: torch.device, cfg: FitConfig, precision: str,
                    ddp: Torchrun, ema: ModelEMA | None = None) -> dict[str, Any]:
    """One pass over `batches`, summed into `meter`. The record it returns holds "diverged_at" (a 0-based
    step) when a loss was not finite or the epoch left weights that are not; the caller must then save
    nothing."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    last = -1
    for step, batch in enumerate(batches):
        last = step
        pixels = batch["pixels"].to(device, non_blocking=True)
        n = len(pixels)
        if not _every_rank_has_rows(n, cfg, ddp, device):  # a batch lost every image (--skip-mismatched)
            continue
        teacher = targets_to(batch["logits"], device)
        labels = batch["labels"].to(device, non_blocking=True)
        loss, soft, hard = train_step(model, optimizer, params, pixels, teacher, labels, spec, device, cfg, precision)
        scheduler.step()
        if ema is not None:
            ema.update()
        meter.add(step, n, loss, soft, hard)
        if ddp.world == 1 and step % CHECK_EVERY == 0 and meter.diverged():
            break  # every further step would train NaN weights (under DDP the ranks stop together, below)
    sums = meter.sums
    if ddp.world > 1:
        dist.all_reduce(sums)
    bad = _first_bad_step(model, meter.first_bad, last, ddp)
    seconds = time.perf_counter() - meter.t0
    n = float(sums[3])
    record = {"lr": optimizer.param_groups[0]["lr"], "train_loss": float(sums[0]) / max(1.0, n),
              "train_kd": float(sums[1]) / max(1.0, n), "samples": int(n), "seconds": round(seconds, 3),
              "samples_per_s": n / seconds if seconds > 0 else 0.0,
              "cpu_seconds": round(time.process_time() - meter.cpu0, 3)}
    if cfg.alpha > 0:
        record["train_ce"] = float(sums[2]) / max(1.0, n)
    if bad is not None:
        record["diverged_at"] = bad
    return record


@torch.no_grad()
def _first_bad_step(model: nn.Module, first_bad: torch.Tensor, last: int, ddp: Torchrun) -> int | None:
    """The first step (0-based) of this epoch whose loss was not finite, on any rank; else `last` when
    the weights or buffers are not finite all the same (a gradient that overflowed on the last step),
    else None. One host sync (and one small all-reduce under DDP) per epoch."""
    none = torch.iinfo(torch.int64).max
    state = [t for t in model.state_dict().values() if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for t in state]).all() if state else torch.tensor(True)
    step = torch.where(first_bad >= 0, first_bad, torch.where(finite.to(first_bad.device), none, last))
    if ddp.world > 1:
        dist.all_reduce(step, op=dist.ReduceOp.MIN)
    found = int(step)
    return None if found == none else found


@torch.no_grad()
def teacher_agreement(model: nn.Module, batches: Batches, requests: Sequence[Request], spec: InputSpec,
                      device: torch.device, temperature: float, precision: str) -> dict[str, Any]:
    """How often the student's argmax is the teacher's on held-out rows, and the distillation loss there."""
    was_training = model.training
    model.eval()
    # Summed on the device (in float64, as Python floats would be) and read once at the end: no wait per batch.
    agree = kd = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for batch in batches(requests):
        if len(batch["pixels"]) == 0:
            continue
        x = spec.to_input(batch["pixels"].to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        teacher = targets_to(batch["logits"], device)
        with autocast(precision, device):
            out = model(x).float()
        m = len(x)
        agree = agree + (out.argmax(1) == teacher_top1(teacher)).sum()
        kd = kd + soft_target_loss(out, teacher, temperature).double() * m
        n += m
    model.train(was_training)
    return {"agree": float(agree) / n, "holdout_kd": float(kd) / n, "holdout_n": n} if n else {}


def fit(stores: Sequence[str | os.PathLike | LogitStore], out: str | os.PathLike, *, progress: bool = False,
        **options: Any) -> FitResult:
    """Distil a student from one or more logit stores into `out`. See `trainer fit --help`.

    `stores` are paths, zip files or URLs, or stores already opened with logitstore.open_store;
    `options` are the other fields of `FitConfig` (student="lenet", epochs=10, ...); `progress` draws a
    progress bar.
    """
    stores = list(stores)
    return run_fit(FitConfig(stores=stores, out=out, **options), progress=progress, stores=stores)


def run_fit(cfg: FitConfig, *, progress: bool = False,
            stores: Sequence[str | os.PathLike | LogitStore] | None = None) -> FitResult:
    """Run `cfg`: refuse what cannot work, join torchrun's process group when started by torchrun, train.

    `stores`: cfg.stores already open, in the same order (default: they are opened here).
    """
    cfg.check()
    keep_freed_memory()  # every step reuses its tensors' memory (logitstore/allocator.py)
    # Held for the whole run: a dump or copy cannot replace a store this fit is reading (W1, R2).
    locks: list[StoreLock] = []
    try:
        for s in cfg.stores:
            if isinstance(s, (str, os.PathLike)):
                locks.append(StoreLock(os.fspath(s), exclusive=False))
        ddp, dev = setup_distributed(cfg.device)
        try:
            return _fit(cfg, list(cfg.stores if stores is None else stores), ddp, dev, progress)
        finally:
            if ddp.world > 1 and dist.is_initialized():
                dist.destroy_process_group()
    finally:
        for lock in locks:
            lock.release()


def is_run_dir(path: Path) -> bool:
    """A directory this trainer wrote: it holds our checkpoint or our metrics (curves.png alone is a
    picture anyone may have)."""
    return (path / CHECKPOINT).is_file() or (path / METRICS).is_file()


def _check_run_dir(cfg: FitConfig, protected: Sequence[str | os.PathLike | None]) -> None:
    """--out may be absent, empty, or a run of ours; never the inputs, '/', or the current directory."""
    check_local_destination(cfg.out, is_ours=is_run_dir, what="run directory", protected=protected, flag="--out")


def _diverged(cfg: FitConfig, epoch: int, step: int, steps: int, saved_epoch: int, ckpt_path: Path) -> DivergedError:
    """The one line for a run whose loss stopped being finite: where, why it usually happens, what is kept."""
    lr, _ = lr_and_decay(cfg.optimizer, cfg.lr, cfg.weight_decay)
    if saved_epoch:
        kept = f"{ckpt_path} still holds epoch {saved_epoch}, the last good one"
    elif cfg.overwrite and ckpt_path.exists():
        kept = f"no checkpoint of this run was written ({ckpt_path} is still the earlier run's)"
    else:
        kept = "no checkpoint was written"
    return DivergedError(
        f"training diverged in epoch {epoch}, step {step + 1} of {steps}: the loss or the weights are not "
        f"finite (NaN or inf). Likely causes: a learning rate too high for this student (--lr {lr:g}; try a "
        f"lower --lr, a longer --warmup-epochs or --clip-grad), or a store holding non-finite logits (check it "
        f"with `logitstore verify STORE`); {kept}")


def _measure_workers(spare: int, batches: Batches, data: Any, model: nn.Module, spec: InputSpec,
                     dev: torch.device, cfg: FitConfig, precision: str, ddp: Torchrun, epoch: int) -> WorkerChoice:
    """Time this run's first batches (decoded into the cache, where the epoch finds them) and a student
    step, once, and choose the workers from that (`choose_workers`)."""
    if spare == 0:
        return choose_workers(0, 0.0, 0.0, 0.0, True)
    requests = data.requests(epoch, cfg.batch_size, cfg.seed, ddp.rank, ddp.world, cfg.shuffle_blocks)
    first = []
    for req in requests:
        first.append(req)
        if len(first) == 2:
            break
    requests.close()
    cold, warm = time_source(batches.source, first)
    sample = batches.source.__getitems__(first[0]) if first else None
    if not isinstance(sample, dict) or len(sample["pixels"]) < 2:  # nothing to time (or a failure, met later)
        return WorkerChoice(spare, False, f"{spare}: nothing could be timed")
    step = student_step_seconds(model, sample, spec, dev, cfg, precision)
    cached = batches.source.cache.n_cacheable == len(data) and ddp.world == 1
    return choose_workers(spare, cold, warm, step, cached)


def _fit(cfg: FitConfig, stores: list[Any], ddp: Torchrun, dev: torch.device, progress: bool) -> FitResult:
    run_dir = Path(cfg.out)
    ckpt_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    # Before anything is read or created: a mistyped --out must never touch the user's files or the inputs.
    _check_run_dir(cfg, [*cfg.stores, *(cfg.images or []), cfg.eval_images])
    if cfg.resume and not ckpt_path.is_file():
        raise RunDirError(f"{ckpt_path}: no checkpoint to resume from; drop --resume to start a new run")
    if not cfg.resume and ckpt_path.exists() and not cfg.overwrite:
        raise RunDirError(f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                          "--overwrite to start again, or choose another --out")
    precision = resolve_precision(cfg.precision, dev, TRAIN_PRECISIONS)

    # --- data, student, evaluation set --------------------------------------------------------
    data = open_stores(stores, cfg.images, cfg.holdout, cfg.labels, cfg.labels_from_folders,
                       teachers=cfg.teachers, teacher_weights=cfg.teacher_weights, temperature=cfg.temperature,
                       storage_options=cfg.storage_options)
    if cfg.images is None:  # the corpus roots recorded in the stores are inputs too
        _check_run_dir(cfg, data.roots)
    if cfg.alpha > 0 and data.views.mix is not None:  # 1.5 mix stores
        raise ConfigError(f"--alpha: {cfg.stores[0]} stores mixed views (mixup/cutmix), whose inputs are two images "
                          "each, so one image's label does not fit them; distil from the teacher alone (--alpha 0)")
    if cfg.alpha > 0 and data.n_labeled == 0:
        if cfg.labels_from_folders:
            raise ConfigError("--alpha needs hard labels, and --labels-from-folders found none: no image id lies in a "
                              "folder named after one of the store's classes (such as '3/img.png'); pass --labels "
                              "FILE, or --alpha 0")
        raise ConfigError("--alpha needs hard labels, and none of the store's images has one; pass --labels FILE "
                          "or --labels-from-folders (or --alpha 0)")
    rows_per_rank = data.rows_per_rank(ddp.world)
    if rows_per_rank == 0:
        raise ConfigError(f"{data.n_train} training images cannot be shared by {ddp.world} processes")
    arch = resolve_student(cfg.student)
    spec = make_input_spec(data.pre, cfg.input_size, cfg.in_channels or natural_in_channels(arch, data.pre.channels))
    folder = labeled_folder(cfg.eval_images, data.classes) if cfg.eval_images else None
    torch.manual_seed(cfg.seed)
    model, arch_kwargs = build_student(arch, len(data.classes), spec.channels, spec.size, cfg.student_kwargs)
    # A DeiT-style student (two heads in training) trains its class head on the labels itself (loss.py).
    two_heads = training_heads(model, arch, spec.channels, spec.size) == 2
    if two_heads and cfg.alpha > 0:
        raise ConfigError(f"--alpha: {arch} trains two heads, and its class head takes the labels with weight 1/2 "
                          "(DeiT's loss, see `trainer fit --help`); drop --alpha, keep --labels")
    if not two_heads and cfg.alpha == 0 and (cfg.labels or cfg.labels_from_folders):
        raise ConfigError("labels were given but --alpha is 0, so they would be ignored; pass --alpha A")
    weights_note = None
    if cfg.student_weights and not cfg.resume:  # a resumed run takes its weights from its checkpoint
        weights_note = load_student_weights(model, cfg.student_weights, len(data.classes))
    model = model.to(dev)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = ModelEMA(model, cfg.ema) if cfg.ema else None

    # --- optimisation, and where a resumed run picks up ---------------------------------------
    optimizer = make_optimizer(model, cfg)
    steps = batches_per_epoch(rows_per_rank, cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps, round(cfg.warmup_epochs * steps)))
    start_epoch, history = 0, []
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["arch"] != arch or dict(ckpt.get("arch_kwargs") or {}) != arch_kwargs:
            raise RunDirError(f"{ckpt_path} holds a {ckpt['arch']} {ckpt.get('arch_kwargs')} student, this run asks "
                              f"for {arch} {arch_kwargs}; resume with the same --student and --student-kwargs")
        diff = _same_stores(ckpt.get("stores") or [], data.fingerprints())
        if diff:
            raise StoreMismatchError(f"--resume: {diff}; resume with the stores the run started with")
        changed = _changed_recipe(ckpt.get("args") or {}, cfg)
        if changed:
            raise RunDirError(f"--resume: {changed} than the run in {run_dir}; resume with the run's own flags, "
                              "or start a new run with another --out")
        if ema is not None and "raw_state_dict" not in ckpt:
            raise RunDirError(f"--resume --ema: {ckpt_path} was trained without --ema; resume it without --ema")
        # With --ema the checkpoint's state_dict is the average (what users take away); the raw weights train on.
        model.load_state_dict(ckpt["raw_state_dict"] if ema is not None else ckpt["state_dict"])
        if ema is not None:
            ema.load(ckpt["state_dict"], ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_epoch = int(ckpt["epoch"])
        history = [r for r in report.read_metrics(metrics_path) if r["epoch"] <= start_epoch]
        if start_epoch >= cfg.epochs and ddp.main:
            print(f"trainer: {run_dir} has trained all its {cfg.epochs} epoch(s): nothing to resume; its student is "
                  f"{ckpt_path}", file=sys.stderr)
    if ddp.world > 1:
        dist.barrier()  # every rank has judged --out (_check_run_dir) before rank 0 writes into it
    if ddp.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        report.write_metrics(metrics_path, history)
    train_model = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None) \
        if ddp.world > 1 else model
    if cfg.compile:
        example = torch.zeros(min(cfg.batch_size, rows_per_rank), spec.channels, *spec.size, device=dev)
        if dev.type == "cuda":  # the layout the loop feeds (a compiled graph is specialised to its strides)
            example = example.contiguous(memory_format=torch.channels_last)
        train_model = compile_student(train_model, example, precision)

    # --- the pipeline: one DataLoader, whose workers fill one shared decode cache ---------------
    budget = default_cache_bytes(ddp.local_world) if cfg.cache_images is None else int(cfg.cache_images * 2 ** 30)
    workers = default_workers(ddp.local_world) if cfg.num_workers is None else cfg.num_workers
    batches = make_batches(data, spec, budget, workers, cfg.skip_mismatched, pin_memory=dev.type == "cuda")
    cache = batches.source.cache
    worker_choice, eval_workers = (f"{workers} ({'--num-workers' if cfg.num_workers is not None else 'default'})",
                                   workers)  # a labeled folder is decoded every time
    if cfg.num_workers is None and start_epoch < cfg.epochs:
        choice = _measure_workers(workers, batches, data, model, spec, dev, cfg, precision, ddp, start_epoch)
        workers, batches.num_workers = choice.workers, choice.workers
        batches.in_process_when_warm, worker_choice = choice.in_process_when_warm, choice.reason
    held_out = data.holdout_requests(cfg.batch_size) if ddp.main else []

    info = {"stores": ", ".join(cfg.stores), "images": f"{len(data):,} ({data.n_train:,} train, "
            f"{data.n_held_out:,} held out, {len(data.holdout) if data.holdout is not None else 0:,} scored)",
            "student": f"{arch} ({sum(p.numel() for p in model.parameters()):,} parameters)",
            "device": f"{dev} ({precision}), {ddp.world} process(es) x {workers} worker(s)",
            "decode cache": f"{human_bytes(cache.nbytes)} of {human_bytes(cache.needed)} needed",
            "workers": worker_choice}
    # The repeat horizon: each image replays view (offset + epoch) % V (order.epoch_views), so V epochs
    # pass before any image sees a view again.
    info["views"] = (f"{data.view_count} stored per image ({data.view_kind}; augment: {describe_policy(data.views)}): "
                     f"{data.view_count} epoch(s) before a view repeats")
    info["view_repeat_epochs"] = data.view_count
    # Only for random views: an eval store's one deterministic view is meant to be seen every epoch.
    if cfg.epochs > data.view_count and data.view_kind != EVAL and ddp.main and start_epoch < cfg.epochs:
        print(f"trainer: warning: --epochs {cfg.epochs} is more than the {data.view_count} view(s) stored per image: "
              f"from epoch {data.view_count + 1} on, views repeat (dump more --views for a patient teacher)",
              file=sys.stderr)
    if weights_note:
        info["student weights"] = weights_note
    if ema is not None:
        info["ema"] = f"decay {cfg.ema:g}: held-out metrics and checkpoint state_dict are the average's"
    bar = progress_bar(progress and ddp.main, unit="samples")
    # The epochs this run trains (--stop-after ends it early): the stream reads ahead exactly these.
    end = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, start_epoch + cfg.stop_after)
    epochs = range(start_epoch, end)
    # Stores with embedded pixels: one batch at a time, so no more pixel batches wait than before.
    stream = EpochRequests(lambda e: data.requests(e, cfg.batch_size, cfg.seed, ddp.rank, ddp.world,
                                                   cfg.shuffle_blocks),
                           epochs, 1 if data.embedded else READ_AHEAD_RUN)
    with bar, contextlib.closing(stream), contextlib.closing(batches):
        for epoch in epochs:
            task = bar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps)
            requests = stream.epoch()
            meter = EpochMeter(dev, ddp.world)
            epoch_batches = batches(requests)
            if ddp.main:  # only rank 0 draws the bar; the other ranks need not wait for their devices
                epoch_batches = report.log_every(epoch_batches, bar, task, CHECK_EVERY, meter.live)
            record = {"epoch": epoch + 1, **train_one_epoch(train_model, epoch_batches, meter, optimizer, scheduler,
                                                            spec, dev, cfg, precision, ddp, ema)}
            bar.update(task, rate=record["samples_per_s"], loss=record["train_loss"])
            # Every rank has the same verdicts (reduced in train_one_epoch), so all stop together.
            if "diverged_at" in record:
                raise _diverged(cfg, epoch + 1, record["diverged_at"], steps, epoch, ckpt_path)
            # On the training device: NCCL (GPU runs) reduces device tensors only.
            skipped = torch.from_numpy((cache.flags == SKIPPED).astype("uint8")).to(dev)
            if ddp.world > 1:  # an image may be met (and skipped) by a different rank each epoch
                dist.all_reduce(skipped, op=dist.ReduceOp.MAX)
            record["skipped"] = int(skipped.sum())
            if record["samples"] == 0:
                # Ending 'done' here would save an untrained student as if it had learned something.
                raise ImageError(
                    f"epoch {epoch + 1} trained on no images: --skip-mismatched left out every one it read "
                    f"({record['skipped']} missing or not matching their stored digests); point --images at the "
                    "corpus the store was dumped from (`logitstore verify STORE --images DIR` names the "
                    "differences)" if cfg.skip_mismatched else f"epoch {epoch + 1} trained on no images")
            if ddp.main:
                kept = model if ema is None else ema.module  # the model users take away is measured
                record.update(teacher_agreement(kept, batches, held_out, spec, dev, cfg.temperature, precision))
                if folder is not None:
                    res = evaluate_model(kept, folder, spec, dev, cfg.batch_size, eval_workers, precision)
                    record.update({"eval_top1": res.top1, "eval_top5": res.top5, "eval_n": res.n})
                save_checkpoint(ckpt_path, {
                    "arch": arch, "arch_kwargs": arch_kwargs, "state_dict": kept.state_dict(),
                    **({} if ema is None else {"raw_state_dict": model.state_dict(), "ema": ema.state_dict()}),
                    "classes": list(data.classes), "preprocess": spec.student_preprocess(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1, "args": _shareable_args(cfg), "stores": data.fingerprints(),
                    "rng": {"torch": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else []}})
                history.append(record)
                report.write_metrics(metrics_path, history)
                # Redraw every epoch only when epochs are long enough for a ~0.5 s plot not to matter.
                if record["seconds"] > 60:
                    report.plot_curves(history, run_dir / CURVES)
            if ddp.world > 1:
                dist.barrier()
    if ddp.main and history:
        report.plot_curves(history, run_dir / CURVES)
    info["skipped images"] = history[-1]["skipped"] if history else 0
    return FitResult(str(run_dir), str(ckpt_path), history, info)

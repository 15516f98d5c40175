"""`trainer` command line: parse flags, call the library, print. User errors are one line, exit 2."""
from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from logitstore.cli_common import emit_json, json_flag, number, one_line_errors, parse_size, storage_option_flag
from logitstore.errors import LogitStoreError
from logitstore.locations import parse_storage_options

from .errors import TrainerError
from .fit import LIMITS, teacher_weights_problem


def _number(name: str) -> click.ParamType:
    """The flag type for a numeric FitConfig field: the library's own limit (trainer.fit.LIMITS)."""
    return number(LIMITS[name])


def _weights(text: str | None) -> list[float] | None:
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint="--teacher-weights") \
            from None
    problem = teacher_weights_problem(weights)
    if problem:
        raise click.BadParameter(f"{text!r}: {problem}", param_hint="--teacher-weights")
    return weights


@click.group(cls=one_line_errors("trainer", (TrainerError, LogitStoreError), on_interrupt=(
    "interrupted; checkpoint.pt in --out holds the last finished epoch, if any (continue with --resume)")))
@click.version_option(package_name="logitstore")
def main() -> None:
    """Distil image classifiers from stores of teacher logits (no teacher in memory)."""


TRUST_HELP = ("Trust a module named inside checkpoint files as a model factory (repeatable; also "
              "LOGITSTORE_TRUST_MODULES=a,b). An architecture you type yourself is trusted by that act.")
STUDENT_HELP = ("Student network: a built-in (lenet, cifar_resnet, tiny_deit), torchvision:NAME (e.g. "
                "torchvision:resnet18), timm:NAME (e.g. timm:resnet18; built with in_chans = the store's channels), "
                "or package.module:factory (called with num_classes and in_channels where it takes them). A student "
                "returning (class, distillation) logits in training, like DeiT, trains both heads (--distill).")


@main.command()
@click.option("--store", "stores", multiple=True, required=True, type=click.Path(),
              help="Logit store written by `logitstore dump`. Repeat to read several stores of the same teacher "
                   "(same classes, preprocessing and views) as one dataset.")
@click.option("--images", multiple=True, type=click.Path(),
              help="Where the corpus is now: a folder, a URL, or the folder, prefix or pattern of its shards or "
                   "tables [default: the root recorded in the store]; once per --store.")
@click.option("--student", default="lenet", show_default=True, help=STUDENT_HELP)
@click.option("--student-kwargs", default=None, help="JSON object of extra keyword arguments for the student factory.")
@click.option("--student-weights", default=None, type=click.Path(dir_okay=False),
              help="Start from these weights: a .safetensors file, a torch state dict or a checkpoint (read without "
                   "running code). A classifier head sized for other classes is re-initialised (noted).")
@click.option("--ema", default=None, type=_number("ema"),
              help="Keep an exponential moving average of the weights with this decay (e.g. 0.999): it is measured "
                   "and saved as the checkpoint's state_dict (the raw weights are kept for --resume) [default: off].")
@click.option("--compile", "compile", is_flag=True,
              help="torch.compile the student (compiled before the first step: a failure stops the run in one line).")
@click.option("--distill", default="soft", show_default=True, type=click.Choice(["soft", "hard"]),
              help="soft: T^2 KL to the teacher's softmax at -T; hard: cross-entropy to the teacher's top-1 class "
                   "(per view). A two-head (DeiT) student: 1/2 distillation head + 1/2 class head, where the class "
                   "head learns the labels where images have one, else the same target.")
@click.option("--out", "--output-dir", "out", required=True, type=click.Path(file_okay=False),
              help="Run directory: checkpoint.pt (latest epoch), metrics.jsonl, curves.png.")
@click.option("--epochs", default=10, show_default=True, type=_number("epochs"),
              help="Passes over the stores' training rows.")
@click.option("--batch-size", "-b", default=128, show_default=True, type=_number("batch_size"),
              help="Images per step, per process.")
@click.option("--lr", default=None, type=_number("lr"), help="Peak learning rate [default: 0.1 sgd, 0.001 adamw].")
@click.option("--optimizer", default="sgd", show_default=True, type=click.Choice(["sgd", "adamw"]),
              help="SGD with Nesterov momentum, or AdamW.")
@click.option("--momentum", default=0.9, show_default=True, type=_number("momentum"),
              help="SGD (Nesterov) momentum, in [0, 1).")
@click.option("--weight-decay", "--wd", "weight_decay", default=None, type=_number("weight_decay"),
              help="On weights, not biases or norms [default: 5e-4 sgd, 0.05 adamw].")
@click.option("--warmup-epochs", default=1.0, show_default=True, type=_number("warmup_epochs"),
              help="Linear warmup, then a cosine decay to 0 over the remaining epochs (stepped every batch).")
@click.option("--clip-grad", default=5.0, show_default=True, type=_number("clip_grad"),
              help="Max gradient norm; 0 turns it off.")
@click.option("--temperature", "-T", default=4.0, show_default=True, type=_number("temperature"),
              help="Distillation temperature: loss = T^2 KL(softmax(t/T) || softmax(s/T)), in float32. Stores "
                   "dumped with --topk/--sample serve only the temperatures they keep (`logitstore info`).")
@click.option("--alpha", default=0.0, show_default=True, type=_number("alpha"),
              help="Weight of a cross-entropy on hard labels, where images have one (needs --labels or "
                   "--labels-from-folders).")
@click.option("--labels", default=None, type=click.Path(dir_okay=False),
              help="Hard labels: a JSON object {image id: class} or CSV lines 'image id,class' (a header row is "
                   "skipped).")
@click.option("--labels-from-folders", is_flag=True,
              help="Hard label = an image's parent folder name, where that is a class name.")
@click.option("--eval", "eval_images", default=None, type=click.Path(),
              help="Labeled test folder (one sub-folder per class, named after the store's classes); top-1/top-5 "
                   "each epoch.")
@click.option("--holdout", default=0.02, show_default=True, type=_number("holdout"),
              help="Fraction of each block's rows kept out of training, to measure agreement with the teacher "
                   "(each pass scores the tails of at most max(64, 10%) of the blocks, evenly spaced).")
@click.option("--shuffle-blocks", default=8, show_default=True, type=_number("shuffle_blocks"),
              help="Blocks shuffled together (the shuffle buffer). A block is a chunk of the store, or several "
                   "consecutive chunks when chunks are under 2048 rows; block order is reshuffled every epoch.")
@click.option("--cache-images", default=None, type=_number("cache_images"),
              help="GiB of RAM for decoded images, so each is decoded once per run [default: half the available "
                   "memory]; 0 decodes every epoch.")
@click.option("--skip-mismatched", is_flag=True,
              help="Leave out (and count) images that are missing or differ from their stored digest, instead of "
                   "stopping.")
@click.option("--input-size", default=None, help="Student input H,W [default: the teacher's]; only the final "
                                                 "resize changes.")
@click.option("--in-channels", default=None, type=_number("in_channels"),
              help="Student input channels [default: the store's; 3 for torchvision:*]; 3 on a greyscale store "
                   "repeats the grey channel.")
@click.option("--device", default="auto", show_default=True, help="cuda when present, else cpu.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 autocast (and channels_last) on GPU, fp32 on CPU.")
@click.option("--num-workers", "-j", default=None, type=_number("num_workers"),
              help="Image decoding processes per training process [default: measured at the start: up to "
                   "cores - 1 (at most 8) while the decode cache fills, and none once it holds every image, "
                   "when a batch's work is too small a share of a student step to hand over; logged as 'workers'].")
@click.option("--seed", default=0, show_default=True, type=_number("seed"),
              help="Seeds the student's initialisation, the chunk order, the shuffles and the view choice.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.pt.")
@click.option("--overwrite", is_flag=True, help="Start again in an --out that already holds a run.")
@click.option("--stop-after", default=None, type=_number("stop_after"),
              help="End this invocation after N epochs (the schedule still spans --epochs); continue with --resume.")
@click.option("--teachers", default=None,
              help="Distil from an ensemble of the store's teachers, e.g. primary,big (see `logitstore dump "
                   "--add-teacher`): their softmaxes at --temperature, averaged [default: primary only].")
@click.option("--teacher-weights", default=None,
              help="Comma-separated weight per --teachers entry, each > 0 [default: equal].")
@storage_option_flag
@click.option("--quiet", is_flag=True, help="No progress bar and no summary table.")
@json_flag
def fit(as_json: bool, **kw: Any) -> None:
    """Distil a student from logit stores: `trainer fit --store cache.zarr --student lenet --out runs/a`."""
    from .fit import FitConfig, run_fit
    from .report import summary_table

    quiet = kw.pop("quiet")
    kw["stores"] = list(kw["stores"])
    kw["input_size"] = parse_size(kw["input_size"], "--input-size")
    kw["images"] = list(kw["images"]) or None
    kw["teachers"] = kw["teachers"].split(",") if kw["teachers"] else None
    kw["teacher_weights"] = _weights(kw["teacher_weights"])
    kw["storage_options"] = parse_storage_options(kw.pop("storage_option"))
    result = run_fit(FitConfig(**kw), progress=not (quiet or as_json))
    if as_json:
        emit_json(result)
        return
    if result.history and not quiet:
        Console().print(summary_table(result.history, result.info))
        click.echo(f"checkpoint: {result.checkpoint}")


@main.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A student checkpoint (RUN_DIR/checkpoint.pt), or any checkpoint in that format.")
@click.option("--images", required=True, type=click.Path(),
              help="Labeled folder: one sub-folder per class, named after the checkpoint's classes.")
@click.option("--batch-size", "-b", default=256, show_default=True, type=_number("batch_size"),
              help="Images per forward pass.")
@click.option("--device", default="auto", show_default=True, help="cuda when present, else cpu.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 autocast on GPU, fp32 on CPU.")
@click.option("--num-workers", "-j", default=0, show_default=True, type=_number("num_workers"),
              help="Image decoding processes.")
@click.option("--trust-module", "trust_modules", multiple=True, metavar="NAME", help=TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_(checkpoint: str, images: str, batch_size: int, device: str, precision: str, num_workers: int,
          trust_modules: tuple[str, ...], as_json: bool) -> None:
    """Top-1 and top-5 accuracy of a saved student on a labeled folder."""
    from .evaluate import evaluate

    res = evaluate(checkpoint, images, batch_size=batch_size, device=device, num_workers=num_workers,
                   precision=precision, trust_modules=list(trust_modules))
    if as_json:
        click.echo(json.dumps(res.to_dict()))
        return
    t = Table(title=f"trainer eval {checkpoint}", show_header=False)
    t.add_row("images", f"{res.n:,}")
    t.add_row("top-1", f"{100 * res.top1:.2f}%")
    t.add_row(f"top-{res.k}", f"{100 * res.top5:.2f}%")
    Console().print(t)


if __name__ == "__main__":
    main()

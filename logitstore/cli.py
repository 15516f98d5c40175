"""`logitstore` command line: parse flags, call the library, print. Errors are one line, exit 2."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from . import limits
from .cli_common import emit_json, human_bytes, json_flag, number, one_line_errors, parse_size, storage_option_flag
from .errors import DumpInterrupted, LogitStoreError
from .locations import parse_storage_options
from .teacher.job import DUMP_LIMITS

console = Console(stderr=True)


def _floats(text: str | None, name: str, count: int | None = None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers", param_hint=name) from None
    if not vals or not all(math.isfinite(v) for v in vals):
        raise click.BadParameter(f"{text!r}: expected finite comma-separated numbers", param_hint=name)
    if count is not None and len(vals) != count:
        raise click.BadParameter(f"{text!r}: expected {count} comma-separated numbers", param_hint=name)
    return vals


def _describe_targets(t: dict[str, Any]) -> str:
    temps = ",".join(f"{x:g}" for x in t.get("temperatures", []))
    if t["kind"] == "topk":
        return f"; top-{t['k']} + tail log-sum-exp at T = {temps}"
    if t["kind"] == "sample":
        return f"; {t['k']} draws at T = {t['proposal_temperature']:g}, exact at T = {temps}"
    return ""


def _count(lo: int = 1, hi: int | None = None) -> click.ParamType:
    return number(limits.count(lo, hi))


def _real(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> click.ParamType:
    return number(limits.real(lo, hi, lo_open))


def _dump_number(name: str) -> click.ParamType:
    """The flag type of a DumpConfig number: the library's own limit."""
    return number(DUMP_LIMITS[name])


@click.group(cls=one_line_errors("logitstore", (LogitStoreError,), {DumpInterrupted: 130}, on_interrupt=(
    "interrupted; a store being written is left incomplete and the same command finishes it")))
@click.version_option(package_name="logitstore")
def main() -> None:
    """Run a teacher once over an image corpus and keep its raw logits in a Zarr v3 store."""


TEACHER_HELP = """Teacher, one of:
(1) a checkpoint FILE saved with torch.save of a dict {arch, arch_kwargs, state_dict, classes?, preprocess?}
(loaded with weights_only=True; students saved by `trainer fit` are such files);
(2) a TorchScript FILE (torch.jit.save) or a torch.export program FILE ending in .pt2;
(3) timm:NAME with --weights FILE or --pretrained (timm's cache), its preprocessing from timm's data config;
(4) torchvision:NAME with --weights ENUM (IMAGENET1K_V2, DEFAULT, ...; the file from the torch hub cache)
or --weights FILE, preprocessing and categories from the weights' metadata;
(5) hf:DIR, a Hugging Face save_pretrained directory (config.json, model.safetensors,
preprocessor_config.json), never running the directory's own code;
(6) package.module:factory with --weights FILE (a state dict: torch.save or .safetensors).
Pickled whole nn.Module files are refused. `logitstore teacher SPEC` shows what a teacher would use."""


WEIGHTS_HELP = ("For --teacher NAME: a state-dict FILE (torch.save or .safetensors), or for torchvision:NAME a "
                "weights name (IMAGENET1K_V2, DEFAULT) read from the torch hub cache.")
PRETRAINED_HELP = ("timm:NAME: its pretrained weights from this machine's Hugging Face or torch hub cache; "
                   "torchvision:NAME: --weights DEFAULT. Nothing is downloaded.")


@main.command()
@click.option("--teacher", required=True, help=TEACHER_HELP)
@click.option("--weights", default=None, help=WEIGHTS_HELP)
@click.option("--pretrained", is_flag=True, help=PRETRAINED_HELP)
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for the architecture factory.")
@click.option("--images", default=None, type=click.Path(),
              help="Folder of images (walked recursively), a text file listing image paths or URLs, a URL "
                   "prefix of images, WebDataset .tar shards (a folder, prefix or brace pattern such as "
                   "shards/{00000..00099}.tar) or Parquet/Arrow files (with --image-column).")
@click.option("--image-column", default=None, help="Parquet/Arrow corpora: the column holding each image "
              "(bytes, or a Hugging Face {bytes, path} struct).")
@click.option("--id-column", default=None, help="Parquet/Arrow corpora: a column of ids [default: the row number].")
@click.option("--max-failure-share", default=0.5, show_default=True, type=_dump_number("max_failure_share"),
              help="Stop (store left incomplete) when more than this share of images fail, judged after "
                   "1,000 images; a dump whose images all fail always stops.")
@click.option("--out", required=True, help="Store to write (a directory ending .zarr), or a URL.")
@click.option("--add-teacher", is_flag=True,
              help="Add this teacher to the complete store at --out (same images, matched by digest; the "
                   "stored views replayed), for ensembles. --images defaults to the store's corpus.")
@click.option("--teacher-name", default=None, help="Name of the added teacher [default: file stem].")
@click.option("--views", default=1, show_default=True, type=_dump_number("views"),
              help="1: the deterministic eval view; V>1: V random resized crops (+flip) per image.")
@click.option("--seed", default=0, show_default=True, type=_dump_number("seed"), help="Seed of the random views.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Storage dtype of the logits.")
@click.option("--device", default="auto", show_default=True, help="cuda when present, else cpu.")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="Teacher compute precision (auto: bf16 autocast on GPU, fp32 on CPU).")
@click.option("--batch-size", default=64, show_default=True, type=_dump_number("batch_size"))
@click.option("--num-workers", default=None, type=_dump_number("num_workers"), help="Decoding processes [default: min(8, cores)].")
@click.option("--size", default=None, help="Teacher input H,W (overrides the checkpoint's; without --resize, its resize is scaled alike).")
@click.option("--resize", default=None, type=_dump_number("resize"), help="Resize the shorter side to this, then center-crop --size.")
@click.option("--mean", default=None, help="Per-channel mean, comma-separated, on the 0-1 scale.")
@click.option("--std", default=None, help="Per-channel std, comma-separated, on the 0-1 scale.")
@click.option("--mode", default=None, type=click.Choice(["RGB", "L"]), help="Colour mode the teacher takes.")
@click.option("--classes", default=None, help="Class names: comma-separated, or a file with one per line.")
@click.option("--crop-scale", default="0.08,1.0", show_default=True, help="Random crop area range (V>1).")
@click.option("--crop-ratio", default="0.75,1.3333333", show_default=True, help="Random crop aspect range (V>1).")
@click.option("--flip-prob", default=0.5, show_default=True, type=_dump_number("flip_prob"), help="Horizontal flip probability (V>1).")
@click.option("--augment", default="none", show_default=True,
              type=click.Choice(["none", "rand-augment", "trivial-augment"]),
              help="Format 1.5: RandAugment or TrivialAugmentWide on each random view, its ops and magnitudes "
                   "stored and replayed by the trainer (docs/FORMAT.md, 1.5: augmented views).")
@click.option("--augment-ops", default=2, show_default=True, type=_dump_number("augment_ops"),
              help="--augment rand-augment: ops per view.")
@click.option("--augment-magnitude", default=9, show_default=True, type=_dump_number("augment_magnitude"),
              help="--augment rand-augment: magnitude bin, 0..30.")
@click.option("--erase", default=0.0, show_default=True, type=_dump_number("erase"),
              help="Random erasing probability per view (box and constant fill stored).")
@click.option("--mixup", default=0.0, show_default=True, type=_dump_number("mixup"),
              help="Mixup Beta alpha (0: off): the teacher sees the view mixed with another image's; partner, "
                   "lambda stored.")
@click.option("--cutmix", default=0.0, show_default=True, type=_dump_number("cutmix"),
              help="CutMix Beta alpha (0: off); with --mixup too, half the mixed views use each.")
@click.option("--mix-prob", default=1.0, show_default=True, type=_dump_number("mix_prob"),
              help="Share of views that --mixup/--cutmix mix. Any augmentation makes --views 1 a random view.")
@click.option("--chunk-rows", default=None, type=_dump_number("chunk_rows"), help="Rows per chunk [default: ~4 MiB of logits].")
@click.option("--keep-bits", default=None, type=_dump_number("keep_bits"),
              help="Lossy logits: keep this many mantissa bits (BitRound); see benchmarks/RESULTS.md for "
                   "bytes against KL [default: lossless].")
@click.option("--topk", default=None, type=_dump_number("topk"),
              help="Large label spaces: keep each view's K largest logits and their classes, plus the rest's "
                   "log-sum-exp at --temperatures (exact top-K and tail probabilities there; docs/FORMAT.md).")
@click.option("--sample", default=None, type=_dump_number("sample"),
              help="Large label spaces, unbiased: keep K draws from the teacher's softmax at --sample-temperature "
                   "(classes, counts, logits, proposal probabilities) and the full log-sum-exp at --temperatures.")
@click.option("--temperatures", default=None,
              help="With --topk/--sample: the temperatures students may distil at [default: 1,2,4,8].")
@click.option("--sample-temperature", default=None, type=_dump_number("sample_temperature"),
              help="With --sample: the proposal's temperature, one of --temperatures; use the training "
                   "temperature or above [default: 4].")
@click.option("--embed-images", is_flag=True,
              help="Also store every view's preprocessed uint8 pixels, so the store trains without the corpus.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store at --out (a logitstore store only).")
@click.option("--trust-module", "trust_module", multiple=True, metavar="MODULE",
              help="Trust MODULE as a model factory when a checkpoint names it (repeatable; also "
                   "LOGITSTORE_TRUST_MODULES=a,b). A checkpoint may otherwise name only torchvision:NAME, "
                   "timm:NAME or a built-in student; an architecture you type in --teacher is trusted.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@json_flag
@storage_option_flag
@click.option("--segment-rows", default=None, type=_dump_number("segment_rows"),
              help="Under torchrun: listing positions per unit of work, a multiple of --batch-size "
                   "[default: about 8 segments per process, at most 64 chunks each].")
def dump(as_json: bool, **kw: Any) -> None:
    """Run a teacher over an image corpus and store its raw logits (resumes an interrupted run).

    Under torchrun (`torchrun --nproc-per-node K -m logitstore dump ...`) the K processes share the
    work, one GPU each; a killed job is finished by the same command, with any number of processes.
    """
    from .teacher.job import DumpConfig
    from .teacher.local import run_dump

    try:
        kw["arch_kwargs"] = json.loads(kw["arch_kwargs"]) if kw["arch_kwargs"] else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc})", param_hint="--arch-kwargs") from None
    kw.update(storage_options=parse_storage_options(kw.pop("storage_option")),
              progress=not (kw.pop("quiet") or as_json),
              trust_modules=kw.pop("trust_module"), size=parse_size(kw["size"], "--size"),
              mean=_floats(kw["mean"], "--mean"), std=_floats(kw["std"], "--std"),
              crop_scale=_floats(kw["crop_scale"], "--crop-scale", 2),
              crop_ratio=_floats(kw["crop_ratio"], "--crop-ratio", 2),
              temperatures=_floats(kw["temperatures"], "--temperatures"))
    add, name = kw.pop("add_teacher"), kw.pop("teacher_name")
    if add and (kw["augment"] != "none" or kw["erase"] or kw["mixup"] or kw["cutmix"]):
        raise click.UsageError("--add-teacher replays the store's own views; drop --augment/--erase/--mixup/--cutmix")
    if add:
        _add_teacher(kw, name, as_json)
        return
    if kw["images"] is None:
        raise click.UsageError("Missing option '--images' (a folder of images or a listing file).")
    summary = run_dump(DumpConfig(**kw))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 reports for the job
        return
    if as_json:
        emit_json(summary, images_per_s=summary.images_per_s)
        return
    if summary.nothing_to_do:
        click.echo(f"OK: {summary.out} is already complete with this recipe ({summary.n_images:,} images); "
                   "nothing to do")
        return
    t = Table(title=f"logitstore dump -> {summary.out}", show_header=False)
    rows = [("images stored", f"{summary.n_images:,}"), ("failed (recorded)", f"{summary.n_failed:,}"),
            ("views x classes", f"{summary.views} x {summary.num_classes}"),
            ("dtype / precision / device", f"{summary.dtype} / {summary.precision} / {summary.device}"),
            ("resumed from row", f"{summary.resumed_rows:,}"), ("time", f"{summary.seconds:.1f} s"),
            ("throughput", f"{summary.images_per_s:,.1f} images/s"),
            ("size on disk", human_bytes(summary.bytes_on_disk)),
            ("bytes per image", f"{summary.bytes_on_disk / max(1, summary.n_images):,.1f}")]
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)
    for image_id, reason in summary.failures[:10]:
        click.echo(f"  failed: {image_id}: {reason}", err=True)
    if summary.n_failed > 10:
        click.echo(f"  ... and {summary.n_failed - 10} more (see `logitstore info {summary.out}`)", err=True)


def _add_teacher(kw: dict[str, Any], name: str | None, as_json: bool) -> None:
    from .teacher.add import add_teacher

    s = add_teacher(kw["out"], kw["teacher"], name=name, images=kw["images"], weights=kw["weights"],
                    pretrained=kw["pretrained"], arch_kwargs=kw["arch_kwargs"], device=kw["device"], precision=kw["precision"],
                    batch_size=kw["batch_size"], num_workers=kw["num_workers"], size=kw["size"],
                    resize=kw["resize"], mean=kw["mean"], std=kw["std"], mode=kw["mode"], classes=kw["classes"],
                    overwrite=kw["overwrite"], storage_options=kw["storage_options"], progress=kw["progress"],
                    trust_modules=kw["trust_modules"])
    if as_json:
        emit_json(s)
        return
    click.echo(f"OK: teacher {s.name!r} added to {s.store}: {s.rows:,} rows in {s.seconds:.1f} s "
               f"({s.matched_by_digest:,} images found by digest elsewhere)")


@main.command("teacher")
@click.argument("spec", metavar="TEACHER")
@click.option("--weights", default=None, help=WEIGHTS_HELP)
@click.option("--pretrained", is_flag=True, help=PRETRAINED_HELP)
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for the architecture factory.")
@click.option("--classes", default=None, help="Class names: comma-separated, or a file with one per line.")
@click.option("--size", default=None, help="Teacher input H,W (overrides the teacher's; without --resize, its resize is scaled alike).")
@click.option("--resize", default=None, type=_dump_number("resize"), help="Shorter side before the centre crop.")
@click.option("--mean", default=None, help="Per-channel mean, comma-separated, on the 0-1 scale.")
@click.option("--std", default=None, help="Per-channel std, comma-separated, on the 0-1 scale.")
@click.option("--mode", default=None, type=click.Choice(["RGB", "L"]), help="Colour mode the teacher takes.")
@click.option("--trust-module", "trust_module", multiple=True, metavar="MODULE",
              help="Trust MODULE as a model factory when a checkpoint names it (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def teacher_command(spec: str, weights: str | None, pretrained: bool, arch_kwargs: str | None, classes: str | None,
                    size: str | None, resize: int | None, mean: str | None, std: str | None, mode: str | None,
                    trust_module: tuple[str, ...], as_json: bool) -> None:
    """What a dump with TEACHER would use: architecture, parameters, classes and preprocessing (no images read).

    TEACHER takes the forms of `logitstore dump --teacher` (see its --help)."""
    from .teacher.load import describe_teacher
    from .views import describe

    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else None
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON ({exc})", param_hint="--arch-kwargs") from None
    s = describe_teacher(spec, weights, pretrained=pretrained, arch_kwargs=kwargs, classes=classes,
                         overrides={"size": parse_size(size, "--size"), "resize": resize,
                                    "mean": _floats(mean, "--mean"), "std": _floats(std, "--std"), "mode": mode},
                         trust_modules=trust_module)
    if as_json:
        click.echo(json.dumps({"teacher": s.info.to_dict(), "parameters": s.parameters,
                               "num_classes": len(s.classes), "classes": s.classes,
                               "preprocess": s.preprocess.to_dict()}, indent=2))
        return
    t = Table(title=f"teacher {spec}", show_header=False)
    first = ", ".join(s.classes[:8]) + (" ..." if len(s.classes) > 8 else "")
    for k, v in [("architecture", f"{s.info.arch} ({s.info.source})"),
                 ("weights", f"{s.info.file} sha256 {s.info.sha256[:16]}..."),
                 ("parameters", "unknown" if s.parameters is None else f"{s.parameters:,}"),
                 ("classes", f"{len(s.classes):,}: {first}"),
                 ("preprocess", describe(s.preprocess)), ("recorded as", json.dumps(s.preprocess.to_dict()))]:
        t.add_row(k, v)
    Console().print(t)


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--allow-incomplete", is_flag=True, help="Describe the rows of an unfinished dump.")
@storage_option_flag
def info(store: str, as_json: bool, allow_incomplete: bool, storage_option: tuple[str, ...]) -> None:
    """Metadata, counts, failures, size, compression and the teacher's prediction summary."""
    from .tools.inspect_store import info as store_info
    from .store import open_store

    d = store_info(open_store(store, allow_incomplete=allow_incomplete,
                              storage_options=parse_storage_options(storage_option)))
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    out = Console()
    t = Table(title=f"{store}", show_header=False)
    teacher = d["teacher"]
    ratio = d["logits_compression_ratio"]
    for k, v in [
        ("format", f"{d['format_version']} ({'complete' if d['complete'] else 'INCOMPLETE'})"),
        ("images / listed / failed", f"{d['images']:,} / {d['listed']:,} / {d['failed']:,}"),
        ("views", f"{d['views']['count']} ({d['views']['kind']})"
                  + "".join(f", {k}" for k in ("augment", "erasing", "mix") if d["views"].get(k))),
        ("classes", f"{d['num_classes']}: {', '.join(d['classes'][:8])}{' ...' if d['num_classes'] > 8 else ''}"),
        ("logits", f"{d['dtype']} (teacher ran in {d['precision']}), {d['chunk_rows']} rows per chunk"
                   + _describe_targets(d["targets"])),
        ("teacher", f"{teacher['arch']} ({teacher['source']}) sha256 {teacher['sha256'][:16]}..."),
        ("preprocess", json.dumps(d["preprocess"])),
        ("corpus", f"{d['corpus']['root']}"),
        ("created", d["created"]),
        *[(f"fingerprint {k}", v) for k, v in d["fingerprints"].items()],
        ("size on disk", f"{human_bytes(d['bytes_on_disk'])} ({d['bytes_per_image'] or 0:,.1f} B/image)"),
        ("logits compression", (f"{ratio:.2f}x" if ratio else "n/a") + (" (against full logits)"
                                                                          if d["targets"]["kind"] != "logits" else "")),
        ("confidence (T=1)", "mean {mean:.3f}, p10 {p10:.3f}, median {median:.3f}, p90 {p90:.3f}".format(
            **d["confidence"])),
        ("entropy (nats)", "mean {mean:.3f}, median {median:.3f} (max {max_possible:.3f})".format(
            **d["entropy_nats"])),
        ("most predicted", ", ".join(f"{c['class']} {100 * c['fraction']:.1f}%" for c in d["top_classes"][:5])),
        *[(f"agrees with primary: {a['name']}", f"{100 * a['agreement']:.1f}%") for a in d["teacher_agreement"]],
        *[("failures by reason", ", ".join(f"{r} {n:,}" for r, n in d["failures_by_reason"].items()))]
        * bool(d["failures_by_reason"]),
    ]:
        t.add_row(k, v)
    out.print(t)
    for f in d["failures"][:10]:
        out.print(f"  failed: {f['id']}: {f['reason']}")


@main.command()
@click.argument("store")
@click.option("--images", default=None, type=click.Path(),
              help="Also check every image's bytes against its stored digest: the corpus root (a folder, URL, "
                   "shards or tables, wherever the corpus is now).")
@click.option("--allow-incomplete", is_flag=True, help="Verify the rows an unfinished dump has written.")
@click.option("--sample", type=float, default=None, metavar="FRACTION",
              help="Check only a random sample of the chunks (e.g. 0.01), seeded by --seed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --sample's choice of chunks.")
@click.option("--workers", type=int, default=None, help="Chunks checked at once [default: cores, at most 8].")
@storage_option_flag
@json_flag
def verify(store: str, images: str | None, allow_incomplete: bool, sample: float | None, seed: int,
           workers: int | None, storage_option: tuple[str, ...], as_json: bool) -> None:
    """Check a store: complete, every chunk's checksum and (1.4) its record, finite logits, and (with --images) digests."""
    from .tools.inspect_store import verify as run_verify
    from .store import open_store

    rep = run_verify(open_store(store, allow_incomplete=allow_incomplete,
                                storage_options=parse_storage_options(storage_option)), images,
                     allow_incomplete=allow_incomplete, sample=sample, seed=seed, workers=workers,
                     storage_options=parse_storage_options(storage_option))
    if as_json:
        emit_json(rep, ok=rep.ok)
        sys.exit(0 if rep.ok else 1)
    for p in rep.problems:
        click.echo(f"  problem: {p}", err=True)
    for n in rep.notes:
        click.echo(f"  note: {n}", err=True)
    what = f"{rep.rows:,} rows in {rep.chunks} chunks" + (
        f", {rep.chunks_checked} chunks checked (sample {rep.sample:g}, seed {rep.seed})" if rep.sample is not None
        else "") + (
        f", {rep.images_matched:,} of {rep.images_checked:,} images read matched their digests" if images else "")
    if not rep.ok:
        count = f"the first {len(rep.problems)} problems" if rep.stopped else f"{len(rep.problems)} problems"
        click.echo(f"logitstore: error: {store} FAILED verification ({count}; {what})", err=True)
        sys.exit(1)
    click.echo(f"OK: {store}: {what}")


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--overwrite", is_flag=True, help="Replace the store at DST (a logitstore store only).")
@click.option("--src-option", multiple=True, metavar="KEY=VALUE", help="fsspec option for SRC; repeatable.")
@click.option("--dst-option", multiple=True, metavar="KEY=VALUE", help="fsspec option for DST; repeatable.")
@click.option("--storage-option", "storage_option", multiple=True, metavar="KEY=VALUE",
              help="fsspec option for both; repeatable.")
@click.option("--jobs", "-j", default=16, show_default=True, type=_count(1, 1024),
              help="Keys in flight at once (object storage is latency-bound; 1 copies one key at a time).")
@json_flag
def copy(src: str, dst: str, overwrite: bool, src_option: tuple[str, ...], dst_option: tuple[str, ...],
         storage_option: tuple[str, ...], jobs: int, as_json: bool) -> None:
    """Copy a complete store between locations (directory, s3://..., file://..., .zip), resumably.

    Every chunk's checksum is verified as it arrives; the completion marker is written last, so an
    interrupted copy is re-run with the same command and skips what already arrived.
    """
    _transfer(src, dst, overwrite, [*storage_option, *src_option], [*storage_option, *dst_option], as_json, jobs)


@main.command()
@click.argument("store")
@click.argument("out", metavar="OUT.zarr.zip")
@click.option("--overwrite", is_flag=True)
@storage_option_flag
@json_flag
def pack(store: str, out: str, overwrite: bool, storage_option: tuple[str, ...], as_json: bool) -> None:
    """Write a store into one local zip file (read directly, without unpacking, by every command);
    --storage-option is for a STORE at a URL."""
    if not out.endswith(".zip"):
        raise click.BadParameter(f"{out!r} must end in .zip", param_hint="OUT")
    _transfer(store, out, overwrite, list(storage_option), [], as_json)


def _transfer(src: str, dst: str, overwrite: bool, src_opts: list[str], dst_opts: list[str], as_json: bool,
              jobs: int | None = None) -> None:
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    from .tools.transfer import DEFAULT_JOBS, copy_store

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    try:
        with Progress(*columns, console=console, transient=True, disable=as_json) as bar:
            task = bar.add_task(f"copy -> {dst}", total=None)
            rep = copy_store(src, dst, src_options=parse_storage_options(src_opts),
                             dst_options=parse_storage_options(dst_opts), overwrite=overwrite,
                             on_start=lambda total: bar.update(task, total=total),
                             on_key=lambda n: bar.advance(task, n), jobs=jobs or DEFAULT_JOBS)
    except KeyboardInterrupt:
        click.echo(f"logitstore: copy to {dst} interrupted; it does not look complete; run the same command "
                   "again to finish it", err=True)
        sys.exit(130)
    if as_json:
        emit_json(rep)
        return
    click.echo(f"OK: {src} -> {dst}: {rep.copied} objects copied ({human_bytes(rep.bytes_copied)}), "
               f"{rep.skipped} already there, every chunk checksum verified")


@main.command()
@click.argument("stores", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Merged store to write.")
@click.option("--prefix", default=None, help="Comma-separated id prefix per store [default: corpus folder names].")
@click.option("--dedupe", is_flag=True, help="Drop images whose digest was already seen.")
@click.option("--overwrite", is_flag=True)
@storage_option_flag
@json_flag
def merge(stores: tuple[str, ...], out: str, prefix: str | None, dedupe: bool, overwrite: bool,
          storage_option: tuple[str, ...], as_json: bool) -> None:
    """Merge stores of several corpora dumped by the same teacher (same classes, preprocessing, views)."""
    from .tools.combine import merge as run_merge

    rep = run_merge(list(stores), out, prefixes=prefix.split(",") if prefix else None, dedupe=dedupe,
                    overwrite=overwrite, storage_options=parse_storage_options(storage_option))
    if as_json:
        emit_json(rep)
        return
    for s in rep.sources:
        click.echo(f"  {s['prefix']}/: {s['rows']:,} rows from {s['store']}")
    click.echo(f"OK: {out}: {rep.rows:,} rows ({rep.dropped_duplicates:,} duplicates dropped)")


@main.command()
@click.argument("store")
@click.option("-o", "--out", required=True, help="Selected store to write.")
@click.option("--min-confidence", type=_real(0, 1), default=None, help="Keep rows whose top probability >= this.")
@click.option("--max-entropy", type=_real(0), default=None, help="Keep rows whose entropy (nats) <= this.")
@click.option("--per-class", type=_count(1), default=None, help="Keep the K most confident rows per predicted class.")
@click.option("--limit", type=_count(1), default=None, help="Keep at most this many rows (most confident first).")
@click.option("--temperature", type=_real(0, lo_open=True), default=1.0, show_default=True,
              help="Temperature of the softmax these criteria are measured on.")
@click.option("--overwrite", is_flag=True)
@storage_option_flag
@json_flag
def select(store: str, out: str, min_confidence: float | None, max_entropy: float | None,
           per_class: int | None, limit: int | None, temperature: float, overwrite: bool,
           storage_option: tuple[str, ...], as_json: bool) -> None:
    """Build a transfer set chosen by the teacher (confidence, entropy, class balance, size)."""
    from .tools.combine import select as run_select

    rep = run_select(store, out, min_confidence=min_confidence, max_entropy=max_entropy, per_class=per_class,
                     limit=limit, temperature=temperature, overwrite=overwrite,
                     storage_options=parse_storage_options(storage_option))
    if as_json:
        emit_json(rep)
        return
    t = Table(title=f"{out}: {rep.rows_out:,} of {rep.rows_in:,} rows", show_header=True)
    t.add_column("predicted class")
    t.add_column("rows", justify="right")
    for c, n in rep.per_class.items():
        t.add_row(c, f"{n:,}")
    Console().print(t)


@main.command("show")
@click.argument("store")
@click.option("--images", default=None, type=click.Path(),
              help="Corpus root the store was dumped from: a folder, URL, shards or tables [default: the root "
                   "recorded in the store].")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--per-class", default=8, show_default=True, type=_count(1, 1000), help="Images drawn per class.")
@click.option("--max-classes", default=20, show_default=True, type=_count(1, 1000),
              help="Rows drawn when the teacher has more classes (the most predicted ones).")
@click.option("--seed", default=0, show_default=True, type=_count(0), help="Which images are drawn.")
@storage_option_flag
def show(store: str, images: str | None, out: str, per_class: int, max_classes: int, seed: int,
         storage_option: tuple[str, ...]) -> None:
    """A contact sheet: sample images grouped by the teacher's top-1 class, with its confidence and
    the class histogram. Use it to judge whether an unlabeled corpus will teach anything.
    --storage-option applies to the store and to a corpus on object storage."""
    from .store import open_store
    from .tools.show import contact_sheet

    so = parse_storage_options(storage_option)
    summary = contact_sheet(open_store(store, storage_options=so), images, out, per_class=per_class, seed=seed,
                            max_classes=max_classes, storage_options=so)
    top = sorted(summary.class_counts.items(), key=lambda kv: -kv[1])[:5]
    n = max(1, summary.images)
    click.echo(f"wrote {summary.out}: {summary.images:,} images; most predicted: "
               + ", ".join(f"{k} {100 * v / n:.1f}%" for k, v in top))



@main.command("card")
@click.argument("store")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--images", default=None, type=click.Path(),
              help="Corpus root for the contact sheet [default: the root recorded in the store, else the store's "
                   "embedded pixels].")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@storage_option_flag
@json_flag
def card(store: str, out: str, images: str | None, overwrite: bool, storage_option: tuple[str, ...],
         as_json: bool) -> None:
    """A self-contained HTML page describing a store (teacher, corpus, counts, plots, contact sheet)
    to publish beside a shared cache."""
    from .tools.card import write_card

    rep = write_card(store, out, images=images, overwrite=overwrite,
                     storage_options=parse_storage_options(storage_option))
    if as_json:
        emit_json(rep)
        return
    click.echo(f"wrote {rep.out}: {rep.images:,} images, {len(rep.plots)} plots, contact sheet from "
               f"{rep.contact_sheet} ({human_bytes(rep.bytes)})")


if __name__ == "__main__":
    main()

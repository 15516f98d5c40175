"""Load a teacher safely and get it ready: state-dict checkpoints, TorchScript, torch.export programs,
factories, and the registries' models (registries.py: timm, torchvision weights, Hugging Face
directories); its preprocessing, class names and output width.

No arbitrary code runs on load: checkpoints go through torch.load(weights_only=True) or safetensors,
and architectures are named ("torchvision:NAME" or "package.module:factory"), never unpickled.
"""
from __future__ import annotations

import hashlib
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..arch import MAX_CLASSES, build_model
from ..checkpoint import check_zip_entries, is_torchscript, load_weights_only
from ..errors import FormatError, TeacherError
from ..schema import MAX_TEXT, Preprocess, TeacherInfo

IMAGENET_PREPROCESS = {"size": [224, 224], "resize": 256, "mean": [0.485, 0.456, 0.406],
                       "std": [0.229, 0.224, 0.225], "mode": "RGB"}

REGISTRY_PREFIXES = ("timm", "torchvision", "hf")


@dataclass
class Teacher:
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor]
    info: TeacherInfo
    classes: list[str] | None          # from the checkpoint or the registry, if it names them
    preprocess: dict[str, Any] | None  # from the checkpoint or the registry, if it records it
    note: str | None = field(default=None)  # why a registry's preprocessing could not be taken over


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError, ValueError) as exc:
        first = " ".join(str(exc).split())[:400]
        raise TeacherError(f"{where}: the weights do not fit the architecture ({first}){head_hint(first)}") from None


def head_hint(message: str) -> str:
    """A state dict whose classifier has another width than the architecture's default: how to build that width."""
    m = re.search(r"size mismatch for [\w.]*(?:fc|head|classifier)[\w.]*\.weight: copying a param with shape "
                  r"torch\.Size\(\[(\d+), ", message)
    return f"; for a classifier of {m.group(1)} classes pass --arch-kwargs '{{\"num_classes\": {m.group(1)}}}'" if m else ""


def load_teacher(teacher: str, weights: str | None = None, arch_kwargs: dict[str, Any] | None = None,
                 trust_modules: Sequence[str] = (), pretrained: bool = False) -> Teacher:
    """Load any accepted teacher form. See `logitstore dump --help` for the list.

    An architecture named inside a checkpoint is resolved under the trust rule (logitstore/arch.py):
    registries, built-in students and `trust_modules` only. One typed as `teacher` is trusted.
    """
    path = Path(teacher).expanduser()
    prefix = teacher.split(":", 1)[0] if ":" in teacher else None
    if prefix in REGISTRY_PREFIXES and not path.exists():
        from . import registries

        load = {"timm": registries.load_timm, "torchvision": registries.load_torchvision, "hf": registries.load_hf}
        return load[prefix](teacher.split(":", 1)[1], weights, pretrained, arch_kwargs)
    if pretrained:
        raise TeacherError(f"--pretrained applies to timm:NAME and torchvision:NAME teachers, not {teacher}")
    if weights is not None or (not path.exists() and ":" in teacher):
        return load_factory(teacher, weights, arch_kwargs)
    if path.is_dir() and (path / "config.json").is_file():
        raise TeacherError(f"{teacher}: a folder; for a Hugging Face save_pretrained directory pass --teacher "
                           f"hf:{teacher}")
    if not path.is_file():
        raise TeacherError(f"{teacher}: no such teacher file; pass a checkpoint, TorchScript or .pt2 "
                           "file, or 'torchvision:NAME --weights FILE'")
    if path.stat().st_size == 0:
        raise TeacherError(f"{path}: the file is empty; it was not saved completely, save or copy it again")
    check_zip_entries(path)
    sha = file_sha256(path)
    if path.suffix == ".pt2":
        log = logging.getLogger("torch.export")
        level = log.level
        log.setLevel(logging.ERROR)  # it logs its own warning before raising; our one line says it all
        try:
            program = torch.export.load(str(path))
        except Exception as exc:  # torch.export raises many kinds on bad files
            raise TeacherError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        finally:
            log.setLevel(level)
        return Teacher(program.module(), TeacherInfo("torch.export", "export", str(path), sha), None, None)
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript; its files still load
                warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch.jit raises many kinds on damaged files
            raise TeacherError(f"{path}: not a loadable TorchScript file ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        return Teacher(module, TeacherInfo("torchscript", "torchscript", str(path), sha), None, None)
    ckpt = load_weights_only(path)
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TeacherError(f"{path}: a checkpoint must be a dict with 'arch' and 'state_dict' (found {keys}); "
                           f"for bare weights use --teacher torchvision:NAME --weights {path}")
    kwargs = {**(ckpt.get("arch_kwargs") or {}), **(arch_kwargs or {})}
    model = build_model(ckpt["arch"], kwargs, trust_modules=trust_modules, where=str(path))
    _load_state_dict(model, ckpt["state_dict"], str(path))
    info = TeacherInfo(str(ckpt["arch"]), "checkpoint", str(path), sha, kwargs)
    return Teacher(model, info, _file_classes(ckpt.get("classes"), str(path)), _file_preprocess(ckpt, str(path)))


def _file_classes(classes: Any, where: str) -> list[str] | None:
    """Class names from a file: a list of at most MAX_CLASSES names, or nothing."""
    if classes is None:
        return None
    if not isinstance(classes, (list, tuple)) or not 1 <= len(classes) <= MAX_CLASSES:
        raise TeacherError(f"{where}: 'classes' must be a list of 1..{MAX_CLASSES} names")
    return [str(c) for c in classes]


def _file_preprocess(ckpt: dict[str, Any], where: str) -> dict[str, Any] | None:
    pre = ckpt.get("preprocess")
    if pre is not None and not isinstance(pre, dict):
        raise TeacherError(f"{where}: 'preprocess' must be a dict (size, resize, mean, std, mode)")
    return pre


def load_factory(arch: str, weights: str | None, arch_kwargs: dict[str, Any] | None) -> Teacher:
    """An architecture the user typed, with --weights FILE: a state dict (torch.save or .safetensors), or a
    whole checkpoint whose classes and preprocessing then come along."""
    if weights is None:
        raise TeacherError(f"--teacher {arch} needs --weights FILE (a state dict: torch.save or .safetensors)")
    wpath = Path(weights).expanduser()
    if not wpath.is_file():
        raise TeacherError(f"{weights}: no such weights file; check --weights")
    state = load_weights_only(wpath)
    classes = preprocess = None
    kwargs = dict(arch_kwargs or {})
    if isinstance(state, dict) and "state_dict" in state:  # a full checkpoint given as weights
        classes, preprocess = _file_classes(state.get("classes"), str(wpath)), _file_preprocess(state, str(wpath))
        kwargs = {**(state.get("arch_kwargs") or {}), **kwargs}
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TeacherError(f"{weights}: expected a state dict (name -> tensor), found {type(state).__name__}")
    model = build_model(arch, kwargs, typed=True, where="--teacher")  # typed by the user: trusted
    _load_state_dict(model, state, str(wpath))
    info = TeacherInfo(arch, "factory", str(wpath), file_sha256(wpath), kwargs)
    return Teacher(model, info, classes, preprocess)


def resolve_preprocess(teacher: Teacher, overrides: dict[str, Any]) -> Preprocess:
    """Checkpoint preprocessing, then flags on top; torchvision architectures default to ImageNet's."""
    base: dict[str, Any] = dict(teacher.preprocess or {})
    if not base and teacher.info.arch.startswith("torchvision:"):
        base = dict(IMAGENET_PREPROCESS)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "size" in given and "resize" not in given and base.get("size") and base.get("resize"):
        base["resize"] = _scaled_resize(base["resize"], base["size"], given["size"])
    base.update(given)
    if "size" not in base:
        why = f" (cannot take over {teacher.note})" if teacher.note else ""
        raise TeacherError(f"{teacher.info.file}: no preprocessing recorded with this teacher{why}; "
                           "give at least --size H,W (and --mean, --std, --mode, --resize as trained)")
    mode = base.get("mode", "RGB")
    if "mean" not in base and "std" not in base:
        base["mean"], base["std"] = [0.0] * (3 if mode == "RGB" else 1), [1.0] * (3 if mode == "RGB" else 1)
    try:
        pre = Preprocess.from_dict(base)
    except FormatError as exc:
        raise TeacherError(f"{teacher.info.file}: its preprocessing is refused: {exc}") from None
    if ("resize" in given or "size" in given) and pre.resize is not None:
        # an (h, w) resize fits crops up to h x w; a shorter side of R, crops up to R x R whatever the aspect
        fits = (all(r >= s for r, s in zip(pre.resize, pre.size)) if isinstance(pre.resize, tuple)
                else pre.resize >= max(pre.size))
        if not fits:
            raise TeacherError(f"--resize {pre.resize} is smaller than the {pre.size[0]}x{pre.size[1]} crop: the crop "
                               f"would pad the image with zeros; pass --resize {max(pre.size)} or more")
    return pre


def _scaled_resize(resize: Any, old: Sequence[int], new: Sequence[int]) -> Any:
    """The teacher's resize for a new --size, in the same proportion to the crop as it was (timm's crop_pct,
    torchvision's 256 for 224): a 224 teacher's 256 becomes 292 at 256, and 36 at 32."""
    if isinstance(resize, int):
        return resize * max(new) // max(old)
    return [r * n // o for r, n, o in zip(resize, new, old)]


FIXED_BATCH = ("it was exported or traced for one batch size; export it with a dynamic batch dimension "
               "(torch.export.Dim) or script it (torch.jit.script)")


def probe_num_classes(model: Callable[[torch.Tensor], torch.Tensor], pre: Preprocess, where: str,
                      compiled: bool = False) -> int:
    """Run dummy inputs through the teacher to learn its output width (and that it runs). A `compiled`
    program (TorchScript, torch.export) may have been made for one batch size: it is also run on a batch
    of 1 or 3, so that is found here rather than on the dump's first full batch."""
    pre.check()  # bounded sizes: the dummy inputs below are allocated from them
    x = torch.zeros(2, pre.channels, *pre.size)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        fix = FIXED_BATCH if compiled and _runs(model, x[:1]) else "check --size and --mode"
        raise TeacherError(f"{where}: the teacher fails on a {list(x.shape)} input ({failure_text(exc)}); {fix}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TeacherError(f"{where}: the teacher must return logits of shape [batch, classes]; it returned {shape}")
    if not 1 <= out.shape[1] <= MAX_CLASSES:
        raise TeacherError(f"{where}: the teacher returns {out.shape[1]} logits per image; the format allows "
                           f"1..{MAX_CLASSES} classes")
    if compiled and not _runs(model, torch.zeros(3, pre.channels, *pre.size)):
        raise TeacherError(f"{where}: the teacher runs on a batch of 2 images but not of 3: {FIXED_BATCH}")
    return int(out.shape[1])


def failure_text(exc: BaseException) -> str:
    """A teacher's exception in one short line. TorchScript wraps the error in the interpreter's traceback,
    whose last line is the error itself."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines and "TorchScript" in lines[0] else " ".join(lines)
    return f"{type(exc).__name__}: {text[:200]}"


def _runs(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Whether the teacher returns one row of logits per input of `x`."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == len(x)


def prepare_teacher(teacher: str, weights: str | None, arch_kwargs: dict[str, Any] | None,
                    overrides: dict[str, Any], trust_modules: Sequence[str] = (),
                    pretrained: bool = False) -> tuple[Teacher, Preprocess, int]:
    """Load a teacher in eval mode, settle its preprocessing (flags over checkpoint), learn its width."""
    t = load_teacher(teacher, weights, arch_kwargs, trust_modules, pretrained)
    o = overrides
    pre = resolve_preprocess(t, {"size": list(o["size"]) if o.get("size") else None, "resize": o.get("resize"),
                                 "mean": list(o["mean"]) if o.get("mean") else None,
                                 "std": list(o["std"]) if o.get("std") else None, "mode": o.get("mode")})
    if isinstance(t.model, nn.Module):
        try:
            t.model.eval()
        except (NotImplementedError, RuntimeError):  # torch.export modules may refuse .eval()
            pass
    compiled = t.info.source in ("torchscript", "export")
    return t, pre, probe_num_classes(t.model, pre, t.info.file, compiled)  # probed on the CPU, before moving


def class_names(t: Teacher, given: str | Sequence[str] | None, width: int) -> list[str]:
    """--classes, else the teacher's own names, else "0".."C-1"; exactly one name per output."""
    names = read_classes(given) or t.classes or [str(i) for i in range(width)]
    if len(names) != width:
        raise TeacherError(f"{t.info.file}: the teacher outputs {width} logits but {len(names)} class names "
                           "were given; pass --classes with exactly one name per output")
    where = "--classes" if given is not None else t.info.file
    if "" in names:
        raise TeacherError(f"{where}: class {names.index('')} has an empty name; give every class a name "
                           "(a trailing comma adds an empty one)")
    twice = [n for n, k in Counter(names).items() if k > 1]
    if twice:
        raise TeacherError(f"{where}: the class name {twice[0]!r} is given more than once; class names must be "
                           "unique (docs/FORMAT.md, R3)")
    if max(map(len, names)) > MAX_TEXT:
        raise TeacherError(f"{where}: a class name is longer than {MAX_TEXT} characters (docs/FORMAT.md, R3)")
    return names


@dataclass
class TeacherSummary:
    """What a dump with this teacher would use (`logitstore teacher`), before any image is read."""

    info: TeacherInfo
    parameters: int | None  # None for a TorchScript or torch.export program that does not say
    classes: list[str]
    preprocess: Preprocess


def describe_teacher(teacher: str, weights: str | None = None, *, pretrained: bool = False,
                     arch_kwargs: dict[str, Any] | None = None, classes: str | Sequence[str] | None = None,
                     overrides: dict[str, Any] | None = None, trust_modules: Sequence[str] = ()) -> TeacherSummary:
    """Load a teacher as `logitstore dump` would and say what it would use: no corpus, no store."""
    t, pre, width = prepare_teacher(teacher, weights, arch_kwargs, overrides or {}, trust_modules, pretrained)
    params = sum(p.numel() for p in t.model.parameters()) if isinstance(t.model, nn.Module) else None
    return TeacherSummary(t.info, params, class_names(t, classes, width), pre)


def to_device(model: Any, dev: torch.device) -> Any:
    if isinstance(model, nn.Module):
        model = model.to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
    return model


def read_classes(classes: str | Sequence[str] | None) -> list[str] | None:
    """--classes: names given in code, comma-separated, or a file with one name per line."""
    if classes is None or not isinstance(classes, str):
        return None if classes is None else [str(c) for c in classes]
    path = Path(classes).expanduser()
    if path.is_file():
        return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if "," not in classes and ("/" in classes or path.suffix.lower() in (".txt", ".csv", ".json", ".names")):
        raise TeacherError(f"--classes {classes}: no such file; pass a file with one class name per line, or the "
                           "names separated by commas")
    return [c.strip() for c in classes.split(",")]

"""Teachers the model registries name: timm models, torchvision's weight enums, Hugging Face directories.

Each loader returns a Teacher with the registry's own eval preprocessing (a Preprocess dict, exact in
views.py's terms or else absent with the reason), its class names where the weights carry them, and
the file it read (hashed into the store's teacher fingerprint). Nothing here downloads: weights come
from a file, the local Hugging Face or torch hub cache, or a save_pretrained directory, and a missing
file is one line saying where to put it. Nothing is unpickled: safetensors, or torch.load(weights_only=True).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from ..arch import HF, call_factory, check_arch_kwargs
from ..checkpoint import load_weights_only
from ..errors import ArchitectureError, TeacherError, UntrustedCodeError
from ..schema import INTERPOLATIONS, MAX_CLASSES, TeacherInfo
from .load import Teacher, file_sha256, head_hint, load_factory

EXTRA = {"timm": "pip install 'logitstore[timm]'", "transformers": "pip install 'logitstore[hf]'",
         "safetensors": "pip install 'logitstore[timm]' (or [hf])"}
PRETRAINED = "pretrained"  # TeacherInfo.source: weights a registry names (a weights enum, a pretrained tag)
HF_SOURCE = "hf"           # TeacherInfo.source: a save_pretrained directory
TIMM_DEFAULT_CROP_PCT = 0.875  # timm.data.DEFAULT_CROP_PCT, what its eval transform uses when a config has none


def require(module: str, what: str) -> Any:
    """Import an optional dependency, or one line naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TeacherError(f"{what} needs {module}; {EXTRA.get(module, f'pip install {module}')}") from None


def _unique(names: Any, width: int) -> list[str] | None:
    """Names that can be a store's classes for a head of `width` outputs (a count, unique, non-empty)."""
    if names is None:
        return None
    names = [str(n) for n in names]
    ok = len(names) == width and len(set(names)) == width and all(names) and 1 <= width <= MAX_CLASSES
    return names if ok else None


# -- timm -------------------------------------------------------------------------------------------------
def load_timm(name: str, weights: str | None, pretrained: bool, arch_kwargs: dict[str, Any] | None) -> Teacher:
    """timm:NAME with --weights FILE (a state dict: .safetensors or a torch file) or --pretrained (its cache)."""
    timm = require("timm", f"--teacher timm:{name}")
    arch = f"timm:{name}"
    if (weights is None) == (not pretrained):
        raise TeacherError(f"--teacher {arch} needs either --weights FILE (a state dict: .safetensors or a torch "
                           "file) or --pretrained (timm's weights from this machine's cache), not both or neither")
    if pretrained:
        path = _timm_cached_file(timm, name)
        kwargs = check_arch_kwargs(arch_kwargs, "--arch-kwargs")
        head = getattr(timm.models.get_pretrained_cfg(name), "num_classes", None)
        if "num_classes" in kwargs and head is not None and kwargs["num_classes"] != head:
            # timm would drop the pretrained classifier and start a random one: a teacher that knows nothing
            raise TeacherError(f"timm:{name} --pretrained: its weights classify {head} classes, and num_classes="
                               f"{kwargs['num_classes']} would replace that head with random weights; drop num_classes "
                               "from --arch-kwargs, or pass --weights FILE with a trained head of that size")
        # timm reads the file itself (safetensors, or torch.load(weights_only=True)) to apply its own key
        # mapping; the overlay points it at the cached file we hashed, so it never looks at the network.
        overlay = {"file": str(path), "source": ""}
        model = call_factory(lambda **kw: timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                                                            **kw), arch, kwargs)
        t = Teacher(model, TeacherInfo(arch, PRETRAINED, str(path), file_sha256(path), kwargs), None, None)
    else:
        t = load_factory(arch, weights, arch_kwargs)
    if t.preprocess is None:
        t.preprocess, t.note = timm_preprocess(t.model)
    if t.classes is None:
        t.classes = timm_classes(t.model)
    return t


def _timm_cached_file(timm: Any, name: str) -> Path:
    """Where timm's pretrained weights for NAME lie on this machine: the Hugging Face cache, or torch's."""
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise TeacherError(f"timm:{name} has no pretrained weights in timm's registry; pass --weights FILE")
    looked = []
    if cfg.hf_hub_id:
        hub = require("huggingface_hub", f"timm:{name} --pretrained")
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in dict.fromkeys([*filter(None, [cfg.hf_hub_filename]), "model.safetensors", "pytorch_model.bin"]):
            found = hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
        looked.append(f"{repo} in the Hugging Face cache {hub.constants.HF_HUB_CACHE}")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
        looked.append(str(path))
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    raise TeacherError(f"timm:{name} --pretrained: its weights are not on this machine (looked for "
                       f"{' and '.join(looked) or 'a file'}); nothing is downloaded: run timm.create_model("
                       f"'{name}', pretrained=True) where there is a network and copy the cache here, or pass "
                       "--weights FILE")


def timm_preprocess(model: nn.Module) -> tuple[dict[str, Any] | None, str | None]:
    """timm's eval transform (transforms_imagenet_eval) for this model, in views.py's terms.

    timm resizes to floor(side / crop_pct) and crops the centre: "center" mode keeps the aspect
    (the shorter side), "squash" does not ([h, w]); both crop with torchvision's CenterCrop.
    """
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    c, h, w = (int(x) for x in cfg["input_size"])
    interpolation = str(cfg.get("interpolation", "bilinear"))
    crop_pct = cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT
    crop_mode = cfg.get("crop_mode") or "center"
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))  # timm's own arithmetic, for exact sizes
    if interpolation not in INTERPOLATIONS:
        return None, f"timm's interpolation {interpolation!r} (logitstore replays {', '.join(INTERPOLATIONS)})"
    if crop_mode == "squash":
        resize: Any = None if scale == (h, w) else list(scale)
    elif crop_mode == "center" and scale[0] == scale[1]:
        resize = scale[0]
    else:
        return None, f"timm's crop_mode {crop_mode!r} at {h}x{w}"
    if c not in (1, 3):
        return None, f"timm's input of {c} channels (logitstore feeds RGB or L)"
    return {"size": [h, w], "resize": resize, "mean": [float(x) for x in cfg["mean"]],
            "std": [float(x) for x in cfg["std"]], "mode": "RGB" if c == 3 else "L",
            "interpolation": interpolation, "antialias": interpolation != "nearest", "crop": "center"}, None


def timm_classes(model: nn.Module) -> list[str] | None:
    """The head's label names where timm knows them: its config's, or ImageNet's synsets for a 1k, 12k,
    21k or 22k head (the ImageNet folder names). None when the head was replaced (another width)."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    cfg = getattr(model, "pretrained_cfg", None) or {}
    width = getattr(model, "num_classes", None)
    if not width or cfg.get("num_classes") != width:
        return None
    if cfg.get("label_names"):
        return _unique(cfg["label_names"], width)
    subset = infer_imagenet_subset(model)
    if subset is None or cfg.get("label_offset"):
        return None
    return _unique(ImageNetInfo(subset).label_names(), width)


# -- torchvision ------------------------------------------------------------------------------------------
def load_torchvision(name: str, weights: str | None, pretrained: bool,
                     arch_kwargs: dict[str, Any] | None) -> Teacher:
    """torchvision:NAME --weights ENUM (or DEFAULT, or --pretrained) from the torch hub cache, or --weights FILE.

    With an enum, or a file named as an enum's download, the model is built as torchvision builds it for
    those weights, with their preprocessing and categories; any other file loads as a plain state dict.
    """
    import torchvision

    arch = f"torchvision:{name}"
    if weights is not None and pretrained:
        raise TeacherError(f"--teacher {arch}: give --weights or --pretrained, not both")
    if weights is None and not pretrained:
        raise TeacherError(f"--teacher {arch} needs --weights FILE (a state dict), or a weights name such as "
                           "DEFAULT or --pretrained (read from the torch hub cache)")
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        enum = None  # not a torchvision model with weights: the factory says why, or loads the file
    given = Path(weights).expanduser() if weights is not None else None
    if given is not None and given.is_file():
        member = next((m for m in enum or () if _url_name(m.url) == given.name), None)
        if member is None:
            return load_factory(arch, weights, arch_kwargs)
        path = given
    else:
        member = _weights_member(arch, enum, "DEFAULT" if pretrained else str(weights))
        path = Path(torch.hub.get_dir()) / "checkpoints" / _url_name(member.url)
        if not path.is_file():
            raise TeacherError(f"{arch} --weights {member.name}: {path.name} is not in the torch hub cache; nothing is "
                               f"downloaded: fetch {member.url} and place it at {path} (or pass --weights FILE)")
    kwargs = check_arch_kwargs(arch_kwargs, "--arch-kwargs")
    state = load_weights_only(path)
    if not isinstance(state, dict):
        raise TeacherError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
    try:
        with _serve_weights(state):
            model = torchvision.models.get_model(name, weights=member, **kwargs)
    except RuntimeError as exc:  # load_state_dict's mismatch
        first = " ".join(str(exc).split())[:400]
        raise TeacherError(f"{path}: the weights do not fit {arch} ({first}){head_hint(first)}") from None
    except (TypeError, ValueError) as exc:
        raise ArchitectureError(f"{arch} cannot be built with {kwargs} for {member.name}: "
                                f"{' '.join(str(exc).split())[:200]}") from None
    info = TeacherInfo(arch, PRETRAINED, str(path), file_sha256(path), kwargs)
    pre, note = torchvision_preprocess(member)
    categories = member.meta.get("categories") or []  # the builder sized the head to them
    return Teacher(model, info, _unique(categories, len(categories)), pre, note)


def _url_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def _weights_member(arch: str, enum: Any, spec: str) -> Any:
    """'IMAGENET1K_V2', 'DEFAULT' or 'ResNet50_Weights.IMAGENET1K_V2' -> the enum member."""
    if enum is None:
        raise TeacherError(f"{spec}: no such weights file, and {arch} has no torchvision weights; pass --weights FILE")
    key = spec.rsplit(".", 1)[-1]
    names = [m.name for m in enum]
    if key == "DEFAULT":
        return enum.DEFAULT
    if key not in names:
        raise TeacherError(f"{spec}: no such weights file, and not a weights name of {arch} "
                           f"({', '.join(names + ['DEFAULT'])})")
    return enum[key]


@contextlib.contextmanager
def _serve_weights(state: dict[str, Any]) -> Iterator[None]:
    """torchvision's builders fetch their weights through WeightsEnum.get_state_dict (a download, then
    torch.load without weights_only); for the duration of one build it returns the state dict we read."""
    from torchvision.models import WeightsEnum

    saved = WeightsEnum.get_state_dict
    WeightsEnum.get_state_dict = lambda self, *args, **kwargs: state  # type: ignore[method-assign]
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = saved  # type: ignore[method-assign]


def torchvision_preprocess(member: Any) -> tuple[dict[str, Any] | None, str | None]:
    """weights.transforms() (ImageClassification: resize the shorter side, centre crop, normalise)."""
    t = member.transforms()
    try:
        crop, resize = [int(x) for x in t.crop_size], [int(x) for x in t.resize_size]
        interpolation = t.interpolation.value
        mean, std = [float(x) for x in t.mean], [float(x) for x in t.std]
    except (AttributeError, TypeError, ValueError):
        return None, f"{member}'s transforms ({type(t).__name__}) are not a resize and crop"
    if interpolation not in INTERPOLATIONS:
        return None, f"{member}'s interpolation {interpolation!r}"
    antialias = interpolation != "nearest" and getattr(t, "antialias", True) is not False
    return {"size": [crop[0], crop[-1]], "resize": resize[0] if len(resize) == 1 else resize[:2], "mean": mean,
            "std": std, "mode": "RGB", "interpolation": interpolation, "antialias": antialias, "crop": "center"}, None


# -- Hugging Face -----------------------------------------------------------------------------------------
HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as image processors record them
HF_FILES = ("config.json", "preprocessor_config.json", "model.safetensors.index.json")


class HFLogits(nn.Module):
    """A transformers image classifier as a teacher: pixel_values in, its `.logits` out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf(directory: str, weights: str | None, pretrained: bool, arch_kwargs: dict[str, Any] | None) -> Teacher:
    """hf:DIR, a local save_pretrained directory: config.json, *.safetensors, preprocessor_config.json.

    Loaded with local_files_only and never trust_remote_code: a directory whose config asks for its own
    code (auto_map) is refused before transformers reads it.
    """
    spec = f"{HF}:{directory}"
    if weights is not None or pretrained or arch_kwargs:
        raise TeacherError(f"--teacher {spec} takes its weights and configuration from the directory; "
                           "drop --weights, --pretrained and --arch-kwargs")
    d = Path(directory).expanduser()
    if not (d / "config.json").is_file():
        raise TeacherError(f"{spec}: not a save_pretrained directory (no config.json); it must hold config.json, "
                           "model.safetensors and preprocessor_config.json")
    for name in ("config.json", "preprocessor_config.json"):
        doc = _read_json(d / name, spec)
        if isinstance(doc, dict) and "auto_map" in doc:
            raise UntrustedCodeError(f"{spec}: {name} asks for the directory's own code (auto_map); logitstore never "
                                     "runs a model directory's code (trust_remote_code), and nothing was imported")
    shards = sorted(p for p in d.glob("*.safetensors") if p.is_file())
    if not shards:
        raise TeacherError(f"{spec}: no .safetensors weights (a pytorch_model.bin is a pickle and is refused); "
                           "save with model.save_pretrained(DIR, safe_serialization=True)")
    transformers = require("transformers", f"--teacher {spec}")
    with _quiet(transformers):
        try:
            model = transformers.AutoModelForImageClassification.from_pretrained(
                str(d), local_files_only=True, trust_remote_code=False, use_safetensors=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise TeacherError(f"{spec}: transformers cannot load it as an image classifier ({first})") from None
        pre, note = hf_preprocess(transformers, d, model.config)
    model = model.float().eval()
    id2label = getattr(model.config, "id2label", None) or {}
    width = int(model.config.num_labels)
    classes = _unique([id2label.get(i, id2label.get(str(i))) for i in range(width)], width) if id2label else None
    files = [d / n for n in HF_FILES if (d / n).is_file()] + shards
    info = TeacherInfo(f"{HF}:{type(model).__name__}", HF_SOURCE, str(d.resolve()), directory_sha256(files))
    return Teacher(HFLogits(model), info, classes, pre, note)


def _read_json(path: Path, spec: str) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TeacherError(f"{spec}: {path.name} is not JSON ({exc})") from None


def directory_sha256(files: list[Path]) -> str:
    """A directory teacher's `sha256`: of each file's name, a NUL and its SHA-256 (hex), one per line."""
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode("utf-8"))
    return h.hexdigest()


@contextlib.contextmanager
def _quiet(transformers: Any) -> Iterator[None]:
    """transformers' info logs and progress bars would bury the dump's own output."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _field(obj: Any, key: str) -> Any:
    """A key of an image processor's size dict (a dict in transformers 4, a SizeDict in 5)."""
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def hf_preprocess(transformers: Any, d: Path, config: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The directory's image processor in views.py's terms: a fixed-size or shorter-side resize, the floor
    centre crop transformers uses, and its rescale and normalisation folded into mean and std (0-1 scale)."""
    if not (d / "preprocessor_config.json").is_file():
        return None, "its preprocessing: the directory has no preprocessor_config.json"
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        return None, f"its image processor cannot be read ({' '.join(str(exc).split())[:200]})"
    kind = type(proc).__name__
    resample = getattr(proc, "resample", 2)
    resample = getattr(resample, "value", resample)
    interpolation = HF_RESAMPLE.get(resample) if isinstance(resample, int) else str(resample)
    if interpolation not in INTERPOLATIONS:
        return None, f"{kind} resamples with {resample!r} (logitstore replays {', '.join(INTERPOLATIONS)})"
    if not getattr(proc, "do_resize", True):
        return None, f"{kind} does not resize, so inputs would differ in size"
    size, crop_pct = getattr(proc, "size", None) or {}, getattr(proc, "crop_pct", None)
    h, w, edge = _field(size, "height"), _field(size, "width"), _field(size, "shortest_edge")
    crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
    ch, cw = (_field(crop, "height"), _field(crop, "width")) if crop else (None, None)
    extra = [k for k in ("longest_edge", "max_height", "max_width") if _field(size, k)]
    if extra or (crop and not (ch and cw)) or (crop_pct is not None and not kind.startswith("ConvNext")):
        return None, f"{kind} resizes by {dict(size) if isinstance(size, dict) else size}"
    if kind.startswith("ConvNext") and edge and crop_pct:  # shorter side to edge / crop_pct, crop edge x edge
        resize, out = (int(edge / crop_pct), [edge, edge]) if edge < 384 else (None, [edge, edge])
    elif h and w and not edge:
        resize, out = (None, [h, w]) if not crop or (ch, cw) == (h, w) else ([h, w], [ch, cw])
    elif edge and crop:
        resize, out = edge, [ch, cw]
    else:
        return None, f"{kind} resizes by {size} without a centre crop, so inputs would differ in size"
    # x -> (x * r - mean) / std on 0-255 pixels is (x/255 - mean') / std' with mean' = mean / (255 r).
    r = float(proc.rescale_factor) if getattr(proc, "do_rescale", True) else 1.0
    k = 1.0 if abs(255.0 * r - 1.0) < 1e-9 else 255.0 * r
    channels = int(getattr(config, "num_channels", 3))
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if not getattr(proc, "do_normalize", True) or mean is None or std is None:
        mean, std = [0.0], [1.0]
    mean = [float(m) / k for m in (mean if isinstance(mean, (list, tuple)) else [mean])]
    std = [float(s) / k for s in (std if isinstance(std, (list, tuple)) else [std])]
    if channels not in (1, 3):
        return None, f"the model takes {channels} channels (logitstore feeds RGB or L)"
    resize = [int(x) for x in resize] if isinstance(resize, list) else resize
    return {"size": [int(out[0]), int(out[1])], "resize": resize,
            "mean": mean, "std": std, "mode": "RGB" if channels == 3 else "L", "interpolation": interpolation,
            "antialias": interpolation != "nearest", "crop": "center_floor"}, None

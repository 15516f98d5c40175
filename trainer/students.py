"""Built-in students for small images, and the resolver for --student names.

A student is named like a teacher ("torchvision:NAME" or "package.module:factory"), so a saved
student checkpoint ({"arch": "trainer.students:lenet", "arch_kwargs": ..., "state_dict": ...})
is a teacher checkpoint that `logitstore dump --teacher` can load for the next round.
"""
from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from logitstore.arch import accepts_kwargs, resolve_factory
from logitstore.checkpoint import load_weights_only
from logitstore.errors import ArchitectureError

from .errors import StudentError


def lenet(num_classes: int = 10, in_channels: int = 1, channels: tuple[int, int] = (6, 16),
          hidden: tuple[int, int] = (120, 84)) -> nn.Module:
    """LeNet-5 with ReLU and max-pooling; adaptive pooling to 5x5 so any input of 12+ pixels works."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(5), nn.Flatten(),
        nn.Linear(c2 * 25, hidden[0]), nn.ReLU(inplace=True),
        nn.Linear(hidden[0], hidden[1]), nn.ReLU(inplace=True),
        nn.Linear(hidden[1], num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet: a 3x3 stem, three stages of (depth-2)/6 basic blocks, widths w, 2w, 4w."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, depth: int = 20, width: int = 16):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"depth {depth} must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def cifar_resnet(num_classes: int = 10, in_channels: int = 3, depth: int = 20, width: int = 16) -> nn.Module:
    """CIFAR-style ResNet (ResNet-20 by default; depth=8 is a fast toy, 56 the classic large one)."""
    return CifarResNet(num_classes, in_channels, depth, width)


class TinyDeiT(nn.Module):
    """A small DeiT (Touvron et al. 2021): patch embedding, a class token and a distillation token, a
    pre-norm transformer, and one head per token. Training returns (class logits, distillation logits);
    eval returns their average, so its checkpoint evaluates and teaches like any other classifier.

    Patches are pooled to a fixed `grid` x `grid`, so any input of at least `patch` pixels works."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, patch: int = 4, grid: int = 7, dim: int = 64,
                 depth: int = 2, heads: int = 4):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(in_channels, dim, patch, patch), nn.AdaptiveAvgPool2d(grid))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 2, dim))
        for p in (self.cls_token, self.dist_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        b = len(tokens)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1), tokens], 1)
        h = self.norm(self.blocks(tokens + self.pos_embed))
        cls, dist = self.head(h[:, 0]), self.head_dist(h[:, 1])
        return (cls, dist) if self.training else (cls + dist) / 2


def tiny_deit(num_classes: int = 10, in_channels: int = 3, patch: int = 4, grid: int = 7, dim: int = 64,
              depth: int = 2, heads: int = 4) -> nn.Module:
    """A tiny DeiT-style ViT with a distillation token (two heads in training, their average in eval)."""
    return TinyDeiT(num_classes, in_channels, patch, grid, dim, depth, heads)


BUILTIN = {"lenet": lenet, "cifar_resnet": cifar_resnet, "tiny_deit": tiny_deit}


def resolve_student(name: str) -> str:
    """A --student value -> the arch string recorded in checkpoints."""
    if ":" in name:
        return name
    if name in BUILTIN:
        return f"{__name__}:{name}"
    raise StudentError(f"unknown student {name!r}; use a built-in ({', '.join(BUILTIN)}), "
                       "torchvision:NAME (e.g. torchvision:resnet18), timm:NAME (e.g. timm:resnet18) or "
                       "package.module:factory")


def parse_student_kwargs(text: str | dict[str, Any] | None) -> dict[str, Any]:
    if text is None:
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StudentError(f"--student-kwargs {text!r} is not JSON ({exc.msg}); "
                           "pass an object such as '{\"depth\": 8}'") from None
    if not isinstance(value, dict):
        raise StudentError(f"--student-kwargs must be a JSON object, not {type(value).__name__}")
    return value


# What a factory calls the input channels: timm's models take in_chans.
def _channels_kwarg(arch: str) -> str:
    return "in_chans" if arch.startswith("timm:") else "in_channels"


def natural_in_channels(arch: str, store_channels: int) -> int:
    """torchvision's classifiers are built for RGB; everything else takes the store's channels."""
    return 3 if arch.startswith("torchvision:") else store_channels


def build_student(arch: str, num_classes: int, in_channels: int, input_size: tuple[int, int],
                  student_kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the student and return it with the arch_kwargs that rebuild it (saved in checkpoints)."""
    try:
        factory = resolve_factory(arch, typed=True, where="--student")  # the user named it: trusted
    except ArchitectureError as exc:
        raise StudentError(str(exc)) from None
    kwargs = dict(student_kwargs or {})
    channels = _channels_kwarg(arch)
    wanted = {"num_classes": num_classes, channels: in_channels}
    # torchvision's builders take **kwargs but their models have no in_channels; we feed them RGB.
    takes = ({"num_classes": True, "in_channels": False} if arch.startswith("torchvision:")
             else accepts_kwargs(factory, *wanted))
    for name, value in wanted.items():
        if takes[name]:
            if name in kwargs and kwargs[name] != value:
                raise StudentError(f"--student-kwargs sets {name}={kwargs[name]} but the store needs {value}")
            kwargs[name] = value
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as exc:
        raise StudentError(f"student {arch!r} cannot be built with {kwargs}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise StudentError(f"student {arch!r}: the factory returned {type(model).__name__}, not an nn.Module")
    if hasattr(model, "set_distilled_training"):  # timm's *_distilled_* DeiTs answer one head unless asked
        model.set_distilled_training(True)
    _check_output(model, arch, num_classes, in_channels, input_size)
    return model, kwargs


def training_heads(model: nn.Module, arch: str, in_channels: int, input_size: tuple[int, int]) -> int:
    """1, or 2 for a DeiT-style student whose training forward returns (class logits, distillation logits).

    Probed with one training-mode forward of zeros; batch-norm statistics and the RNG are restored after."""
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            device = next(iter(model.parameters()), torch.empty(0)).device
            out = model(torch.zeros(2, in_channels, *input_size, device=device))
    finally:
        model.load_state_dict(buffers)
        model.train(was_training)
    if isinstance(out, torch.Tensor):
        return 1
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out) \
            and out[0].shape == out[1].shape:
        return 2
    raise StudentError(f"student {arch!r} returns a {type(out).__name__} in training; a student returns logits, "
                       "or (class logits, distillation logits) like DeiT")


def _head_keys(model_sd: dict[str, torch.Tensor], file_sd: dict[str, Any], num_classes: int) -> tuple[list[str], list[str]]:
    """(head keys to re-initialise, other keys whose shapes differ): a head tensor is the model's
    [num_classes, ...] weight or bias where the file has another class count and the same other dims."""
    head, other = [], []
    for k, t in model_sd.items():
        f = file_sd.get(k)
        if not isinstance(f, torch.Tensor) or f.shape == t.shape:
            continue
        if t.ndim >= 1 and f.ndim == t.ndim and t.shape[0] == num_classes and f.shape[1:] == t.shape[1:]:
            head.append(k)
        else:
            other.append(f"{k} {list(f.shape)} (model: {list(t.shape)})")
    return head, other


def load_student_weights(model: nn.Module, path: str, num_classes: int) -> str:
    """Start `model` from a file: a .safetensors file, a torch state dict, or a checkpoint dict holding
    "state_dict" (read without running code). A classifier head sized for another number of classes keeps
    its fresh initialisation; the note returned says which. Missing, unexpected or otherwise mis-shaped
    keys are one line naming them."""
    weights = load_weights_only(path, StudentError)
    if isinstance(weights, dict) and isinstance(weights.get("state_dict"), dict):
        weights = weights["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise StudentError(f"--student-weights {path}: not a state dict (a dict of tensor names to tensors, or a "
                           "checkpoint holding one as 'state_dict')")
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    head, other = _head_keys(own, weights, num_classes)
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", other)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    if problems:
        raise StudentError(f"--student-weights {path} does not fit this student: {'; '.join(problems)}; pass "
                           "weights saved from the same architecture")
    model.load_state_dict({k: own[k] if k in head else v for k, v in weights.items()})
    if not head:
        return f"{path}"
    return (f"{path} (head {', '.join(head)} re-initialised: the file has {weights[head[0]].shape[0]} classes, "
            f"the store {num_classes})")


def _check_output(model: nn.Module, arch: str, num_classes: int, in_channels: int,
                  input_size: tuple[int, int]) -> None:
    x = torch.zeros(2, in_channels, *input_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # any failure here means the net does not fit the store's inputs
        raise StudentError(f"student {arch!r} fails on a {list(x.shape)} input ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}); check --input-size / --in-channels") from None
    finally:
        model.train(was_training)
    if isinstance(out, (tuple, list)):
        raise StudentError(f"student {arch!r} returns a {type(out).__name__} in eval mode; a two-head (DeiT-style) "
                           "student returns (class, distillation) logits in training and their average in eval")
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StudentError(f"student {arch!r} returns {shape} for a batch of 2; the store has "
                           f"{num_classes} classes, so it must return [batch, {num_classes}]")

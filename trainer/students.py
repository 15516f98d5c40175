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


BUILTIN = {"lenet": lenet, "cifar_resnet": cifar_resnet}


def resolve_student(name: str) -> str:
    """A --student value -> the arch string recorded in checkpoints."""
    if ":" in name:
        return name
    if name in BUILTIN:
        return f"{__name__}:{name}"
    raise StudentError(f"unknown student {name!r}; use a built-in ({', '.join(BUILTIN)}), "
                       "torchvision:NAME (e.g. torchvision:resnet18) or package.module:factory")


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
    wanted = {"num_classes": num_classes, "in_channels": in_channels}
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
    _check_output(model, arch, num_classes, in_channels, input_size)
    return model, kwargs


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
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise StudentError(f"student {arch!r} returns {shape} for a batch of 2; the store has "
                           f"{num_classes} classes, so it must return [batch, {num_classes}]")

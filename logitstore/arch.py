"""Build a network from its name: "torchvision:NAME" or "package.module:factory".

Shared by teachers and students (they use one checkpoint format); it loads no weights.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from torch import nn

from .errors import ArchitectureError


def resolve_factory(arch: str) -> Callable[..., nn.Module]:
    """'torchvision:NAME' or 'package.module:factory' -> a callable that builds the model."""
    if ":" not in arch:
        raise ArchitectureError(f"architecture {arch!r} must be 'torchvision:NAME' or 'package.module:factory'")
    module_name, attr = arch.split(":", 1)
    if module_name == "torchvision":
        import torchvision

        if attr not in torchvision.models.list_models():
            raise ArchitectureError(f"architecture {arch!r}: torchvision has no model {attr!r} "
                               "(see torchvision.models.list_models())")
        return lambda **kw: torchvision.models.get_model(attr, weights=None, **kw)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"architecture {arch!r}: cannot import {module_name!r} ({exc}); "
                           "install it or add it to PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchitectureError(f"architecture {arch!r}: {module_name} has no callable {attr!r}")
    return factory


def build_model(arch: str, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build an architecture by name (also used for students, which share the checkpoint format)."""
    factory = resolve_factory(arch)
    kwargs = dict(arch_kwargs or {})
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ArchitectureError(f"architecture {arch!r} does not accept arch_kwargs {kwargs}: {exc}") from None


def accepts_kwargs(factory: Callable[..., Any], *names: str) -> dict[str, bool]:
    """Which of `names` a factory's signature takes (by name or **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {n: False for n in names}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {n: (n in params or var_kw) for n in names}

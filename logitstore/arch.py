"""Build a network from its name: "torchvision:NAME", "timm:NAME" or "package.module:factory".

Shared by teachers and students (they use one checkpoint format); it loads no weights.

Trust rule (docs/FORMAT.md, "Teacher files"): a checkpoint is loaded with weights_only=True, so its
pickle cannot run code, but it *names* an architecture and its keyword arguments. A name read from a
file resolves only in the model registries (torchvision's, timm's where installed, the built-in
students) or in modules the user trusts explicitly (`--trust-module NAME`, or the environment
variable LOGITSTORE_TRUST_MODULES=a,b). A name the user types on the command line is trusted by that
act. The decision is made on the name alone, before anything is imported or called; a factory that
is called must return an nn.Module.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
from typing import Any, Callable, Iterable

from torch import nn

from .errors import ArchitectureError, UntrustedCodeError

TRUST_ENV = "LOGITSTORE_TRUST_MODULES"
# The built-in students (trainer/students.py, `BUILTIN`): a student checkpoint written by
# `trainer fit` names one of them and must teach the next round without any flag. Spelled out here,
# by name, because the format core never imports the trainer.
BUILTIN_FACTORIES = {"trainer.students": ("lenet", "cifar_resnet", "tiny_deit")}
REGISTRIES = ("torchvision", "timm")
# "hf:DIR", a Hugging Face save_pretrained directory, is loaded by logitstore.teacher, never built here.
# Only a user may name one: a directory's config can ask for code to be fetched and run (auto_map), so a
# name read from a file is refused before anything is read, and a typed one is loaded without remote code.
HF = "hf"
# Bounds on what a file may ask a factory to allocate (docs/FORMAT.md, R3 and "Teacher files").
MAX_CLASSES = 1 << 20

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_ATTR = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def trusted_modules(extra: Iterable[str] = ()) -> frozenset[str]:
    """Modules trusted as factories: `extra` (--trust-module) and LOGITSTORE_TRUST_MODULES."""
    names = [*extra, *os.environ.get(TRUST_ENV, "").split(",")]
    return frozenset(n.strip() for n in names if n and n.strip())


def _split(arch: str) -> tuple[str, str]:
    if not isinstance(arch, str) or arch.count(":") != 1:
        raise ArchitectureError(f"architecture {str(arch)[:200]!r} must be 'torchvision:NAME', 'timm:NAME' "
                                "or 'package.module:factory'")
    module_name, attr = arch.split(":")
    if not _MODULE.fullmatch(module_name) or not (_ATTR.fullmatch(attr) or module_name in (*REGISTRIES, HF)):
        raise ArchitectureError(f"architecture {arch[:200]!r} is not a valid 'package.module:factory' name "
                                "(a public name, no leading underscore)")
    return module_name, attr


def _is_trusted(module_name: str, attr: str, trust: frozenset[str]) -> bool:
    if attr in BUILTIN_FACTORIES.get(module_name, ()):
        return True
    return any(module_name == m or module_name.startswith(m + ".") for m in trust)


def _registry_factory(module_name: str, attr: str) -> Callable[..., nn.Module]:
    if module_name == "torchvision":
        import torchvision

        if attr not in torchvision.models.list_models(module=torchvision.models):
            # classifiers only: detection and video builders fetch backbone weights by default
            raise ArchitectureError(f"architecture 'torchvision:{attr}': torchvision has no classification model "
                                    f"{attr!r} (see torchvision.models.list_models(module=torchvision.models))")
        return lambda **kw: torchvision.models.get_model(attr, weights=None, **kw)
    try:
        import timm
    except ImportError:
        raise ArchitectureError(f"architecture 'timm:{attr}' needs timm; pip install 'logitstore[timm]'") from None
    if not timm.is_model(attr):
        raise ArchitectureError(f"architecture 'timm:{attr}': timm has no model {attr!r} (see timm.list_models())")
    return lambda **kw: timm.create_model(attr, pretrained=False, **kw)


def resolve_factory(arch: str, *, typed: bool = False, trust_modules: Iterable[str] = (),
                    where: str = "the checkpoint") -> Callable[..., nn.Module]:
    """An architecture name -> the callable that builds it, refusing untrusted code before importing it.

    `typed`: the user gave this name on the command line (or in code), which trusts it. Otherwise it
    came from a file (`where`), and resolves only in the registries, the built-in students, or a
    module in `trust_modules` / LOGITSTORE_TRUST_MODULES.
    """
    if isinstance(arch, str) and arch.startswith(HF + ":"):
        if not typed:
            raise UntrustedCodeError(
                f"{where} names {arch[:200]!r}, a Hugging Face model directory: nothing was read or run. A file "
                "may not name one (its config could ask for remote code); pass it yourself as --teacher hf:DIR")
        raise ArchitectureError(f"{arch[:200]!r} is a model directory, not a factory: pass it as "
                                f"--teacher {arch[:200]}")
    module_name, attr = _split(arch)
    if module_name in REGISTRIES:
        return _registry_factory(module_name, attr)
    if not typed and not _is_trusted(module_name, attr, trusted_modules(trust_modules)):
        raise UntrustedCodeError(
            f"{where} names architecture {arch!r}, and module {module_name!r} is not trusted: nothing was "
            f"imported or run. A file may name torchvision:NAME, timm:NAME or a built-in student; if you trust "
            f"{module_name!r}, pass --trust-module {module_name} (or set {TRUST_ENV}={module_name})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"architecture {arch!r}: cannot import {module_name!r} ({exc}); "
                                "install it or add it to PYTHONPATH") from None
    factory = getattr(module, attr, None)
    defined_in = getattr(factory, "__module__", None) or ""
    if not callable(factory):
        raise ArchitectureError(f"architecture {arch!r}: {module_name} has no callable {attr!r}")
    if not typed and not (defined_in == module_name or defined_in.startswith(module_name + ".")):
        # A trusted module's own factories, not what it imported (`from os import system`).
        raise UntrustedCodeError(f"{where} names {arch!r}, which {module_name} imports from {defined_in!r} "
                                 "rather than defines; name the factory in its own module")
    return factory


# Keyword arguments that make a builder read or fetch a file of its own choosing (timm's
# checkpoint_path and pretrained_cfg_overlay file, torchvision's weights enums, hub caches): weights
# come only through the tools' own loaders, so arch_kwargs may name none of them.
_LOADING_KWARGS = re.compile(r"pretrained.*|.*checkpoint_path|.*weights.*|cache_dir|.*_path|.*_file|.*_?url|"
                             r"hub.*|download.*|local_files_only|trust_remote_code|revision", re.IGNORECASE)


def check_arch_kwargs(kwargs: Any, where: str) -> dict[str, Any]:
    """arch_kwargs: a dict of named values that loads nothing (no path, weights or download keyword)
    and asks for no more classes than MAX_CLASSES."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise ArchitectureError(f"{where}: arch_kwargs must be a dict of keyword arguments, "
                                f"not {type(kwargs).__name__}")
    loading = sorted(k for k in kwargs if _LOADING_KWARGS.fullmatch(k))
    if loading:
        raise UntrustedCodeError(f"{where}: arch_kwargs {loading} would make the builder load or fetch files "
                                 "of its own; weights come only through --weights / --pretrained")
    n = kwargs.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CLASSES):
        raise ArchitectureError(f"{where}: arch_kwargs num_classes={str(n)[:40]} must be an integer in "
                                f"1..{MAX_CLASSES}")
    return dict(kwargs)


def call_factory(factory: Callable[..., Any], arch: str, kwargs: dict[str, Any]) -> nn.Module:
    """Call a resolved factory; anything but an nn.Module back is one line."""
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise ArchitectureError(f"architecture {arch!r} does not accept arch_kwargs {kwargs}: {exc}") from None
    except (ValueError, RuntimeError, AssertionError, KeyError, OSError) as exc:
        raise ArchitectureError(f"architecture {arch!r} cannot be built with {kwargs}: "
                                f"{' '.join(str(exc).split())[:200]}") from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"architecture {arch!r} returned a {type(model).__name__}, not an nn.Module")
    return model


def build_model(arch: str, arch_kwargs: dict[str, Any] | None = None, *, typed: bool = False,
                trust_modules: Iterable[str] = (), where: str = "the checkpoint") -> nn.Module:
    """Build an architecture by name (also used for students, which share the checkpoint format).

    Names from files are resolved under the trust rule (see `resolve_factory`).
    """
    factory = resolve_factory(arch, typed=typed, trust_modules=trust_modules, where=where)  # the name first
    return call_factory(factory, arch, check_arch_kwargs(arch_kwargs, where))


def accepts_kwargs(factory: Callable[..., Any], *names: str) -> dict[str, bool]:
    """Which of `names` a factory's signature takes (by name or **kwargs)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {n: False for n in names}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return {n: (n in params or var_kw) for n in names}

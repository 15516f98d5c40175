"""Read model files without running their code: the {arch, arch_kwargs, state_dict, classes, preprocess}
checkpoint contract shared by teachers and students, and the zip checks every model file passes.

A checkpoint is read with torch.load(weights_only=True): its pickle may only rebuild tensors and plain
containers. A `.safetensors` file (a JSON header and raw tensor bytes) is read with safetensors, never
through pickle. Files in torch's zip layout (torch.save, TorchScript, torch.export .pt2) must keep their
tensors uncompressed, as torch writes them: a file whose compressed entries would inflate far beyond
their size is refused before it is read, so a small file can never take gigabytes of memory.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import TeacherError

SAVE_HINT = ("save a state-dict checkpoint instead: torch.save({'arch': 'torchvision:resnet18' or "
             "'package.module:factory', 'arch_kwargs': {...}, 'state_dict': model.state_dict(), "
             "'classes': [...], 'preprocess': {...}}, PATH)")
CHECKPOINT_KEYS = ("arch", "arch_kwargs", "state_dict", "classes", "preprocess")


# What the compressed entries of a model file may inflate to, in all: TorchScript deflates its code and
# debug records (3-4x), tensors are stored. Deflate reaches ~1000x, so a 2 MB bomb is refused.
INFLATE_LIMIT_BYTES = 64 << 20
INFLATE_LIMIT_RATIO = 16


def check_zip_entries(path: Path, error: type[Exception] = TeacherError, stored_only: bool = False) -> None:
    """Refuse a zip that would inflate beyond what its kind of file holds (a zip bomb), before reading it.

    Entries stored uncompressed must say so consistently; compressed entries (`stored_only` refuses
    any) may inflate in all to INFLATE_LIMIT_BYTES + INFLATE_LIMIT_RATIO x their compressed size.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise error(f"{path}: not a readable zip file ({exc}); the file is damaged or not a model file") from None
    size = os.path.getsize(path)
    packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    for info in infos:
        if info.compress_type == zipfile.ZIP_STORED and (info.file_size != info.compress_size or info.file_size > size):
            raise error(f"{path}: zip entry {info.filename[:100]!r} claims {info.file_size} bytes stored in "
                        f"{info.compress_size}; the file is damaged")
    if packed and stored_only:
        raise error(f"{path}: zip entry {packed[0].filename[:100]!r} is compressed; a packed store keeps its "
                    "entries uncompressed (`logitstore pack` writes them so): pack it again")
    inflated, deflated = sum(i.file_size for i in packed), sum(i.compress_size for i in packed)
    if inflated > INFLATE_LIMIT_BYTES + INFLATE_LIMIT_RATIO * deflated:
        raise error(f"{path}: its compressed zip entries would inflate {deflated:,} bytes into {inflated:,} "
                    "(a zip bomb, or not a file torch wrote); refused before reading it")


def is_safetensors(path: Path) -> bool:
    """A safetensors file: 8 bytes of little-endian header length, then the JSON header's '{'."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def load_safetensors(path: Path, error: type[Exception] = TeacherError) -> dict[str, torch.Tensor]:
    """A .safetensors file -> {name: tensor} on the CPU; a damaged file is one line of `error`."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise error(f"{path}: reading .safetensors needs the safetensors package; "
                    "pip install 'logitstore[timm]' (or pip install safetensors)") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: not a readable safetensors file ({first}); the file is damaged or not a weights "
                    "file") from None


def is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (torch.jit.save): code beside the constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_weights_only(path: str | os.PathLike, error: type[Exception] = TeacherError) -> Any:
    """torch.load(weights_only=True) of a file (or safetensors' own reader), every failure one line of `error`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise error(f"{p}: no such file; check the path")
    if p.stat().st_size == 0:
        raise error(f"{p}: the file is empty; it was not saved completely, save or copy it again")
    if is_safetensors(p):
        return load_safetensors(p, error)
    check_zip_entries(p, error)
    if p.suffix == ".pt2" or is_torchscript(p):  # a program: no state dict, classes or preprocessing to read
        kind = "torch.export program" if p.suffix == ".pt2" else "TorchScript program"
        raise error(f"{p}: a {kind}, not weights or a checkpoint; pass a torch.save'd state dict or checkpoint "
                    "here, such as trainer fit writes (only `logitstore dump --teacher` runs a program)")
    try:
        with warnings.catch_warnings():  # torch warns before refusing (a pickle protocol, a TorchScript archive)
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():  # a pickle naming classes or functions: the safe loader refuses them
            raise error(f"{p}: refused to unpickle it (it holds Python objects such as a whole nn.Module, and "
                        f"loading it would run arbitrary code); {SAVE_HINT}") from None
        raise error(f"{p}: not a PyTorch checkpoint (not torch.save's format: another file, or a plain pickle); "
                    "pass a torch.save'd state dict or checkpoint") from None
    except Exception as exc:  # torch raises many kinds on truncated or foreign files
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise error(f"{p}: not a readable PyTorch checkpoint ({first}); pass a torch.save'd state dict or "
                    "checkpoint") from None

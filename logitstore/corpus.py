"""Walk an image corpus, give each image an id and a digest, and decode any PIL mode to uint8."""
from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from .errors import CorpusError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

# A truncated file must fail, not decode as a half-grey image that silently teaches garbage.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Corpus:
    root: Path                 # ids are relative to this
    ids: list[str]             # POSIX paths relative to root, in a deterministic order
    listing: str               # "directory", or the listing file it came from
    positional = True          # read by listing position in the dump's DataLoader workers

    @property
    def n_listed(self) -> int:
        return len(self.ids)

    def protected(self) -> list[str]:
        """What a dump reads, which its --out must not overlap."""
        return [str(self.root)]

    def record(self) -> None:
        """A local corpus records no `corpus.source`: ids are paths under the root (every format)."""
        return None

    def path(self, image_id: str) -> Path:
        return self.root / image_id

    def listing_sha256(self) -> str:
        h = hashlib.sha256()
        for i in self.ids:
            h.update(i.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()


def id_problem(image_id: str) -> str | None:
    """Why `image_id` cannot be a stored id (ids are UTF-8 text, docs/FORMAT.md), or None: a file or member
    name whose bytes are not UTF-8, which Python hands over with surrogate escapes."""
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "UnicodeError: the file name is not valid UTF-8; rename the file (for example with convmv) to dump it"
    return None


def printable_id(image_id: str) -> str:
    """`image_id` as UTF-8 text, any byte that is not UTF-8 written \\xNN: how a failure names such a file."""
    return image_id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def list_corpus(source: str | os.PathLike) -> Corpus:
    """A directory (walked recursively, sorted by id) or a text file with one path per line.

    Paths in a listing file may be absolute or relative to the file's folder; ids are
    relative to their common root so they stay portable.
    """
    src = Path(source).expanduser()
    if src.is_dir():
        root = src.resolve()
        ids = [p.relative_to(root).as_posix() for p in _walk_images(root)]
        ids.sort()
        if not ids:
            raise CorpusError(f"{src}: no images ({', '.join(IMAGE_EXTENSIONS)}) found; "
                              "point --images at a folder of images or a text file listing them")
        return Corpus(root=root, ids=ids, listing="directory")
    if src.is_file():
        try:
            lines = [ln.strip() for ln in src.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise CorpusError(f"{src}: not a text listing of image paths (it is not UTF-8 text); "
                              "pass a folder or a file with one image path per line") from None
        urls = [ln for ln in lines if "://" in ln]
        if urls:  # a URL is no local path ("s3:/bucket/..." would name a missing file)
            raise CorpusError(f"{src}: mixes URLs and local paths (line {urls[0]!r}); list one kind")
        paths = [Path(ln) if os.path.isabs(ln) else (src.parent / ln) for ln in lines
                 if ln and not ln.startswith("#")]
        if not paths:
            raise CorpusError(f"{src}: the listing names no images; add one path per line")
        paths = [Path(os.path.abspath(p)) for p in paths]
        root = Path(os.path.commonpath([str(p.parent) for p in paths]))
        ids = [p.relative_to(root).as_posix() for p in paths]
        if len(set(ids)) != len(ids):
            raise CorpusError(f"{src}: the listing names some images twice; each image must appear once")
        return Corpus(root=root, ids=ids, listing=str(src.resolve()))
    raise CorpusError(f"{src}: no such folder or listing file; check the --images path")


def _walk_images(root: Path) -> list[Path]:
    """Image files under `root` in name order, following directory links as `os.walk(followlinks=True)`
    did, except into a folder that is already on the current path (a link cycle is walked once). FIFOs,
    sockets and devices named like images are left out (reading one would block); a dangling link named
    like an image is kept, so that it is recorded as a failure."""
    found: list[Path] = []

    def walk(folder: Path, ancestors: frozenset) -> None:
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return  # an unreadable folder holds nothing we can dump
        here = ancestors | {(st.st_dev, st.st_ino)}
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                if e.is_dir():
                    inner = os.stat(e.path)
                    if (inner.st_dev, inner.st_ino) not in here:
                        walk(Path(e.path), here)
                elif e.name.lower().endswith(IMAGE_EXTENSIONS) and (e.is_file() or not os.path.exists(e.path)):
                    found.append(Path(e.path))
            except OSError:
                continue  # a link that loops on itself
    walk(root, frozenset())
    return found


def sha256_bytes(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode_image(data: bytes, mode: str) -> torch.Tensor:
    """File bytes -> uint8 [C, H, W] in `mode` ("RGB" or "L"), EXIF orientation applied.

    Raises on anything that is not a whole, readable image.
    """
    with warnings.catch_warnings():
        # PIL warns (not raises) on some broken files; a warning here means a bad image.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # GIF/TIFF: the first frame
            im = ImageOps.exif_transpose(im)
            arr = _to_mode(im, mode)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def _to_mode(im: Image.Image, mode: str) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit-depth greyscale: scale to 8 bits rather than let PIL clip at 255.
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return grey if mode == "L" else np.repeat(grey[:, :, None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Drop alpha the way PIL (and torchvision's loaders) do: keep the stored colour.
        im = im.convert("RGBA").convert("RGB")
    return np.asarray(im.convert(mode), dtype=np.uint8)


def read_and_decode(path: Path, mode: str) -> tuple[bytes, torch.Tensor]:
    """(sha256 digest, uint8 pixels) from one read of the file; raises on any failure."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the read forever
        raise OSError(f"not a regular file (a folder, FIFO, socket or device): {path.name}")
    data = path.read_bytes()
    return sha256_bytes(data), decode_image(data, mode)


def describe_failure(exc: BaseException) -> str:
    """A short, stable reason for a failed image (the same file fails the same way every run)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    # PIL names the in-memory buffer with its address; keep reasons identical across runs.
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text)
    return f"{type(exc).__name__}: {text}"[:300]

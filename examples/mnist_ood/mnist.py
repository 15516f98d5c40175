"""MNIST in and out: read an .npz or an ImageFolder, write image folders, make the embedded subset."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
EMBEDDED = HERE / "data" / "mnist_small.npz"
CLASSES = [str(i) for i in range(10)]
# The checkpoint's `preprocess`: MNIST's usual normalisation (training-set mean and std).
PREPROCESS = {"size": [28, 28], "mean": [0.1307], "std": [0.3081], "mode": "L"}
KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass
class Mnist:
    train_images: np.ndarray   # [N, 28, 28] uint8, white digit on black
    train_labels: np.ndarray   # [N] int64
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str

    def __str__(self) -> str:
        return f"{self.source} ({len(self.train_images):,} train / {len(self.test_images):,} test)"


def load(source: str | Path | None) -> Mnist:
    """An .npz with train_/test_ images and labels, a folder with train/ and test/ ImageFolders, or
    None for the subset embedded in this example."""
    path = Path(source).expanduser() if source is not None else EMBEDDED
    if path.is_file():
        with np.load(path) as d:
            missing = [k for k in KEYS if k not in d.files]
            if missing:
                raise SystemExit(f"{path}: missing arrays {missing}; expected {', '.join(KEYS)}")
            arrays = {k: d[k] for k in KEYS}
        for k in ("train_images", "test_images"):
            if arrays[k].dtype != np.uint8 or arrays[k].shape[1:] != (28, 28):
                raise SystemExit(f"{path}: {k} must be uint8 [N, 28, 28], got {arrays[k].dtype} {arrays[k].shape}")
        return Mnist(arrays["train_images"], arrays["train_labels"].astype(np.int64),
                     arrays["test_images"], arrays["test_labels"].astype(np.int64), source=str(path))
    if path.is_dir():
        train, test = path / "train", path / "test"
        if not (train.is_dir() and test.is_dir()):
            raise SystemExit(f"{path}: an ImageFolder source needs train/0..9 and test/0..9 sub-folders")
        tr_x, tr_y = _read_image_folder(train)
        te_x, te_y = _read_image_folder(test)
        return Mnist(tr_x, tr_y, te_x, te_y, source=str(path))
    raise SystemExit(f"{path}: no such file or folder (give an .npz like ../shared/datasets/mnist.npz "
                     "or a folder with train/ and test/ ImageFolders)")


def _read_image_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        folder = root / name
        if not folder.is_dir():
            raise SystemExit(f"{root}: class folder {name!r} is missing (expected sub-folders 0..9)")
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"):
                with Image.open(p) as im:
                    images.append(np.asarray(im.convert("L").resize((28, 28), Image.BILINEAR), np.uint8))
                labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def write_folder(images: np.ndarray, root: Path, labels: np.ndarray | None = None, shard: int = 1000) -> Path:
    """PNG files: ImageFolder (root/<class>/NNNNNN.png) with labels, else root/<shard>/NNNNNN.png."""
    root.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        sub = root / (CLASSES[int(labels[i])] if labels is not None else f"{i // shard:03d}")
        sub.mkdir(exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:06d}.png")
    return root


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of n examples, as close to n/10 per class as the data allows, in a seeded order."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.nonzero(labels == c)[0]) for c in range(len(CLASSES))]
    take = [p[: n // len(CLASSES) + (1 if c < n % len(CLASSES) else 0)] for c, p in enumerate(per_class)]
    return rng.permutation(np.concatenate(take))


def make_embedded(full: Mnist, out: Path = EMBEDDED, n_train: int = 12000, n_test: int = 2000,
                  seed: int = 0) -> Path:
    """The subset shipped with the repository (see data/README.md for its licence and provenance)."""
    tr = balanced_subset(full.train_labels, n_train, seed)
    te = balanced_subset(full.test_labels, n_test, seed + 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, train_images=full.train_images[tr], train_labels=full.train_labels[tr].astype(np.uint8),
                        test_images=full.test_images[te], test_labels=full.test_labels[te].astype(np.uint8),
                        train_index=tr.astype(np.int32), test_index=te.astype(np.int32))
    return out


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m examples.mnist_ood.mnist PATH/TO/mnist.npz  (rewrites data/mnist_small.npz)")
    print(make_embedded(load(sys.argv[1])))

"""Shared, session-cached fixtures for the trainer tests: a tiny MNIST teacher, corpora and stores.

Everything is built once per test session (module-level cache), from a few hundred real MNIST
images: a LeNet teacher trained for a few hundred steps, an unlabeled corpus of PNGs in folders
that are not class names, a labeled test folder, and stores dumped with the real `logitstore.dump`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

MNIST = Path(os.environ.get("MNIST_NPZ", Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist.npz"))
MNIST_PRE = {"size": [28, 28], "mean": [0.1307], "std": [0.3081], "mode": "L"}
CLASSES = [str(i) for i in range(10)]


@dataclass(frozen=True)
class World:
    root: Path
    teacher: Path          # teacher checkpoint (trainer.students:lenet weights)
    teacher_acc: float     # its top-1 on the labeled folder
    corpus: Path           # unlabeled PNGs, in folders that are not class names
    labeled: Path          # labeled test folder: <class>/<n>.png
    store: Path            # teacher logits over `corpus`, 1 eval view, 64 rows per chunk
    store_views: Path      # the same with 3 random-resized-crop views per image


def _write_pngs(images: np.ndarray, paths: list[Path]) -> None:
    for img, p in zip(images, paths):
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(p)


def _train_teacher(x: np.ndarray, y: np.ndarray, out: Path) -> None:
    from trainer.students import lenet

    torch.manual_seed(0)
    model = lenet(num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    xt = (torch.from_numpy(x).float().div(255).sub(0.1307).div(0.3081)).unsqueeze(1)
    yt = torch.from_numpy(y).long()
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save({"arch": "trainer.students:lenet", "arch_kwargs": {"num_classes": 10, "in_channels": 1},
                "state_dict": model.state_dict(), "classes": CLASSES, "preprocess": MNIST_PRE}, out)


_WORLD: World | None = None


def build_world(root: Path) -> World:
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not MNIST.is_file():
        pytest.fail(f"MNIST not found at {MNIST}: the tests need ../shared/datasets/mnist.npz beside the repository")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_torch_thread
    try:
        _WORLD = _build(root)
    finally:
        torch.set_num_threads(threads)
    return _WORLD


def _build(root: Path) -> World:
    import logitstore

    d = np.load(MNIST)
    teacher = root / "teacher.pt"
    _train_teacher(d["train_images"][:2000], d["train_labels"][:2000], teacher)
    corpus = root / "corpus"
    unl = d["train_images"][5000:5640]
    _write_pngs(unl, [corpus / f"part{i // 200}" / f"img{i:05d}.png" for i in range(len(unl))])
    labeled = root / "labeled"
    te, tl = d["test_images"][:300], d["test_labels"][:300]
    _write_pngs(te, [labeled / str(int(c)) / f"t{i:05d}.png" for i, c in enumerate(tl)])
    store = root / "mnist.zarr"
    logitstore.dump(str(teacher), str(corpus), str(store), chunk_rows=64, batch_size=128, num_workers=0)
    store_views = root / "mnist_views.zarr"
    logitstore.dump(str(teacher), str(corpus), str(store_views), views=3, seed=1, chunk_rows=64, batch_size=128,
                    num_workers=0, crop_scale=(0.5, 1.0))
    from trainer import evaluate

    acc = evaluate(teacher, labeled).top1
    return World(root, teacher, acc, corpus, labeled, store, store_views)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny nets gain nothing from a second intra-op thread, and on a shared 2-core machine OpenMP's
    spin-waiting makes 2 threads many times slower than 1; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("trainer_world"))

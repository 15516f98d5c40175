"""Shared fixtures: a small real-MNIST corpus on disk and tiny real teacher checkpoints."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MNIST = REPO.parent / "shared" / "datasets" / "mnist.npz"
# The test teachers name `nets:...` (tests/nets.py): the tests trust that module, as a user trusts
# their own, so every checkpoint they write loads (logitstore/arch.py, the trust rule).
os.environ.setdefault("LOGITSTORE_TRUST_MODULES", "nets")
MNIST_PRE = {"size": [28, 28], "mean": [0.1307], "std": [0.3081], "mode": "L"}
CLASSES = [str(i) for i in range(10)]


def run_cli(*args: str, check: bool = True, timeout: float = 300, env: dict[str, str | None] | None = None,
            **kw) -> subprocess.CompletedProcess:
    """Run `python -m logitstore ...` (or trainer) as a user would, with tests/ importable.

    `env` changes the environment (a None value removes the variable)."""
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])}
    env = {k: v for k, v in {**base, **(env or {})}.items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def mnist() -> dict[str, np.ndarray]:
    if not MNIST.exists():
        pytest.fail(f"{MNIST} is missing: the tests need ../shared/datasets/mnist.npz beside the repository")
    with np.load(MNIST) as d:
        return {k: d[k] for k in d.files}


def invoke(tool: str, *args: str) -> subprocess.CompletedProcess:
    """The same command line as `run_cli`, run in this process (click's runner): for the many quick
    refusals, where starting Python and torch again would cost seconds each."""
    from click.testing import CliRunner

    main = __import__(f"{tool}.cli", fromlist=["main"]).main
    r = CliRunner().invoke(main, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess([tool, *args], r.exit_code, r.stdout, r.stderr)


def ctrl_c_at_call(n: int):
    """A progress callback (on_batch, on_key) that raises KeyboardInterrupt at its n-th call: Ctrl-C at a known
    point of a dump or copy run in this process."""
    calls = 0

    def callback(_: int) -> None:
        nonlocal calls
        calls += 1
        if calls == n:
            raise KeyboardInterrupt
    return callback


def interruptible() -> None:
    """preexec_fn of a child that a test stops with Ctrl-C: SIGINT back to its default, so the child's Python
    raises KeyboardInterrupt even when this test run was started in the background (a shell without job
    control starts background jobs with SIGINT ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """A user error: exit `code`, one line on stderr naming what went wrong, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def flip_byte(path: Path, offset: int, mask: int) -> None:
    """Corrupt one byte of a file in place (a chunk, to prove checksums catch it)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def write_pngs(images: np.ndarray, folder: Path, labels: np.ndarray | None = None) -> list[Path]:
    paths = []
    for i, img in enumerate(images):
        sub = folder / str(int(labels[i])) if labels is not None else folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"img{i:05d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, mnist) -> Path:
    """120 real MNIST digits as PNGs in nested folders (no labels), read-only for tests."""
    root = tmp_path_factory.mktemp("corpus")
    write_pngs(mnist["train_images"][:120], root)
    return root


def save_teacher(path: Path, arch: str = "nets:tiny_cnn", seed: int = 0, **arch_kwargs) -> Path:
    import importlib

    module, name = arch.split(":")
    torch.manual_seed(seed)
    model = getattr(importlib.import_module(module), name)(**arch_kwargs)
    torch.save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": model.state_dict(), "classes": CLASSES,
                "preprocess": MNIST_PRE}, path)
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def load_module(arch: str = "nets:tiny_cnn", ckpt: Path | None = None) -> torch.nn.Module:
    import importlib

    module, name = arch.split(":")
    state = torch.load(ckpt, weights_only=True)
    model = getattr(importlib.import_module(module), name)(**state.get("arch_kwargs", {}))
    model.load_state_dict(state["state_dict"])
    return model.eval()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on loopback; AWS_* variables point every client (ours, s3fs, boto3) at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="caches")
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --- the trainer's world: built once per session ---------------------------------------------
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


def build_world(root: Path) -> World:
    if not MNIST.is_file():
        pytest.fail(f"MNIST not found at {MNIST}: the tests need ../shared/datasets/mnist.npz beside the repository")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see one_torch_thread
    try:
        return _build(root)
    finally:
        torch.set_num_threads(threads)


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


@pytest.fixture
def one_torch_thread():
    """Tiny nets gain nothing from a second intra-op thread, and on a shared 2-core machine OpenMP's
    spin-waiting makes 2 threads many times slower than 1; restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A tiny MNIST teacher (trained for a few hundred steps), an unlabeled corpus of PNGs in folders
    that are not class names, a labeled test folder, and stores dumped with the real `logitstore.dump`."""
    return build_world(tmp_path_factory.mktemp("trainer_world"))

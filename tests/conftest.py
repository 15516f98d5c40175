"""Shared fixtures: a small real-MNIST corpus on disk and tiny real teacher checkpoints."""
from __future__ import annotations

import os
import subprocess
import sys
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

"""logitstore dump: teacher forms, stored values, views, failures, resume, errors."""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

import logitstore
from logitstore import schema
from logitstore.corpus import read_and_decode
from logitstore.errors import (LogitRangeError, ResumeMismatchError, StoreStateError, TeacherError)
from logitstore.views import apply_view, normalize

from conftest import (CLASSES, MNIST_PRE, REPO, TESTS, assert_one_line_error, interruptible, invoke, load_module,
                      run_cli, save_teacher)


def forward_reference(model: torch.nn.Module, corpus: Path, ids, params=None, kind="eval") -> np.ndarray:
    """An independent forward pass: decode each image, build its view, run the model, float32."""
    pre = schema.Preprocess.from_dict(MNIST_PRE)
    out = []
    for n, image_id in enumerate(ids):
        _, img = read_and_decode(corpus / image_id, "L")
        rows = params[n] if params is not None else np.array([[0, 0, img.shape[1], img.shape[2], 0]])
        x = torch.stack([apply_view(img, p, pre, kind) for p in rows])
        with torch.no_grad():
            out.append(model(normalize(x, pre)).numpy())
    return np.stack(out)


def test_stored_logits_equal_an_independent_forward_pass(tmp_path, corpus, teacher_ckpt):
    s = logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "s.zarr"), num_workers=0, chunk_rows=32)
    assert (s.n_images, s.n_failed) == (120, 0)
    store = logitstore.open_store(tmp_path / "s.zarr")
    rows = store[:]
    assert len(store) == 120 and rows.logits.shape == (120, 1, 10) and rows.logits.dtype == np.float16
    assert list(rows.ids) == sorted(rows.ids) and rows.ids[0] == "part0/img00000.png"
    ref = forward_reference(load_module(ckpt=teacher_ckpt), corpus, rows.ids)
    np.testing.assert_allclose(rows.logits.astype(np.float32), ref, rtol=1e-3, atol=2e-3)
    # Digests are the sha256 of the file bytes; hw is the decoded size.
    import hashlib

    assert rows.digests[5].tobytes() == hashlib.sha256((corpus / rows.ids[5]).read_bytes()).digest()
    assert (rows.image_hw == [28, 28]).all()
    m = store.meta
    assert m.complete and m.classes == tuple(CLASSES) and m.preprocess.mode == "L"
    assert m.teacher.arch == "nets:tiny_cnn" and len(m.teacher.sha256) == 64
    assert m.corpus.n_images == 120 and m.format_version == schema.version_for(m.targets, m.views)
    assert {"torch", "zarr", "logitstore"} <= set(m.versions)


def test_float32_dtype_is_exact(tmp_path, corpus, teacher_ckpt):
    logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "s.zarr"), num_workers=0, dtype="float32")
    rows = logitstore.open_store(tmp_path / "s.zarr")[:]
    ref = forward_reference(load_module(ckpt=teacher_ckpt), corpus, rows.ids)
    assert rows.logits.dtype == np.float32
    np.testing.assert_allclose(rows.logits, ref, rtol=1e-5, atol=1e-5)


def test_every_array_is_chunked_compressed_and_checksummed(tmp_path, corpus, teacher_ckpt):
    logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "s.zarr"), num_workers=0, chunk_rows=32)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    for name in (*schema.ROW_ARRAYS, *schema.FAILURE_ARRAYS):
        names = [type(c).__name__ for c in g[name].metadata.codecs]
        assert names[-1] == "Crc32cCodec", (name, names)
        assert any(n in ("BloscCodec", "ZstdCodec") for n in names), (name, names)
    assert g[schema.LOGITS].chunks == (32, 1, 10)
    assert g[schema.IDS].metadata.data_type.to_json(zarr_format=3) in ("string", "str")


def test_views_replay_reproduces_the_teachers_logits(tmp_path, corpus, teacher_ckpt):
    logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "v.zarr"), num_workers=0, views=3, seed=7,
                    crop_scale=(0.3, 1.0))
    store = logitstore.open_store(tmp_path / "v.zarr")
    rows = store[:20]
    assert store.meta.views.count == 3 and store.meta.views.kind == "random_resized_crop"
    assert rows.view_params.shape == (20, 3, 5)
    # Views differ from each other and are real crops of the 28x28 originals.
    assert len({tuple(p) for p in rows.view_params[:, :, :4].reshape(-1, 4)}) > 30
    assert (rows.view_params[:, :, 2] <= 28).all() and set(np.unique(rows.view_params[:, :, 4])) <= {0, 1}
    ref = forward_reference(load_module(ckpt=teacher_ckpt), corpus, rows.ids, rows.view_params,
                            "random_resized_crop")
    np.testing.assert_allclose(rows.logits.astype(np.float32), ref, rtol=1e-3, atol=2e-3)
    # Deterministic given the seed; another seed gives other crops.
    logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "v2.zarr"), num_workers=2, views=3, seed=7,
                    crop_scale=(0.3, 1.0), batch_size=16)
    np.testing.assert_array_equal(logitstore.open_store(tmp_path / "v2.zarr")[:].view_params, store[:].view_params)
    logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "v3.zarr"), num_workers=0, views=3, seed=8,
                    crop_scale=(0.3, 1.0))
    assert not np.array_equal(logitstore.open_store(tmp_path / "v3.zarr")[:].view_params, store[:].view_params)


def _odd_images(root: Path, mnist_img: np.ndarray) -> dict[str, str]:
    """Every PIL mode we promise to read, plus broken files. Returns id -> expected outcome."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([mnist_img] * 3, axis=-1)
    Image.fromarray(mnist_img, "L").save(root / "l.png")
    Image.fromarray(mnist_img, "L").convert("LA").save(root / "la.png")
    Image.fromarray(mnist_img, "L").convert("P").save(root / "p.gif")
    Image.fromarray(rgb).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.tif")
    Image.fromarray(rgb).save(root / "rgb.jpg", quality=95)
    Image.fromarray(rgb).save(root / "rgb.webp")
    Image.fromarray(rgb).save(root / "rgb.bmp")
    Image.fromarray((mnist_img.astype(np.uint16) * 257)).save(root / "i16.png")
    # EXIF orientation 6 (rotate 90 CW on display): a 20x28 stored image decodes as 28x20.
    im = Image.fromarray(mnist_img[:20, :])
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(root / "exif.jpg", exif=exif.tobytes())
    good = (root / "l.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    (root / "empty.png").write_bytes(b"")
    return {"truncated.png": "fail", "not_an_image.jpg": "fail", "empty.png": "fail"}


def test_every_pil_mode_decodes_and_broken_files_are_recorded(tmp_path, mnist, teacher_ckpt):
    root = tmp_path / "odd"
    bad = _odd_images(root, mnist["train_images"][0])
    s = logitstore.dump(str(teacher_ckpt), str(root), str(tmp_path / "o.zarr"), num_workers=0)
    store = logitstore.open_store(tmp_path / "o.zarr")
    ids = list(store[:].ids)
    assert s.n_failed == 3 and s.n_images == 10 and len(store) == 10
    assert set(ids) == {"l.png", "la.png", "p.gif", "rgba.png", "cmyk.tif", "rgb.jpg", "rgb.webp", "rgb.bmp",
                        "i16.png", "exif.jpg"}
    failures = dict(store.failures())
    assert set(failures) == set(bad)
    assert all(failures[k] for k in bad) and "0x" not in "".join(failures.values())
    hw = dict(zip(ids, store[:].image_hw.tolist()))
    assert hw["exif.jpg"] == [28, 20]
    # Lossless modes decode to the same grey pixels, so their logits match the plain L image.
    lg = dict(zip(ids, store[:].logits[:, 0].astype(np.float32)))
    for k in ("la.png", "p.gif", "rgba.png", "i16.png", "rgb.bmp"):
        np.testing.assert_allclose(lg[k], lg["l.png"], atol=2e-3, err_msg=k)
    info = json.loads(run_cli("logitstore", "info", str(tmp_path / "o.zarr"), "--json").stdout)
    assert info["failed"] == 3 and info["images"] == 10


def test_a_file_name_that_is_not_utf8_is_a_recorded_failure(tmp_path, mnist, teacher_ckpt):
    """Store ids are UTF-8 text: a Latin-1 file name (Python's surrogate escapes) is recorded as a failure that
    names it printably, and the rest of the corpus is dumped; a second run has nothing to do."""
    root = tmp_path / "names"
    root.mkdir()
    Image.fromarray(mnist["train_images"][0]).save(root / "ok.png")
    (root / "caf\u00e9.png").write_bytes((root / "ok.png").read_bytes())
    with open(os.path.join(os.fsencode(root), b"latin1_\xe9.png"), "wb") as f:
        f.write((root / "ok.png").read_bytes())
    s = logitstore.dump(str(teacher_ckpt), str(root), str(tmp_path / "n.zarr"), num_workers=0)
    store = logitstore.open_store(tmp_path / "n.zarr")
    assert (s.n_images, s.n_failed) == (2, 1) and sorted(store[:].ids) == ["caf\u00e9.png", "ok.png"]
    assert store.failures() == [("latin1_\\xe9.png", "UnicodeError: the file name is not valid UTF-8; rename the "
                                 "file (for example with convmv) to dump it")]
    np.testing.assert_array_equal(store[:].logits[0], store[:].logits[1])  # the same bytes
    assert logitstore.dump(str(teacher_ckpt), str(root), str(tmp_path / "n.zarr"), num_workers=0).nothing_to_do


def test_listing_file_gives_ids_relative_to_common_root(tmp_path, corpus, teacher_ckpt):
    files = sorted(corpus.rglob("*.png"))[::17][:7][::-1]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in files) + "\n")
    logitstore.dump(str(teacher_ckpt), str(listing), str(tmp_path / "l.zarr"), num_workers=0)
    store = logitstore.open_store(tmp_path / "l.zarr")
    assert list(store[:].ids) == [p.relative_to(corpus).as_posix() for p in files]  # listing order kept
    assert store.meta.corpus.root == str(corpus)
    # the same listing finds the images again (verify, show and fit take its common root)
    r = invoke("logitstore", "verify", str(tmp_path / "l.zarr"), "--images", str(listing))
    assert r.returncode == 0 and "7 of 7 images read matched their digests" in r.stdout, r.stderr


def _torchvision_state(tmp_path: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    torch.save(m.state_dict(), tmp_path / "r18.pth")
    return tmp_path / "r18.pth"


def test_every_teacher_form_gives_the_same_logits(tmp_path, corpus, teacher_ckpt):
    model = load_module(ckpt=teacher_ckpt)
    torch.jit.save(torch.jit.script(model), tmp_path / "t.ts")
    ep = torch.export.export(model, (torch.zeros(2, 1, 28, 28),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    torch.export.save(ep, tmp_path / "t.pt2")
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    flags = dict(size=(28, 28), mean=(0.1307,), std=(0.3081,), mode="L", num_workers=0)
    outs = {"checkpoint": logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "a.zarr"), num_workers=0),
            "torchscript": logitstore.dump(str(tmp_path / "t.ts"), str(corpus), str(tmp_path / "b.zarr"), **flags),
            "export": logitstore.dump(str(tmp_path / "t.pt2"), str(corpus), str(tmp_path / "c.zarr"), **flags),
            "factory": logitstore.dump("nets:tiny_cnn", str(corpus), str(tmp_path / "d.zarr"),
                                       weights=str(tmp_path / "sd.pth"), **flags)}
    stores = {k: logitstore.open_store(v.out) for k, v in outs.items()}
    base = stores["checkpoint"][:].logits.astype(np.float32)
    for k, st in stores.items():
        np.testing.assert_allclose(st[:].logits.astype(np.float32), base, atol=2e-3, err_msg=k)
        assert st.meta.teacher.source == k
    # torchvision:NAME --weights FILE, RGB input: class names default to indices.
    r18 = _torchvision_state(tmp_path)
    s = logitstore.dump("torchvision:resnet18", str(corpus), str(tmp_path / "e.zarr"), weights=str(r18),
                        arch_kwargs={"num_classes": 10}, size=(32, 32), mode="RGB", num_workers=0)
    st = logitstore.open_store(s.out)
    assert st.meta.classes == tuple(CLASSES) and st.meta.preprocess.channels == 3
    assert st.meta.preprocess.mean == (0.485, 0.456, 0.406)  # torchvision archs default to ImageNet stats
    assert np.isfinite(st[:].logits.astype(np.float32)).all()


def test_a_new_size_scales_the_teachers_resize_and_a_resize_below_the_crop_is_refused(tmp_path, corpus):
    from logitstore.teacher.load import describe_teacher

    r18 = str(_torchvision_state(tmp_path))
    kw = dict(weights=r18, arch_kwargs={"num_classes": 10})
    assert describe_teacher("torchvision:resnet18", **kw).preprocess.resize == 256  # ImageNet's 256 for 224
    for size, resize in (((64, 64), 73), ((32, 32), 36), ((224, 224), 256), ((320, 240), 365)):
        pre = describe_teacher("torchvision:resnet18", **kw, overrides={"size": size}).preprocess
        assert (pre.size, pre.resize) == (size, resize)
    assert describe_teacher("torchvision:resnet18", **kw, overrides={"size": (32, 32), "resize": 40}).preprocess.resize == 40
    r = invoke("logitstore", "teacher", "torchvision:resnet18", "--weights", r18, "--arch-kwargs", '{"num_classes": 10}',
               "--size", "32,32", "--resize", "10")
    assert_one_line_error(r, "--resize 10 is smaller than the 32x32 crop", "pass --resize 32 or more")


class _FailsOnBigBatches(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 4:
            raise RuntimeError("out of scratch space")
        return self.net(x)


def test_compiled_teachers_made_for_one_batch_size_or_failing_mid_dump_are_one_line(tmp_path, corpus, teacher_ckpt):
    """torch.export's default is a fixed batch size: found by the probe, before any store exists. A teacher
    that raises mid-dump stops the dump in one line and leaves a store that says it is incomplete."""
    model = load_module(ckpt=teacher_ckpt)
    flags = ["--size", "28,28", "--mode", "L", "--images", str(corpus), "--num-workers", "0", "--quiet"]
    for batch, words in ((2, "runs on a batch of 2 images but not of 3"), (1, "fails on a [2, 1, 28, 28] input")):
        torch.export.save(torch.export.export(model, (torch.zeros(batch, 1, 28, 28),)), tmp_path / f"b{batch}.pt2")
        r = invoke("logitstore", "dump", "--teacher", str(tmp_path / f"b{batch}.pt2"), "--out",
                   str(tmp_path / f"b{batch}.zarr"), *flags)
        assert_one_line_error(r, words, "exported or traced for one batch size", "torch.export.Dim")
        assert not (tmp_path / f"b{batch}.zarr").exists()
    torch.jit.save(torch.jit.script(_FailsOnBigBatches(model)), tmp_path / "fails.ts")
    r = invoke("logitstore", "dump", "--teacher", str(tmp_path / "fails.ts"), "--out", str(tmp_path / "f.zarr"),
               "--batch-size", "8", *flags)
    assert_one_line_error(r, "the teacher failed on a batch of 8 views", "out of scratch space", "run the same command")
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(tmp_path / "f.zarr")


def test_a_pickled_module_is_refused_with_how_to_fix(tmp_path, corpus):
    from nets import tiny_cnn

    torch.save(tiny_cnn(), tmp_path / "whole.pt")
    r = run_cli("logitstore", "dump", "--teacher", str(tmp_path / "whole.pt"), "--images", str(corpus),
                "--out", str(tmp_path / "x.zarr"), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "state_dict" in r.stderr and "arbitrary code" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("args, message", [
    (["--classes", "a,b,c"], "outputs 10 logits but 3 class names"),
    (["--classes", "a,a,b,c,d,e,f,g,h,i"], "the class name 'a' is given more than once"),
    (["--classes", "a,b,c,d,e,f,g,h,i,"], "class 9 has an empty name"),
    (["--classes", "names.txt"], "--classes names.txt: no such file"),
    (["--dtype", "float64"], "Invalid value for '--dtype'"),
    (["--size", "abc"], "--size"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA device"),
    (["--images", "/nonexistent/folder"], "/nonexistent/folder: no such folder"),
    (["--teacher", "/nonexistent.pt"], "/nonexistent.pt: no such teacher file"),
    (["--teacher", "torchvision:resnet18"], "needs --weights FILE"),
    (["--teacher", "nosuchmodule:f", "--weights", "__CKPT__"], "cannot import 'nosuchmodule'"),
])
def test_bad_flags_are_one_line_errors(tmp_path, corpus, teacher_ckpt, args, message):
    base = {"--teacher": str(teacher_ckpt), "--images": str(corpus), "--out": str(tmp_path / "x.zarr")}
    extra = [a.replace("__CKPT__", str(teacher_ckpt)) for a in args]
    for i in range(0, len(extra) - 1):
        if extra[i] in base:
            base[extra[i]] = extra[i + 1]
    rest = [a for i, a in enumerate(extra) if a not in base and (i == 0 or extra[i - 1] not in base)]
    cmd = [x for kv in base.items() for x in kv] + rest
    r = run_cli("logitstore", "dump", *cmd, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_logits_outside_float16_are_an_error_naming_the_fix(tmp_path, corpus):
    ckpt = save_teacher(tmp_path / "big.pt", arch="nets:scaled_cnn", scale=1e7)
    with pytest.raises(LogitRangeError, match="--dtype float32"):
        logitstore.dump(str(ckpt), str(corpus), str(tmp_path / "s.zarr"), num_workers=0)
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(tmp_path / "s.zarr")
    logitstore.dump(str(ckpt), str(corpus), str(tmp_path / "s.zarr"), num_workers=0, dtype="float32",
                    overwrite=True)
    assert np.abs(logitstore.open_store(tmp_path / "s.zarr")[:].logits).max() > 65504


def test_complete_store_is_not_overwritten_without_flag(tmp_path, corpus, teacher_ckpt):
    out = str(tmp_path / "s.zarr")
    logitstore.dump(str(teacher_ckpt), str(corpus), out, num_workers=0)
    assert logitstore.dump(str(teacher_ckpt), str(corpus), out, num_workers=0).nothing_to_do  # the same recipe
    with pytest.raises(StoreStateError, match="--overwrite"):
        logitstore.dump(str(teacher_ckpt), str(corpus), out, num_workers=0, dtype="float32")
    logitstore.dump(str(teacher_ckpt), str(corpus), out, num_workers=0, overwrite=True, dtype="float32")
    assert logitstore.open_store(out).meta.dtype == "float32"


def _committed_rows(out: Path) -> int:
    """Rows a running dump has committed so far; 0 while its store is still being created."""
    try:
        return int((zarr.open_group(str(out), mode="r").attrs.get(schema.ATTR_PROGRESS) or {}).get("rows", 0))
    except Exception:  # the folder exists before its zarr.json does
        return 0


def _kill_midway(cmd: list[str], out: Path, min_rows: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "logitstore", *cmd], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if _committed_rows(out) >= min_rows:
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the dump ended before it could be killed: {proc.stderr.read()}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the dump and its DataLoader workers, mid-write
        proc.wait()


def test_dump_resumes_after_kill_with_identical_store(tmp_path, corpus, mnist):
    ckpt = save_teacher(tmp_path / "slow.pt", arch="nets:slow_cnn", seconds=0.15)
    images = tmp_path / "imgs"
    for p in corpus.rglob("*.png"):
        dst = images / p.relative_to(corpus)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(p.read_bytes())
    (images / "part1" / "broken.png").write_bytes(b"\x89PNG broken")
    args = ["--teacher", str(ckpt), "--images", str(images), "--views", "2", "--batch-size", "8",
            "--chunk-rows", "16", "--num-workers", "1", "--quiet"]
    ref, out = tmp_path / "ref.zarr", tmp_path / "out.zarr"
    run_cli("logitstore", "dump", *args, "--out", str(ref))
    _kill_midway(["dump", *args[:-1], "--out", str(out)], out, min_rows=33)
    with pytest.raises(StoreStateError, match="incomplete"):
        logitstore.open_store(out)
    partial = logitstore.open_store(out, allow_incomplete=True)
    assert 33 <= len(partial) < 121 and len(partial) % 16 == 0
    r = run_cli("logitstore", "verify", str(out), check=False)
    assert r.returncode == 2 and "incomplete" in r.stderr and "--allow-incomplete" in r.stderr
    assert "OK" in run_cli("logitstore", "verify", str(out), "--allow-incomplete").stdout
    # A different flag is refused, naming what differs.
    with pytest.raises(ResumeMismatchError, match="seed"):
        logitstore.dump(str(ckpt), str(images), str(out), views=2, batch_size=8, chunk_rows=16, seed=1)
    r = run_cli("logitstore", "dump", *args, "--out", str(out))
    assert "resumed from row" in r.stdout
    a, b = logitstore.open_store(ref), logitstore.open_store(out)
    ra, rb = a[:], b[:]
    assert list(ra.ids) == list(rb.ids) and len(a) == 120
    for name in ("logits", "digests", "image_hw", "view_params"):
        assert np.array_equal(getattr(ra, name), getattr(rb, name)), name
    assert ra.logits.tobytes() == rb.logits.tobytes()
    assert a.failures() == b.failures() and len(a.failures()) == 1
    assert a.meta.run_fingerprint() == b.meta.run_fingerprint()


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, corpus):
    ckpt = save_teacher(tmp_path / "slow.pt", arch="nets:slow_cnn", seconds=0.2)
    out = tmp_path / "s.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "logitstore", "dump", "--teacher", str(ckpt), "--images",
                             str(corpus), "--out", str(out), "--batch-size", "8", "--chunk-rows", "8",
                             "--num-workers", "0", "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 60
    while time.time() < deadline:
        if _committed_rows(out):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert len(logitstore.open_store(out, allow_incomplete=True)) >= 8



@pytest.mark.parametrize("prog", ["logitstore", "trainer"])
def test_ctrl_c_while_the_command_line_loads_is_one_line(prog):
    # Python reports each import as it ends (PYTHONPROFILEIMPORTTIME): Ctrl-C once NumPy is in, while zarr,
    # torch and torchvision (seconds) still load.
    script = Path(sys.executable).with_name(prog)
    cmd = [str(script)] if script.exists() else [sys.executable, "-c", f"from logitstore.entry import {prog}; {prog}()"]
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.Popen([*cmd, "--help"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    for line in proc.stderr:
        if line.split("|")[-1].strip() == "numpy":
            break
    proc.send_signal(signal.SIGINT)
    out, rest = proc.communicate(timeout=60)
    said = [ln for ln in rest.splitlines() if not ln.startswith("import time:")]
    assert proc.returncode == 130 and out == "", rest[-2000:]
    assert said == [f"{prog}: interrupted while starting; nothing was done"]


# After a dump, a batch's worth of 2 MiB tensors freed and made again comes from the heap: the dump fixed glibc's
# thresholds (logitstore/allocator.py). Set low first, where glibc's own rule may leave them (see
# tests/test_fit_steady.py): every round would then fault its 20 MiB back in (> 40,000 faults).
DUMP_THEN_FAULTS = """
import ctypes, resource, sys, torch, logitstore
ctypes.CDLL(None).mallopt(-3, 2 << 20), ctypes.CDLL(None).mallopt(-1, 4 << 20)
logitstore.dump(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=8, num_workers=0, progress=False)
for _ in range(2):
    [torch.empty(1 << 19).fill_(1.0) for _ in range(10)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    [torch.empty(1 << 19).fill_(1.0) for _ in range(10)]
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_a_dump_keeps_the_memory_its_batches_free(tmp_path, corpus, teacher_ckpt):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", DUMP_THEN_FAULTS, str(teacher_ckpt), str(corpus), str(tmp_path / "s.zarr")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) < 2000


THP_FAULTS = """
import os, resource, sys
from logitstore.entry import configure_process
if sys.argv[1] != "unset":
    os.environ["THP_MEM_ALLOC_ENABLE"] = sys.argv[1]
configure_process()
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.empty(10 << 20).fill_(1.0)  # 40 MiB, as a batch's activations: mapped, faulted in, unmapped
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_allowed() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _thp_allowed(), reason="the kernel grants no transparent huge pages")
def test_the_commands_fault_large_tensors_in_by_huge_pages():
    def faults(setting: str) -> int:
        out = subprocess.run([sys.executable, "-c", THP_FAULTS, setting], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])
    assert faults("unset") < 5 * 10240 / 4   # as the commands run: 2 MiB pages (4 KiB pages: 51,200 faults)
    assert faults("0") > 5 * 10240 * 0.9     # the user's THP_MEM_ALLOC_ENABLE=0 is kept

def test_keep_bits_rounds_logits_and_shrinks_the_store(tmp_path, corpus, teacher_ckpt):
    from numcodecs import BitRound

    full = logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "f.zarr"), num_workers=0,
                           dtype="float32")
    lossy = logitstore.dump(str(teacher_ckpt), str(corpus), str(tmp_path / "l.zarr"), num_workers=0,
                            dtype="float32", keep_bits=6)
    a = logitstore.open_store(tmp_path / "f.zarr")[:].logits
    b = logitstore.open_store(tmp_path / "l.zarr")
    assert b.meta.keep_bits == 6
    np.testing.assert_array_equal(b[:].logits, BitRound(keepbits=6).encode(a).view(np.float32).reshape(a.shape))
    assert np.abs(b[:].logits - a).max() <= np.abs(a).max() * 2.0 ** -6
    lossy_bytes = sum(p.stat().st_size for p in (tmp_path / "l.zarr" / "logits").rglob("*") if p.is_file())
    full_bytes = sum(p.stat().st_size for p in (tmp_path / "f.zarr" / "logits").rglob("*") if p.is_file())
    assert lossy_bytes < 0.6 * full_bytes, (lossy_bytes, full_bytes)
    assert "OK" in run_cli("logitstore", "verify", str(tmp_path / "l.zarr")).stdout
    r = run_cli("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out",
                str(tmp_path / "x.zarr"), "--keep-bits", "10", check=False)
    assert r.returncode == 2 and "between 1 and 9 for float16" in r.stderr

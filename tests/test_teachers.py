"""The teachers people have: timm models, torchvision weight enums and Hugging Face directories, each
dumped with its library's own eval preprocessing (issue 13). CPU only, random weights, nothing downloaded.

Every teacher is checked against an independent forward pass that uses the library's own transform
(`timm.data.create_transform`, `weights.transforms()`, the HF image processor) on real JPEG and PNG files
of assorted sizes and aspect ratios:

- inputs: the pixels the dump feeds the teacher (views.py) equal the library's transform output within
  2 uint8 levels (1/255 each, before normalisation), with at most 1% of the values off by 2 and a mean
  difference of at most 0.3 level. That is the whole difference between torch's antialiased uint8 resize
  (views.py's) and Pillow's (timm's, and any PIL-fed transform's): the same kernels, rounded differently
  between their two passes (measured on these images:
  up to 2 levels, 0-24% of values off by one, mean <= 0.25 level). torchvision's weights.transforms() on
  uint8 tensors resize through float32 and differ as little; transformers 5's processors use views.py's
  own kernel (torchvision.transforms.v2 on uint8), and there the inputs are equal to float32 rounding.
- logits: the stored float16 logits equal the library-preprocessed forward pass within rtol 1e-2 and
  atol 1e-2 * max|logit|. The atol is relative to the largest logit because a logit near zero has no
  useful relative error; 1e-2 is over ten times what was measured (at most 8e-4 of the largest logit,
  from float16 rounding plus the one-level input differences above). Against a forward pass on the
  dump's own inputs only float16's rounding is left (relative 2**-11 ~ 4.9e-4 of each value; measured
  <= 3.9e-4 of the largest): rtol and atol 2**-10 (twice the bound, for float32 matmuls reassociated
  by batch size).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import logitstore
from logitstore.corpus import decode_image
from logitstore.errors import TeacherError, UntrustedCodeError
from logitstore.teacher.load import describe_teacher, load_teacher
from logitstore.views import apply_view, normalize

from conftest import assert_one_line_error, invoke

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# (height, width, format): landscape, portrait, square, very wide, one smaller than every crop, large.
IMAGES = [(97, 131, "jpg"), (240, 180, "png"), (160, 160, "jpg"), (75, 301, "png"), (41, 60, "jpg"),
          (333, 250, "png"), (181, 239, "jpg")]
MAX_LEVELS, TWO_LEVEL_FRACTION, MEAN_LEVELS = 2, 0.01, 0.3  # vs Pillow's resize (see above)
LOGIT_RTOL, LOGIT_ATOL_SCALE = 1e-2, 1e-2
FP16_RTOL = 2.0 ** -10
# transformers 5 preprocesses with torchvision.transforms.v2 on uint8 tensors, views.py's own kernel.
HF_SAME_KERNEL = int(transformers.__version__.split(".")[0]) >= 5


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth, photo-like RGB image (gradients, blobs, a little noise): resizing it means something."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * x + rng.uniform(0, 6)) + np.cos(4 * y * (c + 1)) for c in range(3)], -1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
        img += (((y - cy) ** 2 + (x - cx) ** 2) < r * r)[..., None] * rng.uniform(-1, 1, 3)
    img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255 + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for i, (h, w, fmt) in enumerate(IMAGES):
        Image.fromarray(_photo(h, w, i)).save(root / f"img{i}.{fmt}", quality=90)
    return root


def _pils(root: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(root.iterdir())]


def _dump_inputs(root: Path, pre) -> torch.Tensor:
    """What the dump feeds the teacher: decode, the eval view (views.py), normalise."""
    views = [apply_view(decode_image(p.read_bytes(), pre.mode), None, pre, "eval") for p in sorted(root.iterdir())]
    return normalize(torch.stack(views), pre)


def _assert_same_inputs(ours: torch.Tensor, theirs: torch.Tensor, pre, exact: bool = False) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    level = 1 / 255 / min(pre.std)  # one uint8 level after normalisation
    diff = (ours - theirs).abs()
    if exact:
        assert float(diff.max()) < 1e-5, float(diff.max())
        return
    levels = diff / level
    assert float(levels.max()) <= MAX_LEVELS + 1e-3, float(levels.max())
    assert float((levels > 1 + 1e-3).float().mean()) <= TWO_LEVEL_FRACTION
    assert float(levels.mean()) <= MEAN_LEVELS, float(levels.mean())


def _assert_logits(store: Path, model, library_inputs: torch.Tensor, pre) -> None:
    st = logitstore.open_store(store)
    assert st.meta.format_version == logitstore.schema.version_for(st.meta.targets, st.meta.views) and st.meta.preprocess == pre
    stored = st[:].logits[:, 0].astype(np.float32)
    with torch.no_grad():
        ref = model(library_inputs).float().numpy()
        own = model(_dump_inputs(Path(st.meta.corpus.root), pre)).float().numpy()
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(stored, ref, rtol=LOGIT_RTOL, atol=LOGIT_ATOL_SCALE * scale)
    np.testing.assert_allclose(stored, own, rtol=FP16_RTOL, atol=FP16_RTOL * scale)


# -- timm -------------------------------------------------------------------------------------------------
def _timm_weights(tmp: Path, name: str) -> Path:
    torch.manual_seed(0)
    path = tmp / f"{name}.safetensors"
    safetensors_torch.save_file(timm.create_model(name).state_dict(), str(path))
    return path


def test_timm_teacher_from_safetensors_is_dumped_with_timms_own_eval_transform(tmp_path, photos):
    name = "test_vit.r160_in1k"  # a tiny ViT whose config says bicubic, crop_pct 0.95 -> 168 then 160
    weights = _timm_weights(tmp_path, name)
    out = tmp_path / "timm.zarr"
    logitstore.dump(f"timm:{name}", str(photos), str(out), weights=str(weights), num_workers=0, batch_size=4)
    t = load_teacher(f"timm:{name}", str(weights))
    model = t.model.eval()
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**cfg)
    library = torch.stack([transform(im) for im in _pils(photos)])
    pre = logitstore.open_store(out).meta.preprocess
    assert (pre.interpolation, pre.resize, pre.size, pre.crop) == ("bicubic", 168, (160, 160), "center")
    _assert_same_inputs(_dump_inputs(photos, pre), library, pre)
    _assert_logits(out, model, library, pre)
    meta = logitstore.open_store(out).meta
    assert meta.classes[:2] == ("n01440764", "n01443537") and meta.num_classes == 1000  # timm's ImageNet info
    assert meta.teacher.arch == f"timm:{name}" and meta.teacher.source == "factory"


@pytest.mark.parametrize("overlay", [{"crop_mode": "squash", "crop_pct": 0.9, "interpolation": "bilinear"},
                                     {"crop_mode": "squash", "crop_pct": 1.0, "interpolation": "bicubic"},
                                     {"crop_mode": "center", "crop_pct": 1.0, "interpolation": "bilinear"}])
def test_timm_crop_modes_replay_as_timm_transforms(photos, overlay):
    from logitstore.schema import Preprocess
    from logitstore.teacher.registries import timm_preprocess

    model = timm.create_model("test_resnet.r160_in1k", pretrained_cfg_overlay=overlay)
    d, note = timm_preprocess(model)
    assert note is None
    pre = Preprocess.from_dict(d)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    _assert_same_inputs(_dump_inputs(photos, pre), torch.stack([transform(im) for im in _pils(photos)]), pre)


def test_timm_border_mode_is_refused_rather_than_approximated():
    from logitstore.schema import TeacherInfo
    from logitstore.teacher.load import Teacher, resolve_preprocess
    from logitstore.teacher.registries import timm_preprocess

    model = timm.create_model("test_resnet.r160_in1k", pretrained_cfg_overlay={"crop_mode": "border"})
    d, note = timm_preprocess(model)
    assert d is None and "crop_mode 'border'" in note
    t = Teacher(model, TeacherInfo("timm:test_resnet.r160_in1k", "factory", "w.safetensors", "0" * 64), None, d, note)
    with pytest.raises(TeacherError, match="cannot take over timm's crop_mode 'border'.*--size"):
        resolve_preprocess(t, {})


def test_timm_pretrained_reads_the_local_hub_cache_and_says_so_when_absent(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    name = "test_vit.r160_in1k"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    err = assert_one_line_error(invoke("logitstore", "teacher", f"timm:{name}", "--pretrained"),
                                "not on this machine", "nothing is downloaded", "--weights FILE")
    assert str(tmp_path / "hub") in err
    # The hub cache's layout: refs/main names a snapshot that holds the file.
    snap = tmp_path / "hub" / f"models--timm--{name}" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    _timm_weights(tmp_path, name).rename(snap / "model.safetensors")
    s = describe_teacher(f"timm:{name}", pretrained=True)
    assert s.info.source == "pretrained" and s.info.file == str(snap / "model.safetensors")
    assert s.preprocess.interpolation == "bicubic" and len(s.classes) == 1000
    # Another num_classes would make timm drop the pretrained head for a random one: refused, not a random teacher
    assert_one_line_error(invoke("logitstore", "teacher", f"timm:{name}", "--pretrained", "--arch-kwargs",
                                 '{"num_classes": 10}'), "classify 1000 classes", "random weights", "drop num_classes")
    assert len(describe_teacher(f"timm:{name}", pretrained=True, arch_kwargs={"num_classes": 1000}).classes) == 1000


def test_timm_with_classes_file_and_the_teacher_command(tmp_path):
    name = "test_vit.r160_in1k"
    weights = _timm_weights(tmp_path, name)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(f"c{i}" for i in range(1000)))
    s = describe_teacher(f"timm:{name}", str(weights), classes=str(classes))
    assert s.classes[:2] == ["c0", "c1"]
    assert s.parameters == sum(p.numel() for p in timm.create_model(name).parameters())
    out = invoke("logitstore", "teacher", f"timm:{name}", "--weights", str(weights), "--json")
    d = json.loads(out.stdout)
    assert d["num_classes"] == 1000 and d["parameters"] == s.parameters
    assert d["preprocess"] == {"size": [160, 160], "resize": 168, "mean": [0.5] * 3, "std": [0.5] * 3, "mode": "RGB",
                               "interpolation": "bicubic", "antialias": True, "crop": "center"}
    text = invoke("logitstore", "teacher", f"timm:{name}", "--weights", str(weights)).stdout
    assert "371,240" in text and "shorter side to 168 (bicubic" in text and "n01440764" in text


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert_one_line_error(invoke("logitstore", "teacher", "timm:resnet18", "--weights", str(tmp_path / "w")),
                          "pip install 'logitstore[timm]'")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{}")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"")
    assert_one_line_error(invoke("logitstore", "teacher", f"hf:{tmp_path / 'd'}"), "pip install 'logitstore[hf]'")


# -- torchvision ------------------------------------------------------------------------------------------
@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_torchvision_weights_enum_from_the_hub_cache(tmp_path, photos, torch_home):
    import torchvision

    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    missing = invoke("logitstore", "teacher", "torchvision:resnet18", "--weights", "IMAGENET1K_V1")
    assert_one_line_error(missing, "resnet18-f37072fd.pth is not in the torch hub cache", w.url,
                          str(torch_home / "resnet18-f37072fd.pth"))
    torch.manual_seed(0)
    torch_home.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), torch_home / "resnet18-f37072fd.pth")
    out = tmp_path / "tv.zarr"
    logitstore.dump("torchvision:resnet18", str(photos), str(out), weights="IMAGENET1K_V1", num_workers=0,
                    batch_size=4)
    meta = logitstore.open_store(out).meta
    assert list(meta.classes) == w.meta["categories"] and meta.teacher.source == "pretrained"
    pre = meta.preprocess
    assert (pre.resize, pre.size, pre.interpolation, pre.crop) == (256, (224, 224), "bilinear", "center")
    model = load_teacher("torchvision:resnet18", "DEFAULT").model.eval()  # DEFAULT is IMAGENET1K_V1 here
    transform = w.transforms()
    library = torch.stack([transform(im) for im in _pils(photos)])           # PIL in: Pillow's kernels
    tensors = torch.stack([transform(decode_image(p.read_bytes(), "RGB")) for p in sorted(photos.iterdir())])
    _assert_same_inputs(_dump_inputs(photos, pre), library, pre)
    _assert_same_inputs(_dump_inputs(photos, pre), tensors, pre)
    _assert_logits(out, model, library, pre)
    # The same file given by path is recognised by its name: the same teacher, preprocessing and classes.
    by_file = describe_teacher("torchvision:resnet18", str(torch_home / "resnet18-f37072fd.pth"))
    assert by_file.preprocess == pre and by_file.classes == list(meta.classes)
    assert by_file.info.sha256 == meta.teacher.sha256


@pytest.mark.parametrize("name, member", [("resnet50", "IMAGENET1K_V2"), ("efficientnet_b0", "IMAGENET1K_V1"),
                                          ("inception_v3", "IMAGENET1K_V1"), ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")])
def test_torchvision_weights_preprocessing_is_their_transforms(photos, name, member):
    """ResNet-50 V2 232 -> 224 bilinear, EfficientNet-B0 bicubic, Inception-V3 342 -> 299, ViT-B/16 SWAG 384 bicubic."""
    import torchvision

    from logitstore.schema import Preprocess
    from logitstore.teacher.registries import torchvision_preprocess

    w = torchvision.models.get_model_weights(name)[member]
    d, note = torchvision_preprocess(w)
    pre = Preprocess.from_dict(d)
    t = w.transforms()
    assert note is None and pre.size == (t.crop_size[0],) * 2 and pre.resize == t.resize_size[0]
    tensors = torch.stack([t(decode_image(p.read_bytes(), "RGB")) for p in sorted(photos.iterdir())])
    _assert_same_inputs(_dump_inputs(photos, pre), tensors, pre)
    _assert_same_inputs(_dump_inputs(photos, pre), torch.stack([t(im) for im in _pils(photos)]), pre)


# -- Hugging Face -----------------------------------------------------------------------------------------
def _hf_dir(root: Path, processor_kwargs: dict, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    labels = {0: "cat", 1: "dog", 2: "bird"}
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=37, num_labels=3, id2label=labels,
                                 label2id={v: k for k, v in labels.items()})
    transformers.ViTForImageClassification(cfg).save_pretrained(root)
    transformers.ViTImageProcessor(**processor_kwargs).save_pretrained(root)
    return root


HF_PROCESSORS = {  # fixed size; shorter side + the floor centre crop; DeiT's fixed size + crop
    "fixed": {"size": {"height": 32, "width": 32}},
    "shorter_side": {"size": {"shortest_edge": 39}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
                     "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    "fixed_then_crop": {"size": {"height": 41, "width": 37}, "do_center_crop": True,
                        "crop_size": {"height": 32, "width": 32}, "resample": 0},
}


@pytest.fixture(scope="module")
def hf_store(tmp_path_factory, photos) -> tuple[Path, Path]:
    """A tiny ViT directory (shorter side 39, bicubic, the floor centre crop to 32) and its dump."""
    root = tmp_path_factory.mktemp("hf")
    d = _hf_dir(root / "vit", HF_PROCESSORS["shorter_side"])
    logitstore.dump(f"hf:{d}", str(photos), str(root / "hf.zarr"), num_workers=0, batch_size=4)
    return d, root / "hf.zarr"


def _hf_library_inputs(d: Path, photos: Path) -> torch.Tensor:
    return transformers.AutoImageProcessor.from_pretrained(d)(images=_pils(photos), return_tensors="pt")["pixel_values"]


def test_hugging_face_directory_is_dumped_with_its_image_processor(photos, hf_store):
    d, out = hf_store
    meta = logitstore.open_store(out).meta
    assert meta.classes == ("cat", "dog", "bird") and meta.teacher.arch == "hf:ViTForImageClassification"
    pre = meta.preprocess
    assert (pre.resize, pre.size, pre.crop, pre.interpolation) == (39, (32, 32), "center_floor", "bicubic")
    model = transformers.AutoModelForImageClassification.from_pretrained(d).eval()
    library = _hf_library_inputs(d, photos)
    _assert_same_inputs(_dump_inputs(photos, pre), library, pre, exact=HF_SAME_KERNEL)
    _assert_logits(out, lambda x: model(pixel_values=x).logits, library, pre)
    assert load_teacher(f"hf:{d}").info.sha256 == meta.teacher.sha256  # of the directory's files, stable


def test_a_student_sees_the_teachers_inputs_and_teaches_the_next_round(tmp_path, photos, hf_store):
    """The trainer replays the stored preprocessing (views.py) pixel for pixel, and its student's
    checkpoint records it, so the student is a teacher for the next dump with the same inputs."""
    from trainer import fit
    from trainer.inputs import make_input_spec

    d, out = hf_store
    st = logitstore.open_store(out)
    pre, rows = st.meta.preprocess, st[:]
    spec = make_input_spec(pre, None, 3)
    seen = torch.stack([spec.view(decode_image((photos / i).read_bytes(), "RGB"), p[0], st.meta.views.kind)
                        for i, p in zip(rows.ids, rows.view_params)])
    library = _hf_library_inputs(d, photos)  # the photos' ids sort as their files do
    _assert_same_inputs(spec.to_input(seen), library, pre, exact=HF_SAME_KERNEL)
    run = fit([out], tmp_path / "run", student="lenet", epochs=1, batch_size=4, holdout=0.0, num_workers=0)
    nxt = tmp_path / "round2.zarr"
    logitstore.dump(run.checkpoint, str(photos), str(nxt), num_workers=0, batch_size=4)
    second = logitstore.open_store(nxt).meta
    assert second.preprocess == pre and second.classes == st.meta.classes


@pytest.mark.parametrize("kind", ["fixed", "fixed_then_crop"])
def test_hugging_face_processor_rules_replay_exactly(tmp_path, photos, kind):
    d = _hf_dir(tmp_path / kind, HF_PROCESSORS[kind])
    s = describe_teacher(f"hf:{d}")
    proc = transformers.AutoImageProcessor.from_pretrained(d)
    library = proc(images=_pils(photos), return_tensors="pt")["pixel_values"]
    _assert_same_inputs(_dump_inputs(photos, s.preprocess), library, s.preprocess, exact=HF_SAME_KERNEL)


def test_hugging_face_directory_never_runs_its_own_code(tmp_path):
    d = _hf_dir(tmp_path / "evil", HF_PROCESSORS["fixed"])
    canary = tmp_path / "PWNED"
    (d / "evil_model.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "auto_map": {
        "AutoModelForImageClassification": "evil_model.EvilModel"}}))
    with pytest.raises(UntrustedCodeError, match="auto_map"):
        load_teacher(f"hf:{d}")
    assert not canary.exists()
    (d / "model.safetensors").unlink()
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save({}, d / "pytorch_model.bin")
    with pytest.raises(TeacherError, match="no .safetensors weights"):
        load_teacher(f"hf:{d}")


# -- the record -------------------------------------------------------------------------------------------
def test_preprocess_1_3_is_strict_and_the_1_2_record_reads_as_before(photos):
    from logitstore.errors import FormatError
    from logitstore.schema import Preprocess

    legacy = {"size": [8, 8], "resize": 10, "mean": [0.5], "std": [0.25], "mode": "L",
              "interpolation": "bilinear-antialias"}
    assert Preprocess.from_dict(legacy).to_dict() == legacy  # 1.0-1.2 stores keep their checksums
    for bad in [{**legacy, "antialias": True}, {**legacy, "crop": "center"}, {**legacy, "resize": [10, 12]},
                {**legacy, "interpolation": "lanczos"}, {**legacy, "interpolation": "nearest", "antialias": True},
                {**legacy, "interpolation": "bicubic", "crop": "top"},
                {**legacy, "interpolation": "bicubic", "antialias": 1},
                {**legacy, "interpolation": "bicubic", "resize": [10, 12, 14]},
                {**legacy, "interpolation": "bicubic", "resize": [10, 9000]}]:
        with pytest.raises(FormatError, match="R3|not understood"):
            Preprocess.from_dict(bad)
    # "bilinear-antialias" is bilinear with antialias and the torchvision centre crop, pixel for pixel.
    old = Preprocess.from_dict({**legacy, "size": [64, 48], "resize": 57, "mode": "RGB"})
    new = Preprocess.from_dict({**old.to_dict(), "interpolation": "bilinear", "antialias": True, "crop": "center"})
    for p in sorted(photos.iterdir()):
        img = decode_image(p.read_bytes(), "RGB")
        assert torch.equal(apply_view(img, None, old, "eval"), apply_view(img, None, new, "eval"))


def test_a_wrong_head_width_or_a_bare_hf_folder_says_the_fix(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18.pth")
    err = assert_one_line_error(invoke("logitstore", "teacher", "torchvision:resnet18", "--weights",
                                       str(tmp_path / "r18.pth")), "size mismatch for fc.weight")
    assert err.endswith("""for a classifier of 10 classes pass --arch-kwargs '{"num_classes": 10}'"""), err
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text("{}")
    assert_one_line_error(invoke("logitstore", "teacher", str(tmp_path / "vit")), f"pass --teacher hf:{tmp_path / 'vit'}")


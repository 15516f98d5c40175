"""Format 1.5 augmented views: every kind of view the dump stores (crops and flips, RandAugment,
TrivialAugmentWide, erasing, mixup, cutmix, all together) is rebuilt by the trainer's real batch pipeline
bit for bit, and the teacher run on that input gives back the stored logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import logitstore
from logitstore import schema
from logitstore.errors import LogitStoreError
from logitstore.views import apply_views
from trainer.batches import make_batches
from trainer.inputs import make_input_spec
from trainer.storeset import open_stores

from conftest import assert_one_line_error, ctrl_c_at_call, invoke, load_module, run_cli, save_teacher, write_pngs

N_IMAGES, VIEWS = 30, 3
# Mix groups of 8 and dump batches of 7: groups straddle batches, and the last group is short.
COMMON = dict(views=VIEWS, seed=5, batch_size=7, num_workers=0, embed_images=True, mix_group=8)
KINDS = {
    "crop-flip": {},
    "rand-augment": dict(augment="rand-augment", augment_ops=3, augment_magnitude=15),
    "trivial-augment": dict(augment="trivial-augment"),
    "erasing": dict(erase=1.0),
    "mixup": dict(mixup=0.4),
    "cutmix": dict(cutmix=1.0),
    "all": dict(augment="rand-augment", erase=0.5, mixup=0.2, cutmix=1.0, mix_prob=0.8),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mnist):
    root = tmp_path_factory.mktemp("augment")
    corpus = root / "corpus"
    write_pngs(mnist["train_images"][:N_IMAGES], corpus)
    teacher = save_teacher(root / "teacher.pt", seed=1)
    stores = {}
    for name, kw in KINDS.items():
        stores[name] = root / f"{name}.zarr"
        logitstore.dump(str(teacher), str(corpus), str(stores[name]), **COMMON, **kw)
    return {"root": root, "corpus": corpus, "teacher": teacher, "stores": stores}


def _epochs(store: Path, images: list[Path] | None, batch_size: int = 8, workers: int = 0,
            input_size: tuple[int, int] | None = None) -> dict[tuple[int, int], tuple[torch.Tensor, np.ndarray]]:
    """(epoch, key) -> (the trainer's uint8 input, the stored logits it is paired with), over V epochs, so
    every stored view is replayed once; through open_stores / make_batches as `trainer fit` uses them."""
    data = open_stores([str(store)], images=[str(i) for i in images] if images else None, holdout=0.0)
    spec = make_input_spec(data.pre, input_size, data.pre.channels)
    batches = make_batches(data, spec, 0 if images is None else 1 << 26, num_workers=workers)
    out = {}
    for epoch in range(VIEWS):
        for b in batches(list(data.requests(epoch, batch_size, seed=11))):
            for key, px, lg in zip(b["keys"].tolist(), b["pixels"], b["logits"].numpy()):
                out[(epoch, key)] = (px.clone(), lg)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_trainer_replays_every_kind_of_view_bit_for_bit_and_the_teacher_agrees(setup, kind):
    store = setup["stores"][kind]
    meta = logitstore.open_store(store).meta
    assert meta.format_version == ("1.4" if kind == "crop-flip" else "1.5")
    # A kind of its own for augmented views, so 1.4 readers refuse them (R3) instead of training on crops alone.
    attrs_kind = json.loads((store / "zarr.json").read_text())["attributes"][schema.ATTR_ROOT]["views"]["kind"]
    assert attrs_kind == meta.views.kind == ("random_resized_crop" if kind == "crop-flip" else "augmented_resized_crop")
    replayed = _epochs(store, [setup["corpus"]])
    embedded = _epochs(store, None)  # the dump's own input to the teacher, as stored
    assert replayed.keys() == embedded.keys() and len(replayed) == VIEWS * N_IMAGES
    for k in replayed:
        assert torch.equal(replayed[k][0], embedded[k][0]), k
    # The teacher, loaded here, on the trainer's input gives back the stored logits (float16 rounding).
    model = load_module("nets:tiny_cnn", setup["teacher"])
    keys = sorted(replayed)
    pixels = torch.stack([replayed[k][0] for k in keys])
    stored = np.stack([replayed[k][1] for k in keys]).astype(np.float32)
    spec = make_input_spec(meta.preprocess, None, 1)
    with torch.inference_mode():
        logits = model(spec.to_input(pixels)).numpy()
    np.testing.assert_allclose(logits, stored, rtol=2 ** -10, atol=1e-3)
    # ... and the augmentation did something: the inputs are not the plain crops and flips.
    st = logitstore.open_store(store)
    rows = st.read(0, len(st), pixels=True)
    data = open_stores([str(store)], images=[str(setup["corpus"])], holdout=0.0)
    if kind != "crop-flip":
        from logitstore.corpus import read_and_decode

        imgs = [read_and_decode(setup["corpus"] / i, "L")[1] for i in rows.ids]
        crops = apply_views(imgs, rows.view_params[:, 0], meta.preprocess, meta.views.kind)
        changed = (crops != torch.from_numpy(rows.pixels[:, 0])).flatten(1).any(1)
        assert changed.float().mean() > 0.3, "the augmentation left most views as plain crops"
    if meta.views.mix is not None:
        offsets = rows.view_extras[schema.MIX_PARAMS][..., 0]
        assert (offsets != 0).mean() > 0.5 and np.abs(offsets).max() < 8
        lam = rows.view_extras[schema.MIX_LAMBDA]
        assert (lam[offsets == 0] == 1).all() and (lam[offsets != 0] < 1).mean() > 0.9
    assert data.views == meta.views


def test_params_do_not_depend_on_batch_size_workers_or_resumption(setup, tmp_path):
    ref = logitstore.open_store(setup["stores"]["all"]).read(0, N_IMAGES)
    kw = {**COMMON, **KINDS["all"]}
    other = tmp_path / "other.zarr"
    logitstore.dump(str(setup["teacher"]), str(setup["corpus"]), str(other), **{**kw, "batch_size": 4, "num_workers": 2})

    resumed = tmp_path / "resumed.zarr"
    stop = ctrl_c_at_call(3)
    with pytest.raises(LogitStoreError):
        logitstore.dump(str(setup["teacher"]), str(setup["corpus"]), str(resumed), chunk_rows=4, on_batch=stop, **kw)
    assert 0 < len(logitstore.open_store(resumed, allow_incomplete=True)) < N_IMAGES
    logitstore.dump(str(setup["teacher"]), str(setup["corpus"]), str(resumed), chunk_rows=4, **kw)
    for path in (other, resumed):
        got = logitstore.open_store(path).read(0, N_IMAGES)
        assert list(got.ids) == list(ref.ids)
        assert np.array_equal(got.view_params, ref.view_params)
        for name in schema.view_extra_arrays(logitstore.open_store(path).meta.views):
            assert np.array_equal(got.view_extras[name], ref.view_extras[name]), (path.name, name)
        assert np.array_equal(got.pixels, ref.pixels), path.name
        np.testing.assert_allclose(got.logits.astype(np.float32), ref.logits.astype(np.float32), rtol=2 ** -10, atol=1e-3)
    # The trainer's side: the same input for each (epoch, row), whatever its batch size or workers.
    a = _epochs(setup["stores"]["all"], [setup["corpus"]], batch_size=8, workers=0)
    b = _epochs(setup["stores"]["all"], [setup["corpus"]], batch_size=5, workers=2)
    assert a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) for k in a)


def test_student_input_size_resizes_the_teachers_input(setup):
    store = setup["stores"]["all"]
    replayed = _epochs(store, [setup["corpus"]], input_size=(20, 20))
    embedded = _epochs(store, None, input_size=(20, 20))
    assert all(v[0].shape == (1, 20, 20) and torch.equal(v[0], embedded[k][0]) for k, v in replayed.items())


def test_golden_1_4_store_still_reads_and_a_plain_dump_stays_1_4(setup, tmp_path):
    golden = Path(__file__).resolve().parent / "golden" / "v1.4.zarr"
    st = logitstore.open_store(golden)
    assert st.meta.format_version == "1.4" and not st.meta.views.augmented
    assert st.read(0, len(st)).view_extras is None
    data = open_stores([st], images=[str(tmp_path)], holdout=0.0)
    req = next(iter(data.requests(0, 4, seed=0)))
    assert req.extras is None and req.params.shape == (4, 5)
    # A plain store is still written as 1.4 (readers of 1.4 keep reading it) and trains end to end.
    meta = logitstore.open_store(setup["stores"]["crop-flip"]).meta
    assert meta.format_version == "1.4" and "augment" not in meta.views.to_dict()
    from trainer.fit import fit

    res = fit([str(setup["stores"]["crop-flip"])], out=str(tmp_path / "run"), student="lenet", epochs=1,
              batch_size=8, num_workers=0)
    assert res.info["view_repeat_epochs"] == VIEWS and np.isfinite(res.final["train_loss"])


def _edit_root(path: Path, edit) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    edit(doc["attributes"][schema.ATTR_ROOT])
    (path / "zarr.json").write_text(json.dumps(doc))


def test_unknown_op_or_policy_is_refused_in_one_line(setup, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(setup["stores"]["all"], bad)
    _edit_root(bad, lambda d: d["views"]["augment"]["ops"].__setitem__(3, "warp"))
    assert_one_line_error(invoke("logitstore", "info", str(bad)), "warp", "not understood")
    assert_one_line_error(invoke("trainer", "fit", "--store", str(bad), "--out", str(tmp_path / "r")), "warp")
    shutil.rmtree(bad)
    shutil.copytree(setup["stores"]["all"], bad)
    _edit_root(bad, lambda d: d["views"]["mix"].__setitem__("partner", "anywhere"))
    assert_one_line_error(invoke("logitstore", "info", str(bad)), "partner 'anywhere'")
    shutil.rmtree(bad)
    shutil.copytree(setup["stores"]["all"], bad)
    _edit_root(bad, lambda d: d["views"]["erasing"].__setitem__("noise", True))
    assert_one_line_error(invoke("logitstore", "info", str(bad)), "views.erasing")


def test_mix_stores_refuse_row_selection_and_labels(setup, tmp_path):
    store = str(setup["stores"]["mixup"])
    assert_one_line_error(invoke("logitstore", "select", store, "-o", str(tmp_path / "s.zarr"), "--limit", "5"),
                          "mixed views")
    assert_one_line_error(invoke("trainer", "fit", "--store", store, "--out", str(tmp_path / "r"), "--alpha", "0.5",
                                 "--labels-from-folders"), "--alpha", "mixed views")


def test_dump_and_fit_end_to_end_on_a_mix_store_with_the_cli(setup, tmp_path):
    store = tmp_path / "cli.zarr"
    invoke("logitstore", "dump", "--teacher", str(setup["teacher"]), "--images", str(setup["corpus"]),
            "--out", str(store), "--views", "2", "--augment", "trivial-augment", "--erase", "0.5",
            "--mixup", "0.2", "--cutmix", "1.0", "--mix-prob", "0.9", "--num-workers", "0", "--quiet")
    meta = logitstore.open_store(store).meta
    assert meta.views.augment.kind == "trivial_augment_wide" and meta.views.erasing.prob == 0.5
    assert (meta.views.mix.mixup_alpha, meta.views.mix.cutmix_alpha, meta.views.mix.prob) == (0.2, 1.0, 0.9)
    proc = run_cli("trainer", "fit", "--store", str(store), "--student", "lenet", "--epochs", "3", "--batch-size", "8",
                   "--num-workers", "0", "--out", str(tmp_path / "run"), "--json")
    res = json.loads(proc.stdout)
    assert res["info"]["view_repeat_epochs"] == 2 and len(res["history"]) == 3
    assert all(np.isfinite(r["train_loss"]) for r in res["history"])
    warning = [ln for ln in proc.stderr.splitlines() if "views repeat" in ln]
    assert len(warning) == 1 and "--epochs 3" in warning[0]
    assert invoke("logitstore", "verify", str(store)).returncode == 0


def test_distributed_segments_store_the_same_mixed_views(setup, tmp_path):
    """Segments of a distributed dump (here all run by this process) cut mix groups: each reads whole
    groups around its positions, so the store equals the single-process one."""
    from logitstore.device import Torchrun
    from logitstore.teacher.distributed import dump_distributed
    from logitstore.teacher.job import DumpConfig, prepare_dump

    out = str(tmp_path / "dist.zarr")
    kw = {**COMMON, **KINDS["all"], "chunk_rows": 7}
    job = prepare_dump(DumpConfig(str(setup["teacher"]), str(setup["corpus"]), out, **kw))
    dump_distributed(job, out, Torchrun(), segment_rows=14)
    ref, got = (logitstore.open_store(p).read(0, N_IMAGES) for p in (setup["stores"]["all"], out))
    assert list(got.ids) == list(ref.ids) and np.array_equal(got.pixels, ref.pixels)
    for name in ref.view_extras:
        assert np.array_equal(got.view_extras[name], ref.view_extras[name]), name


def test_copy_zip_and_merge_keep_the_view_arrays_and_their_replay(setup, tmp_path):
    src = setup["stores"]["all"]
    ref = logitstore.open_store(src).read(0, N_IMAGES)
    zipped = tmp_path / "all.zip"
    assert invoke("logitstore", "copy", str(src), str(zipped)).returncode == 0
    assert invoke("logitstore", "verify", str(zipped)).returncode == 0
    merged = tmp_path / "merged.zarr"
    assert invoke("logitstore", "merge", str(src), str(zipped), "-o", str(merged), "--prefix", "a,b").returncode == 0
    got = logitstore.open_store(merged).read(0, 2 * N_IMAGES)
    for name, values in ref.view_extras.items():  # offsets stay valid: each source's rows stay in order
        assert np.array_equal(got.view_extras[name], np.concatenate([values, values])), name
    assert invoke("logitstore", "verify", str(merged)).returncode == 0
    assert_one_line_error(invoke("logitstore", "merge", str(src), str(zipped), "-o", str(tmp_path / "d.zarr"),
                                 "--prefix", "a,b", "--dedupe"), "--dedupe", "mixed views")


def test_impossible_stored_view_values_are_refused_naming_the_array(setup, tmp_path):
    import zarr

    bad = tmp_path / "bad.zarr"
    shutil.copytree(setup["stores"]["all"], bad)
    ops = zarr.open_array(str(bad / schema.AUGMENT_OPS), mode="r+")
    ops[0, 0, 0, 0] = 99  # no such op: a replay would index out of the table
    proc = invoke("trainer", "fit", "--store", str(bad), "--images", str(setup["corpus"]), "--out",
                  str(tmp_path / "r"), "--epochs", "1", "--num-workers", "0")
    assert proc.returncode != 0 and "augment_ops" in proc.stderr and "outside views.augment" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert invoke("logitstore", "verify", str(bad)).returncode != 0  # its chunk record no longer matches


def test_plain_stores_keep_the_1_4_chunk_rows_and_only_augmented_ones_go_under_256():
    row = 10 * 1000 * 2  # --views 10, 1000 classes, float16: 20,000 bytes, over 16 KiB
    assert schema.chunk_rows_for(row) == 256  # what a4cd2d3 picked, so its unfinished dumps resume
    assert schema.chunk_rows_for(row, augmented=True) == 128
    assert schema.default_chunk_rows(10, 1000, 2) == 256


def _reseal(path: Path, edit) -> None:
    """Edit the root attribute and re-record its metadata checksum, as a writer that meant it would, so
    the rule under test is met rather than R4."""
    doc = json.loads((path / "zarr.json").read_text())
    d = doc["attributes"][schema.ATTR_ROOT]
    edit(d)
    d["fingerprints"]["metadata"] = schema.metadata_checksum(d)
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("version", ["1.4", "1.2"])
def test_augmented_views_in_an_older_format_version_are_refused(setup, tmp_path, version):
    bad = tmp_path / "old.zarr"
    shutil.copytree(setup["stores"]["all"], bad)
    _reseal(bad, lambda d: d.__setitem__("format_version", version))
    assert_one_line_error(invoke("logitstore", "info", str(bad)), f"format {version} store", "augmented views")
    assert_one_line_error(invoke("logitstore", "verify", str(bad)), "augmented views")
    with pytest.raises(LogitStoreError, match="cannot carry augmented views"):
        logitstore.open_store(bad)


def test_the_augmented_kind_and_its_objects_go_together(setup, tmp_path):
    bad = tmp_path / "kind.zarr"
    shutil.copytree(setup["stores"]["all"], bad)
    _reseal(bad, lambda d: d["views"].__setitem__("kind", "random_resized_crop"))
    assert_one_line_error(invoke("logitstore", "info", str(bad)), "does not fit", "augmented_resized_crop")
    shutil.rmtree(bad)
    shutil.copytree(setup["stores"]["crop-flip"], bad)
    _reseal(bad, lambda d: d["views"].__setitem__("kind", "augmented_resized_crop"))
    assert_one_line_error(invoke("logitstore", "info", str(bad)), "does not fit", "none")


@pytest.mark.parametrize("how", ["flip", "group"])
def test_a_partner_outside_the_rows_or_the_group_is_refused_naming_the_array(setup, tmp_path, how):
    import zarr

    bad = tmp_path / "bad.zarr"
    shutil.copytree(setup["stores"]["mixup"], bad)
    mp = zarr.open_array(str(bad / schema.MIX_PARAMS), mode="r+")
    values = mp[:]
    row, view = (int(x[0]) for x in np.nonzero(values[:, :, 0] > 0))  # the first row mixed with a later one
    # Flipped: the partner would be row - offset, before row 0 for the first mixed row of the store; or an
    # offset as wide as the mix group (COMMON's mix_group 8), which no group of 8 positions holds.
    values[row, view, 0] = -(row + 1) if how == "flip" else 8
    mp[:] = values
    expect = "outside the store's rows" if how == "flip" else "mix partner offset of 8 or more"
    with pytest.raises(LogitStoreError, match=expect) as err:
        logitstore.open_store(bad).read(0, len(logitstore.open_store(bad)))
    assert "'mix_params'" in str(err.value) and "\n" not in str(err.value)
    proc = invoke("logitstore", "verify", str(bad))
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip().startswith("problem:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(problems) == 1
    assert "'mix_params'" in problems[0] and expect in problems[0], problems


def test_the_views_repeat_warning_is_for_random_views_only(setup, tmp_path):
    eval_store = tmp_path / "eval.zarr"
    logitstore.dump(str(setup["teacher"]), str(setup["corpus"]), str(eval_store), num_workers=0)
    assert logitstore.open_store(eval_store).meta.views.kind == "eval"
    quiet = invoke("trainer", "fit", "--store", str(eval_store), "--out", str(tmp_path / "e"), "--num-workers", "0")
    assert quiet.returncode == 0 and "views repeat" not in quiet.stderr and "is more than the" not in quiet.stderr
    loud = invoke("trainer", "fit", "--store", str(setup["stores"]["crop-flip"]), "--out", str(tmp_path / "c"),
                  "--epochs", str(VIEWS + 1), "--num-workers", "0")
    assert loud.returncode == 0 and f"--epochs {VIEWS + 1} is more than the {VIEWS} view(s)" in loud.stderr


@pytest.mark.parametrize("kind", ["all", "cutmix"])
def test_show_draws_the_augmented_mixed_view_the_teacher_saw(setup, kind):
    from logitstore.tools.show import _teacher_views

    store = logitstore.open_store(setup["stores"][kind])
    rows = store.read(0, len(store))
    mixed = np.flatnonzero(rows.view_extras[schema.MIX_PARAMS][:, 0, 0] != 0)
    assert len(mixed) > 0
    wanted = list(range(len(store)))
    drawn = _teacher_views(store, str(setup["corpus"]), wanted)
    for r in wanted:  # the embedded pixels are the teacher's exact (mixed) input
        expect = rows.pixels[r, 0].transpose(1, 2, 0)
        np.testing.assert_array_equal(drawn[r], expect[:, :, 0] if expect.shape[2] == 1 else expect)

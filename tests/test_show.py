"""`logitstore show`: a contact sheet grouped by the teacher's top-1 class, checked against the store."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import logitstore
from logitstore.errors import CorpusError, IntegrityError
from logitstore.cli import main
from logitstore.tools.show import contact_sheet

from conftest import run_cli


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, corpus, teacher_ckpt) -> Path:
    out = tmp_path_factory.mktemp("show") / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, chunk_rows=32)
    return out


def _top1_counts(store_path: Path) -> dict[str, int]:
    store = logitstore.open_store(store_path)
    pred = store[0:len(store)].logits[:, 0, :].astype(np.float32).argmax(axis=1)
    return {c: int((pred == k).sum()) for k, c in enumerate(store.classes)}


def test_sheet_groups_every_image_by_the_teachers_top1(store_path, tmp_path):
    out = tmp_path / "sheet.png"
    summary = contact_sheet(store_path, None, out, per_class=3, seed=0)
    counts = _top1_counts(store_path)
    assert summary.images == 120
    assert summary.class_counts == counts
    assert summary.shown == {c: min(3, n) for c, n in counts.items()}
    assert summary.classes_drawn == [str(i) for i in range(10)]   # every class, empty rows included
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 400


def test_sheet_draws_the_same_images_for_the_same_seed(store_path, tmp_path):
    a = contact_sheet(store_path, None, tmp_path / "a.png", per_class=2, seed=5)
    b = contact_sheet(store_path, None, tmp_path / "b.png", per_class=2, seed=5)
    assert a.shown == b.shown
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_sheet_shows_the_stored_random_crops(tmp_path, corpus, teacher_ckpt):
    store = tmp_path / "v4.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(store), views=4, num_workers=0)
    summary = contact_sheet(store, corpus, tmp_path / "v4.png", per_class=2)
    assert sum(summary.class_counts.values()) == 120


def test_sheet_refuses_images_that_differ_from_their_digests(store_path, corpus, tmp_path):
    copy = Path(shutil.copytree(corpus, tmp_path / "copy"))
    victim = sorted(copy.rglob("*.png"))[7]
    Image.fromarray(255 - np.asarray(Image.open(victim))).save(victim)
    with pytest.raises(IntegrityError, match="differ from the digest"):
        contact_sheet(store_path, copy, tmp_path / "x.png", per_class=200)
    victim.unlink()
    with pytest.raises(CorpusError, match="missing"):
        contact_sheet(store_path, copy, tmp_path / "x.png", per_class=200)


def test_sheet_refuses_a_missing_corpus_root(store_path, tmp_path):
    with pytest.raises(CorpusError, match="no such folder"):
        contact_sheet(store_path, tmp_path / "nowhere", tmp_path / "x.png")


def test_show_command_defaults_to_the_recorded_corpus(store_path, tmp_path):
    out = tmp_path / "cli.png"
    res = CliRunner().invoke(main, ["show", str(store_path), "--out", str(out), "--per-class", "2"])
    assert res.exit_code == 0, res.output
    assert out.exists() and "120 images" in res.output and "most predicted" in res.output


def test_logitstore_show_prints_user_errors_in_one_line(store_path, tmp_path):
    ok = run_cli("logitstore", "show", str(store_path), "--out", str(tmp_path / "s.png"), "--per-class", "1")
    assert (tmp_path / "s.png").exists() and "most predicted" in ok.stdout
    bad = run_cli("logitstore", "show", str(store_path), "--images", str(tmp_path / "nowhere"),
                  "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("logitstore: error:") and "no such folder" in bad.stderr

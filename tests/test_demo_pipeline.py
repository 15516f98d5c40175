"""The embedded demo (examples/mnist_ood): a teacher teaches on unlabeled letters, not on noise."""
from __future__ import annotations

import csv
import json
import sys
import unicodedata

import numpy as np
from PIL import Image

from conftest import REPO, run_cli

sys.path.insert(0, str(REPO))  # examples/ is not installed; the demo runs from the repository root

from examples.mnist_ood import corpora, mnist  # noqa: E402


def test_letters_corpus_holds_no_digit_and_is_reproducible(tmp_path):
    assert not [ch for ch in corpora.CANDIDATES if unicodedata.category(ch).startswith("N")]
    a = corpora.write_letters(tmp_path / "a", 60, seed=3, workers=1)
    corpora.write_letters(tmp_path / "b", 60, seed=3, workers=1)
    assert a["images"] == 60 and a["fonts"] >= 1 and a["glyphs"] >= 26
    files = sorted((tmp_path / "a").rglob("*.png"))
    assert len(files) == 60
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
        img = np.asarray(Image.open(f))
        assert img.shape == (28, 28) and img.dtype == np.uint8 and img.max() > 128
    with open(tmp_path / "a" / "glyphs.csv") as fh:
        glyphs = [chr(int(row["glyph"][2:], 16)) for row in csv.DictReader(fh)]
    assert len(glyphs) == 60 and not any(unicodedata.category(ch).startswith("N") for ch in glyphs)


def test_pillow_default_font_alone_draws_letters():
    # The fallback when a machine has no fonts at all (and matplotlib's are missing).
    assert set("ABCxyz") <= set(corpora.coverage(corpora.DEFAULT_FONT))


def test_embedded_mnist_subset_is_small_balanced_and_licensed():
    path = mnist.EMBEDDED
    assert path.stat().st_size <= 5 * 2 ** 20
    data = mnist.load(None)
    assert np.bincount(data.train_labels).tolist() == [1200] * 10
    assert np.bincount(data.test_labels).tolist() == [200] * 10
    assert "CC BY-SA 3.0" in (path.parent / "README.md").read_text()


def test_tiny_pipeline_letters_teach_and_noise_does_not(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("examples.mnist_ood", "--tiny", "--out", str(out), "--no-progress", cwd=REPO, timeout=600)
    steps = json.loads((out / "results.json").read_text())["steps"]
    teacher = steps["teacher accuracy"]["top1"]
    letters, noise = steps["student letters"]["top1"], steps["student noise"]["top1"]
    assert teacher > 0.9
    assert letters > 0.4, f"letters student {letters:.3f}: the letters did not teach"
    assert letters > noise + 0.25, f"letters {letters:.3f} vs noise {noise:.3f}"
    assert noise < 0.3
    # What the teacher says about noise: a few classes take nearly everything.
    hist = sorted(steps["dump noise"]["histogram"].values(), reverse=True)
    assert sum(hist[:2]) > 0.9 * sum(hist)
    for name in ("letters", "noise"):
        assert (out / f"{name}_sheet.png").stat().st_size > 10_000
    assert "letters and symbols, no labels" in proc.stdout and "chance" in proc.stdout

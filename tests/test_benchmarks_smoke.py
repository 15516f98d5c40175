"""benchmarks/function_matching.py at a tiny size: it runs end to end, and its online reference feeds the
teacher exactly the views (and so the logits) that a dump stores."""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import logitstore
from benchmarks import function_matching as fm
from examples.mnist_ood.nets import TRUSTED
from trainer.evaluate import load_checkpoint, model_from_checkpoint
from trainer.inputs import make_input_spec

from conftest import MNIST


def test_function_matching_runs_and_online_sees_what_the_dump_stored(tmp_path):
    out = tmp_path / "result.json"
    png = tmp_path / "fm.png"
    threads = torch.get_num_threads()
    try:
        fm.main(["--mnist", str(MNIST), "--workdir", str(tmp_path / "work"), "--letters", "100", "--epochs", "1",
                 "--seeds", "1", "--views", "2", "--families", "crops,crops + mixup/cutmix", "--teacher-images", "1000",
                 "--teacher-epochs", "1", "--test-images", "300", "--png", str(png), "--json", str(out)])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets its own thread count
    result = json.loads(out.read_text())
    arms = {a["name"]: a for a in result["arms"]}
    assert list(arms) == ["online", "offline 2", "online, mixup/cutmix", "offline 2, mixup/cutmix"]
    for arm in arms.values():
        assert len(arm["top1"]) == 1 and 0 <= arm["top1"][0] <= 1 and arm["epoch_s"][0] > 0
    assert arms["offline 2, mixup/cutmix"]["store_bytes"] > arms["offline 2"]["store_bytes"] > 0  # + mix params
    assert 0.3 < result["teacher_top1"] <= 1  # trained on 1,000 digits: well above chance (0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The online reference draws its views as the dump does: with the dump's seed, its first fresh view of
    # each image is the store's view 0, and the teacher gives back the stored logits (float16).
    work = tmp_path / "work"
    path = work / "stores" / "crops_v2.zarr"
    store = logitstore.open_store(path)
    rows = store.read(0, len(store))
    teacher_pt = next(work.glob("teacher_*.pt"))
    teacher = model_from_checkpoint(load_checkpoint(teacher_pt), str(teacher_pt), TRUSTED).eval()
    ids, imgs = fm.corpus_pixels(path, work / "letters_100")
    assert list(ids) == list(rows.ids)
    spec = make_input_spec(store.meta.preprocess, None, store.meta.preprocess.channels)
    view = fm.family_view("crops", argparse.Namespace(crop_scale=[0.5, 1.0], flip_prob=0.5))
    pixels = fm.fresh_views(imgs, ids, view, spec, store.meta.seed)
    with torch.no_grad():
        logits = teacher(spec.to_input(pixels))
    np.testing.assert_allclose(logits.numpy(), rows.logits[:, 0].astype(np.float32), rtol=2e-3, atol=2e-3)
    other = fm.fresh_views(imgs, ids, view, spec, store.meta.seed + 1)
    assert not torch.equal(other, pixels)  # another step's seed: other views

"""Training through the public API: learning, resume, checkpoints, labels, students, no teacher."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import logitstore
import trainer
from trainer.students import build_student

from conftest import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster

FAST = dict(student="lenet", batch_size=32, warmup_epochs=0.2, num_workers=0)


def test_short_run_learns_far_above_chance(world: World, tmp_path: Path):
    res = trainer.fit([world.store], tmp_path / "run", epochs=3, eval_images=world.labeled, **FAST)
    final = res.final
    assert [r["epoch"] for r in res.history] == [1, 2, 3]
    assert final["eval_top1"] > 0.7 and final["eval_top5"] > 0.9         # chance: 0.1 and 0.5
    assert final["agree"] > 0.6                                           # with the teacher, held out
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert final["samples"] == 640 - 13 and final["skipped"] == 0        # 2% (13 images) held out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["eval_top1"] for ln in lines] == [r["eval_top1"] for r in res.history]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # The saved student evaluates to the same accuracy on its own (same transform, same weights).
    again = trainer.evaluate(res.checkpoint, world.labeled)
    assert again.top1 == pytest.approx(final["eval_top1"]) and again.n == 300


def test_resume_continues_exactly_like_an_uninterrupted_run(world: World, tmp_path: Path, capsys):
    kw = dict(epochs=2, seed=7, **FAST)
    whole = trainer.fit([world.store], tmp_path / "whole", **kw)
    part = trainer.fit([world.store], tmp_path / "split", stop_after=1, **kw)
    assert [r["epoch"] for r in part.history] == [1]
    assert torch.load(part.checkpoint, weights_only=True)["epoch"] == 1
    resumed = trainer.fit([world.store], tmp_path / "split", resume=True, **kw)
    a = torch.load(whole.checkpoint, weights_only=True)
    b = torch.load(resumed.checkpoint, weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert [r["train_loss"] for r in whole.history] == [r["train_loss"] for r in resumed.history]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    # A finished run resumed again trains nothing, keeps its student and says so.
    saved = Path(resumed.checkpoint).read_bytes()
    capsys.readouterr()
    again = trainer.fit([world.store], tmp_path / "split", resume=True, **kw)
    assert "has trained all its 2 epoch(s): nothing to resume" in capsys.readouterr().err
    assert Path(again.checkpoint).read_bytes() == saved and again.history == resumed.history


def test_a_run_directory_is_not_overwritten_without_asking(world: World, tmp_path: Path):
    trainer.fit([world.store], tmp_path / "run", epochs=1, **FAST)
    with pytest.raises(trainer.RunDirError, match="--resume"):
        trainer.fit([world.store], tmp_path / "run", epochs=1, **FAST)
    with pytest.raises(trainer.RunDirError, match="no checkpoint"):
        trainer.fit([world.store], tmp_path / "other", epochs=1, resume=True, **FAST)
    with pytest.raises(trainer.StoreMismatchError, match="differs from the checkpoint"):
        trainer.fit([world.store_views], tmp_path / "run", epochs=2, resume=True, **FAST)
    # Another recipe is another run: named flag by flag, nothing trained.
    with pytest.raises(trainer.RunDirError, match=r"other --temperature 2.0 \(checkpoint: 4.0\), --seed 3 "
                                                   r"\(checkpoint: 0\)"):
        trainer.fit([world.store], tmp_path / "run", epochs=1, resume=True, temperature=2.0, seed=3, **FAST)


def test_student_checkpoint_is_a_teacher_for_the_next_round(world: World, tmp_path: Path):
    res = trainer.fit([world.store], tmp_path / "run", epochs=1, input_size=(32, 32), **FAST)
    ckpt = torch.load(res.checkpoint, weights_only=True)  # plain tensors, dicts, lists, numbers
    assert ckpt["arch"] == "trainer.students:lenet" and ckpt["classes"] == [str(i) for i in range(10)]
    assert ckpt["preprocess"]["size"] == [32, 32] and isinstance(ckpt["args"], dict)
    assert ckpt["stores"][0]["contents"] == logitstore.open_store(world.store).meta.fingerprints["contents"]
    summary = logitstore.dump(res.checkpoint, str(world.corpus / "part0"), str(tmp_path / "round2.zarr"),
                              num_workers=0)
    assert summary.n_images == 200
    store = logitstore.open_store(tmp_path / "round2.zarr")
    assert store.meta.preprocess.size == (32, 32) and store.meta.teacher.arch == "trainer.students:lenet"


def test_training_never_loads_the_teacher(world: World, tmp_path: Path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(world.teacher, teacher)
    store = tmp_path / "s.zarr"
    logitstore.dump(str(teacher), str(world.corpus / "part0"), str(store), chunk_rows=64, num_workers=0)
    teacher.unlink()  # gone: training can only use the store
    code = (
        "import sys, trainer\n"
        f"res = trainer.fit([{str(store)!r}], {str(tmp_path / 'run')!r}, epochs=1, student='lenet', "
        "batch_size=32, num_workers=0)\n"
        "assert res.final['samples'] > 0\n"
        "bad = sorted(m for m in sys.modules if m == 'logitstore.teacher' or m.startswith('logitstore.teacher.'))\n"
        "print('TEACHER MODULES', bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "TEACHER MODULES []" in out.stdout


def test_alpha_adds_hard_labels_where_images_have_them(world: World, tmp_path: Path):
    store = tmp_path / "labeled.zarr"
    logitstore.dump(str(world.teacher), str(world.labeled), str(store), chunk_rows=64, num_workers=0)
    with pytest.raises(trainer.ConfigError, match="needs hard labels"):
        trainer.fit([store], tmp_path / "a", epochs=1, alpha=0.5, **FAST)
    res = trainer.fit([store], tmp_path / "b", epochs=1, alpha=0.5, labels_from_folders=True, **FAST)
    r = res.final
    assert r["train_ce"] > 0 and r["train_loss"] == pytest.approx(r["train_kd"] + 0.5 * r["train_ce"], rel=1e-6)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,class\n" + "\n".join(f"{p.parent.name}/{p.name},{p.parent.name}"
                                               for p in sorted(world.labeled.glob("*/*.png"))[:50]))
    res = trainer.fit([store], tmp_path / "c", epochs=1, alpha=0.5, labels=str(labels), **FAST)
    assert res.final["train_ce"] > 0
    labels.write_text("0/t00003.png,cat\n")
    with pytest.raises(trainer.ClassMismatchError, match="cat"):
        trainer.fit([store], tmp_path / "d", epochs=1, alpha=0.5, labels=str(labels), **FAST)
    labels.write_bytes("0/t00003.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(trainer.ConfigError, match="not UTF-8 text"):
        trainer.fit([store], tmp_path / "e", epochs=1, alpha=0.5, labels=str(labels), **FAST)


def test_students_by_name_torchvision_and_factory(world: World, tmp_path: Path):
    model, kwargs = build_student("torchvision:resnet18", 10, 3, (28, 28))
    assert kwargs == {"num_classes": 10} and model.fc.out_features == 10
    res = trainer.fit([world.store], tmp_path / "run", epochs=1, student="trainer.students:cifar_resnet",
                      student_kwargs='{"depth": 8, "width": 8}', **{k: v for k, v in FAST.items() if k != "student"})
    ckpt = torch.load(res.checkpoint, weights_only=True)
    assert ckpt["arch_kwargs"] == {"depth": 8, "width": 8, "num_classes": 10, "in_channels": 1}
    with pytest.raises(trainer.StudentError, match="unknown student 'vgg'"):
        trainer.fit([world.store], tmp_path / "x", student="vgg", epochs=1)
    with pytest.raises(trainer.StudentError, match="cannot import"):
        trainer.fit([world.store], tmp_path / "x", student="no_such_pkg.mod:net", epochs=1)


def test_greyscale_store_feeds_an_rgb_student(world: World, tmp_path: Path):
    res = trainer.fit([world.store], tmp_path / "run", epochs=1, in_channels=3, precision="bf16", **FAST)
    ckpt = torch.load(res.checkpoint, weights_only=True)
    assert ckpt["arch_kwargs"]["in_channels"] == 3 and ckpt["preprocess"]["mode"] == "RGB"
    assert trainer.evaluate(res.checkpoint, world.labeled).n == 300  # decodes the grey PNGs as RGB

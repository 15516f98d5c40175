"""The `trainer` command line: flags reach the library, results print, user errors are one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import logitstore
from trainer.cli import main

from conftest import World

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    # One line, the last (a progress bar may precede it); no traceback.
    assert errors == [lines[-1]] and lines[-1].startswith("trainer: error: "), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[-1], (f, lines[-1])


def test_every_fit_and_eval_flag_is_documented():
    for name in ("fit", "eval"):
        cmd = main.commands[name]
        undocumented = [p.name for p in cmd.params if isinstance(p, __import__("click").Option) and not p.help]
        assert not undocumented, (name, undocumented)
        text = run(name, "--help").output
        assert all(opt in text for p in cmd.params for opt in p.opts)


def test_fit_flags_reach_the_library_and_eval_prints_json(world: World, tmp_path: Path):
    out = tmp_path / "run"
    r = run("fit", "--store", world.store, "--student", "lenet", "--out", out, "--epochs", "2", "--batch-size", "32",
            "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.01", "--warmup-epochs", "0.5",
            "--temperature", "2", "--clip-grad", "3", "--holdout", "0.05", "--shuffle-blocks", "4",
            "--cache-images", "0.5", "--num-workers", "0", "--seed", "3", "--input-size", "28,28",
            "--eval", world.labeled, "--device", "cpu", "--precision", "fp32")
    assert r.exit_code == 0, r.output
    assert "trainer fit" in r.output and "top-1" in r.output and "decode cache" in r.output  # the summary
    args = torch.load(out / "checkpoint.pt", weights_only=True)["args"]
    assert (args["optimizer"], args["lr"], args["weight_decay"], args["temperature"], args["clip_grad"]) == \
        ("adamw", 0.003, 0.01, 2.0, 3.0)
    assert (args["holdout"], args["shuffle_blocks"], args["cache_images"], args["seed"]) == (0.05, 4, 0.5, 3)
    history = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    r = run("eval", "--checkpoint", out / "checkpoint.pt", "--images", world.labeled, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["n"] == 300 and res["top1"] == pytest.approx(history[-1]["eval_top1"])
    assert res["top5"] == pytest.approx(history[-1]["eval_top5"])
    r = run("eval", "--checkpoint", out / "checkpoint.pt", "--images", world.labeled)
    assert "top-1" in r.output and "top-5" in r.output


def test_missing_store_is_one_line(tmp_path: Path):
    assert_one_line_error(run("fit", "--store", tmp_path / "nope.zarr", "--out", tmp_path / "r"), "nope.zarr")


def test_incomplete_store_is_one_line(world: World, tmp_path: Path):
    store = tmp_path / "partial.zarr"

    def stop(_n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(logitstore.LogitStoreError):
        logitstore.dump(str(world.teacher), str(world.corpus), str(store), chunk_rows=64, batch_size=64,
                        num_workers=0, on_batch=stop)
    assert_one_line_error(run("fit", "--store", store, "--out", tmp_path / "r"), "incomplete")


def test_unknown_student_is_one_line(world: World, tmp_path: Path):
    assert_one_line_error(run("fit", "--store", world.store, "--student", "resnet9000", "--out", tmp_path / "r"),
                          "unknown student 'resnet9000'")
    assert_one_line_error(run("fit", "--store", world.store, "--student", "torchvision:nonet", "--out",
                              tmp_path / "r"), "nonet")


def test_eval_folder_with_other_class_names_is_one_line(world: World, tmp_path: Path):
    folder = tmp_path / "animals"
    for cls in ("0", "cat"):
        (folder / cls).mkdir(parents=True)
        shutil.copy(next(world.labeled.glob("0/*.png")), folder / cls / "a.png")
    assert_one_line_error(run("fit", "--store", world.store, "--eval", folder, "--out", tmp_path / "r"),
                          "['cat']", "not among the classes the student learns")
    ckpt = tmp_path / "r2"
    assert run("fit", "--store", world.store, "--out", ckpt, "--epochs", "1", "--num-workers", "0",
               "--quiet").exit_code == 0
    assert_one_line_error(run("eval", "--checkpoint", ckpt / "checkpoint.pt", "--images", folder), "cat")


def test_eval_of_a_teacher_program_is_one_line_saying_what_it_takes(world: World, tmp_path: Path):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    torch.jit.save(torch.jit.script(net), tmp_path / "t.ts")
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 28, 28),)), tmp_path / "t.pt2")
    for f, kind in (("t.ts", "a TorchScript program"), ("t.pt2", "a torch.export program")):
        assert_one_line_error(run("eval", "--checkpoint", tmp_path / f, "--images", world.labeled), kind,
                              "not weights or a checkpoint", "such as trainer fit writes")
    # a text file and a plain pickle are no checkpoint at all (not "Python objects refused"), without torch's warning
    import pickle

    (tmp_path / "notes.txt").write_text("x\n")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"x": 1}, protocol=4))
    for f in ("notes.txt", "plain.pt"):
        assert_one_line_error(run("eval", "--checkpoint", tmp_path / f, "--images", world.labeled),
                              "not a PyTorch checkpoint", "pass a torch.save'd state dict or checkpoint")


def test_contradictory_fit_flags_are_one_line(world: World, tmp_path: Path):
    assert_one_line_error(run("fit", "--store", world.store, "--out", tmp_path / "r", "--resume", "--overwrite"),
                          "--resume continues the run", "pass one")
    assert_one_line_error(run("fit", "--store", world.store, "--out", tmp_path / "r", "--labels-from-folders",
                              "--labels", tmp_path / "labels.json", "--alpha", "0.5"),
                          "--labels FILE and --labels-from-folders: pass one")
    assert not (tmp_path / "r").exists()


def test_changed_image_is_one_line_naming_it_unless_skipped(world: World, tmp_path: Path):
    corpus = tmp_path / "corpus"
    shutil.copytree(world.corpus, corpus)
    victim = corpus / "part2" / "img00444.png"
    img = np.asarray(Image.open(victim)).copy()
    img[5, 5] ^= 0x55
    Image.fromarray(img).save(victim)
    base = ("fit", "--store", world.store, "--images", corpus, "--epochs", "1", "--num-workers", "1")
    assert_one_line_error(run(*base, "--out", tmp_path / "a"), "img00444.png", "sha256", "--skip-mismatched")
    r = run(*base, "--out", tmp_path / "b", "--skip-mismatched")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "metrics.jsonl").read_text())["skipped"] == 1


def test_missing_corpus_is_one_line_saying_where_it_looked(world: World, tmp_path: Path):
    assert_one_line_error(run("fit", "--store", world.store, "--images", tmp_path / "gone", "--out", tmp_path / "r"),
                          str(tmp_path / "gone"), "--images")


def test_stores_that_disagree_are_one_line_naming_the_difference(world: World, tmp_path: Path):
    other = tmp_path / "norm.zarr"
    logitstore.dump(str(world.teacher), str(world.corpus / "part0"), str(other), chunk_rows=64, num_workers=0,
                    mean=(0.5,), std=(0.5,))
    assert_one_line_error(run("fit", "--store", world.store, "--store", other, "--out", tmp_path / "r"),
                          "preprocessing differ", "mean")

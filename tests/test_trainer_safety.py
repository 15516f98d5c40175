"""The trainer never ends 'done' with a broken result and never writes over what it did not write: every
numeric flag is finite and in range (CLI and library alike), a diverging run stops and keeps its last good
checkpoint, an epoch with no images is an error, and --out is only ever absent, empty or a run of ours."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import trainer
from logitstore.errors import DestinationError
from trainer.cli import main
from trainer.errors import ConfigError
from trainer.fit import LIMITS

from conftest import World, assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster


def fit_cli(world: World, out: str | Path, *flags: str):
    return run_cli("trainer", "fit", "--store", str(world.store), "--out", str(out), "--num-workers", "0",
                   "--batch-size", "32", "--quiet", *flags, check=False, timeout=120)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- numbers ------------------------------------------------------------------------------------

# The values that used to traceback, train a NaN student, or be silently accepted (all in FIT_BAD below).
KNOWN_BAD = [("--temperature", "nan"), ("--temperature", "inf"), ("--lr", "nan"), ("--lr", "inf"),
             ("--momentum", "nan"), ("--teacher-weights", "1,nan"), ("--warmup-epochs", "nan"),
             ("--cache-images", "nan"), ("--weight-decay", "-1"), ("--in-channels", "0"), ("--num-workers", "-1")]


def test_numbers_that_used_to_traceback_are_one_line_in_a_real_process(world: World, tmp_path: Path):
    # What a user runs; a few only, two at a time, as each process spends seconds importing torch
    # (every flag is checked in-process below).
    cases = [("--warmup-epochs", "nan"), ("--teacher-weights", "1,nan")]  # refused by the flag type / the command
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda fv: fit_cli(world, tmp_path / "run", *fv), cases))
    for (flag, value), proc in zip(cases, procs):
        assert_one_line_error(proc, "trainer: error:", flag, value)
    assert not (tmp_path / "run").exists()


# Every numeric flag of fit and eval, each way out of its range.
FIT_BAD = KNOWN_BAD + \
    [(flag, v) for flag in ("--temperature", "--lr", "--momentum", "--weight-decay", "--warmup-epochs", "--clip-grad",
                            "--alpha", "--holdout", "--cache-images") for v in ("nan", "-inf", "-1")] + \
    [("--momentum", "1"), ("--holdout", "1"), ("--temperature", "0"), ("--lr", "0"), ("--in-channels", "65"),
     ("--seed", "-1"), ("--seed", str(2 ** 64)), ("--cache-images", "1e300"), ("--teacher-weights", "1,-1"),
     ("--teacher-weights", "0,0"), ("--teacher-weights", "1,inf"), ("--teacher-weights", "1,x")] + \
    [(flag, v) for flag in ("--epochs", "--batch-size", "--shuffle-blocks", "--stop-after", "--in-channels")
     for v in ("0", "-3", "1.5", "nan")] + [("--num-workers", "nan")]


@pytest.mark.parametrize("flag,value", FIT_BAD)
def test_every_numeric_fit_flag_refuses_non_finite_and_out_of_range(tmp_path: Path, flag: str, value: str):
    r = CliRunner().invoke(main, ["fit", "--store", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "run"),
                                  flag, value])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainer: error: ") and flag in lines[0], r.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "nan"), ("--num-workers", "-1")])
def test_every_numeric_eval_flag_refuses_out_of_range(tmp_path: Path, flag: str, value: str):
    r = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "c.pt"), "--images", str(tmp_path),
                                  flag, value])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("trainer: error: ") and flag in r.output and len(r.output.splitlines()) == 1


LIBRARY_BAD = [(name, v) for name in LIMITS for v in (float("nan"), float("inf"), -1)] + \
              [("momentum", 1.0), ("holdout", 1.0), ("in_channels", 65), ("epochs", 2.5), ("seed", True),
               ("warmup_epochs", 11.0), ("teacher_weights", [1.0, float("nan")]), ("teacher_weights", [0.0, 0.0])]


@pytest.mark.parametrize("name,value", LIBRARY_BAD, ids=[f"{n}={v}" for n, v in LIBRARY_BAD])
def test_library_refuses_what_the_cli_refuses(tmp_path: Path, name: str, value):
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}"):
        trainer.fit([tmp_path / "s.zarr"], tmp_path / "run", **{"epochs": 10, name: value})
    assert not (tmp_path / "run").exists()


def test_flag_types_and_library_share_one_table():
    for name, limit in LIMITS.items():
        opt = next(p for p in main.commands["fit"].params if p.name == name)
        flag = opt.type.limit  # the flag type's own Limit (logitstore.cli_common.Number)
        assert (flag.lo, flag.hi, flag.kind) == (limit.lo, limit.hi, limit.kind), name


# --- runs that must not end 'done' -------------------------------------------------------------

def test_diverging_run_stops_in_one_line_and_keeps_the_last_good_checkpoint(world: World, tmp_path: Path):
    # Weight decay with lr * wd > 2 makes every weight grow geometrically, whatever the data: with the
    # learning rate warming up over both epochs, epoch 1 stays finite and epoch 2 overflows.
    out = tmp_path / "run"
    proc = fit_cli(world, out, "--epochs", "2", "--warmup-epochs", "2", "--lr", "12", "--weight-decay", "1",
                   "--momentum", "0", "--holdout", "0")
    err = assert_one_line_error(proc, "training diverged in epoch 2, step", "not finite", "--lr 12",
                                "logitstore verify", "still holds epoch 1")
    assert str(out / "checkpoint.pt") in err
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
    assert not (out / "checkpoint.pt.tmp").exists()


def test_diverging_first_epoch_writes_no_checkpoint(world: World, tmp_path: Path):
    with pytest.raises(trainer.TrainerError, match="diverged in epoch 1.*no checkpoint was written"):
        trainer.fit([world.store], tmp_path / "run", epochs=1, lr=1e30, clip_grad=0, batch_size=32, num_workers=0)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_an_epoch_that_trains_on_no_images_is_an_error(world: World, tmp_path: Path):
    elsewhere = tmp_path / "not_the_corpus"
    elsewhere.mkdir()
    proc = fit_cli(world, tmp_path / "run", "--images", str(elsewhere), "--skip-mismatched", "--epochs", "1")
    assert_one_line_error(proc, "epoch 1 trained on no images", "--skip-mismatched")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- --out ------------------------------------------------------------------------------------

def users_folder(root: Path) -> Path:
    (root / "chapters").mkdir(parents=True)
    (root / "notes.txt").write_bytes(b"precious \x00\xff bytes\n")
    (root / "chapters" / "one.tex").write_text("\\chapter{One}\n")
    return root


def test_out_holding_a_users_file_is_refused_even_with_overwrite_and_keeps_every_byte(world: World, tmp_path: Path):
    out = users_folder(tmp_path / "thesis")
    before = snapshot(out)
    assert_one_line_error(fit_cli(world, out, "--epochs", "1", "--overwrite"), "non-empty directory",
                          "not a run directory")
    assert snapshot(out) == before and sorted(p.name for p in out.rglob("*")) == ["chapters", "notes.txt", "one.tex"]


@pytest.mark.parametrize("flag", ["overwrite", "resume", None])
def test_library_refuses_a_users_folder_too(world: World, tmp_path: Path, flag):
    out = users_folder(tmp_path / "thesis")
    before = snapshot(out)
    with pytest.raises(DestinationError, match="not a run directory"):
        trainer.fit([world.store], out, epochs=1, num_workers=0, **({flag: True} if flag else {}))
    assert snapshot(out) == before and sorted(p.name for p in out.rglob("*")) == ["chapters", "notes.txt", "one.tex"]


def test_out_equal_to_the_store_is_refused(world: World):
    before = snapshot(world.store)
    assert_one_line_error(fit_cli(world, world.store, "--epochs", "1", "--overwrite"), "overlaps")
    assert snapshot(world.store) == before


@pytest.mark.parametrize("where", ["", "/", ".", "store/inside", "store/..", "corpus", "corpus/part0/run",
                                   "labeled/3/run"])
def test_out_that_is_an_input_or_a_place_of_no_run_is_refused(world: World, tmp_path: Path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    out = where.replace("store", str(world.store)).replace("corpus", str(world.corpus)) \
        .replace("labeled", str(world.labeled))
    r = CliRunner().invoke(main, ["fit", "--store", str(world.store), "--out", out, "--eval", str(world.labeled),
                                  "--num-workers", "0", "--quiet", "--overwrite"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.output.startswith("trainer: error: --out") and len(r.output.splitlines()) == 1, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_of_ours_is_still_resumed_and_overwritten(world: World, tmp_path: Path):
    out = tmp_path / "run"
    kw = dict(epochs=2, batch_size=32, num_workers=0, warmup_epochs=0.2)
    trainer.fit([world.store], out, stop_after=1, **kw)
    assert trainer.fit([world.store], out, resume=True, **kw).final["epoch"] == 2
    assert trainer.fit([world.store], out, overwrite=True, **{**kw, "epochs": 1}).final["epoch"] == 1

"""Students as users train them: timm students, pretrained weights, EMA, --compile, hard-label and
DeiT-style (distillation-token) distillation, and the familiar flag aliases."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import logitstore
import trainer
from trainer.ema import ModelEMA
from trainer.evaluate import load_checkpoint, model_from_checkpoint
from trainer.inputs import NO_LABEL
from trainer.loss import hard_distillation_loss, objective, two_head_objective
from trainer.students import lenet, tiny_deit

from conftest import World, assert_one_line_error, invoke

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny nets: one thread is faster

FAST = dict(batch_size=32, warmup_epochs=0.2, num_workers=0)


# --- losses, by hand ---------------------------------------------------------------------------

def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _kd(s: list[float], t: list[float], temp: float) -> float:
    """T^2 KL(softmax(t/T) || softmax(s/T)) of one row, in plain Python."""
    ls, lt = _log_softmax([v / temp for v in s]), _log_softmax([v / temp for v in t])
    return temp * temp * sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))


def _ce(s: list[float], c: int) -> float:
    return -_log_softmax(s)[c]


S = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 1.0]]
D = [[1.0, 1.0, 0.0], [0.5, -0.5, 2.0], [0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]
TEACHER = [[0.0, 4.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 1.5], [0.2, 0.1, 3.0]]   # top-1: 1, 0, 1, 2
LABELS = [2, NO_LABEL, 0, NO_LABEL]


def test_hard_distillation_is_cross_entropy_to_the_teachers_top1():
    s, t = torch.tensor(S), torch.tensor(TEACHER)
    want = sum(_ce(row, c) for row, c in zip(S, [1, 0, 1, 2])) / 4
    assert float(hard_distillation_loss(s, t)) == pytest.approx(want, rel=1e-6)
    # --distill hard through the objective, plus alpha times the labels' cross-entropy where they exist
    total, kd, ce = objective(s, t, torch.tensor(LABELS), 4.0, 0.5, "hard")
    want_ce = (_ce(S[0], 2) + _ce(S[2], 0)) / 2
    assert float(kd) == pytest.approx(want, rel=1e-6) and float(ce) == pytest.approx(want_ce, rel=1e-6)
    assert float(total) == pytest.approx(want + 0.5 * want_ce, rel=1e-6)
    # soft stays the default: T^2 KL
    assert float(objective(s, t, None, 4.0, 0.0)[0]) == pytest.approx(
        sum(_kd(a, b, 4.0) for a, b in zip(S, TEACHER)) / 4, rel=1e-5)


@pytest.mark.parametrize("distill", ["soft", "hard"])
def test_two_head_loss_by_hand(distill: str):
    temp, top1 = 2.0, [1, 0, 1, 2]
    d = (lambda s, i: _kd(s, TEACHER[i], temp)) if distill == "soft" else (lambda s, i: _ce(s, top1[i]))
    # distillation head: the teacher on every row; class head: the label where a row has one, else the same
    # target as the distillation head; total = 1/2 + 1/2
    want_dist = sum(d(D[i], i) for i in range(4)) / 4
    want_cls = (_ce(S[0], 2) + d(S[1], 1) + _ce(S[2], 0) + d(S[3], 3)) / 4
    total, dist, cls = two_head_objective(torch.tensor(S), torch.tensor(D), torch.tensor(TEACHER),
                                          torch.tensor(LABELS), temp, distill)
    assert float(dist) == pytest.approx(want_dist, rel=1e-5) and float(cls) == pytest.approx(want_cls, rel=1e-5)
    assert float(total) == pytest.approx((want_cls + want_dist) / 2, rel=1e-5)
    # no labels at all: both heads learn the teacher; a 2-tuple output takes this loss through `objective`
    total, _, cls = objective((torch.tensor(S), torch.tensor(D)), torch.tensor(TEACHER), None, temp, 0.0, distill)
    assert float(cls) == pytest.approx(sum(d(S[i], i) for i in range(4)) / 4, rel=1e-5)


# --- EMA -----------------------------------------------------------------------------------------

def test_ema_is_the_average_of_the_recorded_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    decay = 0.8
    ema = ModelEMA(model, decay)
    raw = [[p.detach().clone() for p in model.parameters()]]
    for _ in range(5):
        loss = model(torch.randn(16, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()
        raw.append([p.detach().clone() for p in model.parameters()])
    want = raw[0]
    for step in raw[1:]:   # e_0 = w_0, e_k = d e_(k-1) + (1 - d) w_k, in float64
        want = [decay * e.double() + (1 - decay) * w.double() for e, w in zip(want, step)]
    got = list(ema.module.parameters())
    assert ema.updates == 5 and not torch.equal(got[0], raw[-1][0])
    for g, w in zip(got, want):  # float32 arithmetic against float64: within 1e-6
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-7)
    # buffers are copied from the trained model, not averaged
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert int(ema.module[1].num_batches_tracked) == 5


def test_ema_is_measured_saved_and_resumed_exactly(world: World, tmp_path: Path):
    kw = dict(student="lenet", epochs=2, seed=3, ema=0.9, eval_images=world.labeled, **FAST)
    whole = trainer.fit([world.store], tmp_path / "whole", **kw)
    trainer.fit([world.store], tmp_path / "split", stop_after=1, **kw)
    resumed = trainer.fit([world.store], tmp_path / "split", resume=True, **kw)
    a, b = load_checkpoint(whole.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a["ema"] == b["ema"] == {"decay": 0.9, "updates": 2 * 20}
    for key in ("state_dict", "raw_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert not torch.equal(a["state_dict"]["0.weight"], a["raw_state_dict"]["0.weight"])
    # the held-out metrics are the average's: the saved state_dict evaluates to the same accuracy
    assert trainer.evaluate(whole.checkpoint, world.labeled).top1 == pytest.approx(whole.final["eval_top1"])
    assert whole.final["eval_top1"] > 0.5


# --- DeiT-style students ---------------------------------------------------------------------------

def test_tiny_deit_trains_two_heads_and_answers_their_average(world: World, mnist, tmp_path: Path):
    # true labels for the corpus's first 300 images (conftest: MNIST train images 5000..5639); no --alpha needed
    labels = tmp_path / "labels.json"
    ids = [f"part{i // 200}/img{i:05d}.png" for i in range(300)]
    labels.write_text(json.dumps({k: str(int(c)) for k, c in zip(ids, mnist["train_labels"][5000:5300])}))
    res = trainer.fit([world.store], tmp_path / "run", student="tiny_deit", epochs=1, lr=2e-3, optimizer="adamw",
                      distill="hard", labels=labels, eval_images=world.labeled, **FAST)
    ckpt = load_checkpoint(res.checkpoint)
    model = model_from_checkpoint(ckpt, res.checkpoint)
    x = torch.randn(5, 1, 28, 28)
    cls, dist = model.train()(x)
    torch.testing.assert_close(model.eval()(x), (cls + dist) / 2, rtol=1e-5, atol=1e-5)
    assert trainer.evaluate(res.checkpoint, world.labeled).top1 == pytest.approx(res.final["eval_top1"])
    assert res.final["eval_top1"] > 0.2   # chance: 0.1
    with pytest.raises(trainer.ConfigError, match="drop --alpha"):
        trainer.fit([world.store], tmp_path / "x", student="tiny_deit", epochs=1, alpha=0.5, labels=labels, **FAST)


# --- timm, aliases, the next round ---------------------------------------------------------------

def test_timm_student_trains_from_the_cli_and_teaches_the_next_round(world: World, tmp_path: Path):
    out = tmp_path / "run"
    # the command line, run in this process (click's runner): a second Python importing torch and timm
    # would take longer than the training
    fitted = invoke("trainer", "fit", "--store", str(world.store), "--student", "timm:test_resnet", "--epochs", "1",
                    "-b", "48", "-j", "0", "--wd", "0.0001", "--output-dir", str(out), "--warmup-epochs", "0.2",
                    "--eval", str(world.labeled), "--quiet")
    assert fitted.returncode == 0, fitted.stderr
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["arch"] == "timm:test_resnet" and ckpt["arch_kwargs"] == {"num_classes": 10, "in_chans": 1}
    args = ckpt["args"]   # the aliases set the flags they stand for
    assert (args["batch_size"], args["num_workers"], args["weight_decay"], args["out"]) == (48, 0, 1e-4, str(out))
    eval_top1 = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["eval_top1"]
    ev = invoke("trainer", "eval", "--checkpoint", str(out / "checkpoint.pt"), "--images", str(world.labeled),
                 "-b", "64", "-j", "0", "--json")
    assert json.loads(ev.stdout)["top1"] == pytest.approx(eval_top1)

    part = world.corpus / "part0"
    assert ev.returncode == 0, ev.stderr
    dumped = invoke("logitstore", "dump", "--teacher", str(out / "checkpoint.pt"), "--images", str(part),
                    "--out", str(tmp_path / "round2.zarr"), "--num-workers", "0")
    assert dumped.returncode == 0, dumped.stderr
    store = logitstore.open_store(tmp_path / "round2.zarr")
    rows = store[:]
    assert store.meta.teacher.arch == "timm:test_resnet" and len(rows.ids) == 200
    # the store's logits are the student's outputs on those images (preprocessed by hand: /255, mean, std)
    pixels = np.stack([np.asarray(Image.open(part / i), np.float32) for i in rows.ids]) / 255.0
    x = (torch.from_numpy(pixels)[:, None] - 0.1307) / 0.3081
    with torch.no_grad():
        want = model_from_checkpoint(ckpt, "ckpt").eval()(x)
    got = torch.from_numpy(np.asarray(rows.logits, np.float32))[:, 0]
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)   # stored as float16


# --- pretrained initialisation ---------------------------------------------------------------------

def test_student_weights_set_the_starting_point(world: World, tmp_path: Path):
    teacher = load_checkpoint(world.teacher)["state_dict"]   # a lenet: the store's own teacher
    weights = tmp_path / "lenet.safetensors"
    save_file({k: v.contiguous() for k, v in teacher.items()}, str(weights))
    # lr so small that no weight moves: the epoch's loss is the loaded model's, on its own logits ~0
    kw = dict(student="lenet", epochs=1, lr=1e-30, warmup_epochs=0, **{k: v for k, v in FAST.items() if k !=
                                                                     "warmup_epochs"})
    loaded = trainer.fit([world.store], tmp_path / "loaded", student_weights=weights, **kw)
    fresh = trainer.fit([world.store], tmp_path / "fresh", **kw)
    assert loaded.final["train_loss"] < 1e-3 < 0.1 < fresh.final["train_loss"]
    saved = load_checkpoint(loaded.checkpoint)["state_dict"]
    assert all(torch.equal(saved[k], teacher[k]) for k in teacher)

    # a head for other classes (a torch state dict this time) is re-initialised, and said so
    other = lenet(num_classes=5, in_channels=1).state_dict()
    torch.save(other, tmp_path / "five.pt")
    res = trainer.fit([world.store], tmp_path / "five", student_weights=tmp_path / "five.pt", **kw)
    assert "head 12.weight, 12.bias re-initialised: the file has 5 classes, the store 10" in \
        res.info["student weights"]
    saved = load_checkpoint(res.checkpoint)["state_dict"]
    assert torch.equal(saved["0.weight"], other["0.weight"]) and saved["12.weight"].shape == (10, 84)

    # weights of another architecture: one line naming the keys
    save_file(tiny_deit(10, 1).state_dict(), str(tmp_path / "deit.safetensors"))
    proc = invoke("trainer", "fit", "--store", str(world.store), "--out", str(tmp_path / "bad"),
                  "--student-weights", str(tmp_path / "deit.safetensors"), "-j", "0")
    assert_one_line_error(proc, "deit.safetensors does not fit this student", "missing (0.weight", "unexpected")


# --- torch.compile ---------------------------------------------------------------------------------

def test_compiled_student_trains_on_cpu(world: World, tmp_path: Path):
    # 627 training rows = 11 batches of 57: one shape, compiled once
    res = trainer.fit([world.store], tmp_path / "run", student="lenet", epochs=1, compile=True, batch_size=57,
                      warmup_epochs=0.2, num_workers=0)
    assert res.final["samples"] == 627 and res.final["agree"] > 0.3   # chance: 0.1
    assert set(load_checkpoint(res.checkpoint)["state_dict"]) == set(lenet().state_dict())  # no wrapper prefix


def test_compile_without_a_working_compiler_is_one_line(world: World, tmp_path: Path, monkeypatch):
    # A real failure: inductor's C++ compiler (its config, as CXX sets it) does not exist, and an empty
    # compile cache means nothing compiled earlier is reused.
    import torch._inductor.config

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-c++")))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    try:
        proc = invoke("trainer", "fit", "--store", str(world.store), "--out", str(tmp_path / "run"), "--compile",
                      "-j", "0", "--epochs", "1")
    finally:
        torch._dynamo.reset()
    assert_one_line_error(proc, "--compile: torch.compile cannot compile this student here", "C++ compiler",
                          "drop --compile")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()

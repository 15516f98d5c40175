"""--json on every command that reports: the same facts as its table, as one JSON document on stdout."""
from __future__ import annotations

import json

import pytest

from conftest import World, invoke

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def as_json(*args: str) -> dict:
    r = invoke(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_every_logitstore_command_speaks_json(tmp_path, corpus, teacher_ckpt):
    store = tmp_path / "s.zarr"
    d = as_json("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out", str(store),
                "--num-workers", "0")
    assert d["n_images"] == 120 and d["n_failed"] == 0 and d["views"] == 1 and d["images_per_s"] > 0
    assert as_json("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out",
                   str(store), "--num-workers", "0")["nothing_to_do"] is True
    v = as_json("logitstore", "verify", str(store))
    assert v["ok"] is True and v["rows"] == 120 and v["problems"] == []
    assert as_json("logitstore", "info", str(store))["images"] == 120
    c = as_json("logitstore", "copy", str(store), str(tmp_path / "c.zarr"))
    assert c["copied"] == c["keys"] > 0 and c["bytes_copied"] > 0
    assert as_json("logitstore", "pack", str(store), str(tmp_path / "p.zarr.zip"))["copied"] == c["keys"]
    m = as_json("logitstore", "merge", str(store), str(tmp_path / "c.zarr"), "-o", str(tmp_path / "m.zarr"),
                "--prefix", "a,b")
    assert m["rows"] == 240 and [s["rows"] for s in m["sources"]] == [120, 120]
    s = as_json("logitstore", "select", str(store), "-o", str(tmp_path / "sel.zarr"), "--limit", "30")
    assert s["rows_in"] == 120 and s["rows_out"] == 30 and sum(s["per_class"].values()) == 30


def test_fit_and_eval_speak_json(world: World, tmp_path):
    f = as_json("trainer", "fit", "--store", str(world.store), "--out", str(tmp_path / "r"), "--epochs", "1",
                "--num-workers", "0", "--cache-images", "0")
    assert len(f["history"]) == 1 and f["history"][0]["epoch"] == 1 and f["checkpoint"].endswith("checkpoint.pt")
    e = as_json("trainer", "eval", "--checkpoint", f["checkpoint"], "--images", str(world.labeled))
    assert 0 <= e["top1"] <= e["top5"] <= 1 and e["n"] == 300

"""A shared checkpoint runs no code: architectures named in files resolve only where the user trusts them,
and hostile or damaged model files are one line each (docs/FORMAT.md, "Teacher files")."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import logitstore
from logitstore.arch import BUILTIN_FACTORIES, build_model
from logitstore.errors import ArchitectureError, UntrustedCodeError

from conftest import CLASSES, MNIST_PRE, assert_one_line_error, invoke, run_cli, save_teacher
from nets import tiny_cnn

UNTRUSTED = {"LOGITSTORE_TRUST_MODULES": None}


def hostile_checkpoint(path: Path, arch: str, arch_kwargs: dict) -> Path:
    torch.save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": tiny_cnn().state_dict(), "classes": CLASSES,
                "preprocess": MNIST_PRE}, path)
    return path


def hostile_cases(tmp: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (checkpoint, canary file that exists only if the checkpoint ran code)."""
    cases = {}
    for name, arch, make in [
        ("os_system", "os:system", lambda c: {"command": f"touch {c}"}),
        ("subprocess_run", "subprocess:run", lambda c: {"args": f"touch {c}", "shell": True}),
        ("builtins_exec", "builtins:exec", lambda c: {"source": f"open({str(c)!r}, 'w').close()"}),
        ("import_module", "importlib:import_module", lambda c: {"name": "this"}),
        ("untrusted_module", "nets:tiny_cnn", lambda c: {}),
    ]:
        canary = tmp / f"PWNED-{name}"
        cases[name] = (hostile_checkpoint(tmp / f"{name}.pt", arch, make(canary)), canary)
    return cases


@pytest.fixture(scope="module")
def trusted_store(tmp_path_factory, corpus, teacher_ckpt) -> Path:
    out = tmp_path_factory.mktemp("trust") / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, trust_modules=["nets"])
    return out


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, mnist) -> Path:
    from conftest import write_pngs

    root = tmp_path_factory.mktemp("labeled")
    write_pngs(mnist["test_images"][:20], root, mnist["test_labels"][:20])
    return root


def test_every_loading_path_refuses_code_named_in_a_file(tmp_path, corpus, trusted_store, labeled, monkeypatch):
    monkeypatch.delenv("LOGITSTORE_TRUST_MODULES")
    for name, (ckpt, canary) in hostile_cases(tmp_path).items():
        module = torch.load(ckpt, weights_only=True)["arch"].split(":")[0]
        runs = {  # a real process for the dump; the other paths in this process (same command line)
            "dump": run_cli("logitstore", "dump", "--teacher", str(ckpt), "--images", str(corpus), "--out",
                            str(tmp_path / f"{name}.zarr"), "--quiet", check=False, env=UNTRUSTED),
            "add-teacher": invoke("logitstore", "dump", "--add-teacher", "--teacher", str(ckpt), "--out",
                                  str(trusted_store), "--teacher-name", "evil", "--quiet", "--num-workers", "0"),
            "eval": invoke("trainer", "eval", "--checkpoint", str(ckpt), "--images", str(labeled)),
        }
        for path, proc in runs.items():
            assert_one_line_error(proc, "not trusted", f"--trust-module {module}")
            assert not canary.exists(), f"{name} through {path} ran code"
        assert not (tmp_path / f"{name}.zarr").exists()
    assert "evil" not in logitstore.open_store(trusted_store).teacher_names


def test_nothing_is_imported_before_the_decision(tmp_path, corpus):
    import sys

    ckpt = hostile_checkpoint(tmp_path / "t.pt", "antigravity:geohash", {})
    with pytest.raises(UntrustedCodeError):
        logitstore.dump(str(ckpt), str(corpus), str(tmp_path / "o.zarr"), num_workers=0)
    assert "antigravity" not in sys.modules


def test_trusted_module_by_flag_or_environment_loads(tmp_path, corpus):
    ckpt = save_teacher(tmp_path / "t.pt")
    by_flag = run_cli("logitstore", "dump", "--teacher", str(ckpt), "--images", str(corpus), "--out",
                      str(tmp_path / "a.zarr"), "--quiet", "--trust-module", "nets", env=UNTRUSTED)
    by_env = run_cli("logitstore", "dump", "--teacher", str(ckpt), "--images", str(corpus), "--out",
                     str(tmp_path / "b.zarr"), "--quiet", env={"LOGITSTORE_TRUST_MODULES": "os,nets"})
    assert by_flag.returncode == by_env.returncode == 0
    a, b = logitstore.open_store(tmp_path / "a.zarr"), logitstore.open_store(tmp_path / "b.zarr")
    assert a.meta.fingerprints["contents"] == b.meta.fingerprints["contents"] and len(a) == 120


def test_an_architecture_typed_by_the_user_is_trusted(tmp_path, corpus):
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(tiny_cnn().state_dict(), weights)
    run_cli("logitstore", "dump", "--teacher", "nets:tiny_cnn", "--weights", str(weights), "--images", str(corpus),
            "--out", str(tmp_path / "t.zarr"), "--size", "28", "--mode", "L", "--quiet", env=UNTRUSTED)
    assert logitstore.open_store(tmp_path / "t.zarr").meta.teacher.source == "factory"


def test_registries_and_builtin_students_need_no_trust(tmp_path):
    import trainer.students

    assert set(BUILTIN_FACTORIES["trainer.students"]) == set(trainer.students.BUILTIN)
    lenet = build_model("trainer.students:lenet", {"num_classes": 10, "in_channels": 1}, trust_modules=())
    resnet = build_model("torchvision:resnet18", {"num_classes": 3})
    assert isinstance(lenet, torch.nn.Module) and resnet.fc.out_features == 3
    with pytest.raises(UntrustedCodeError):  # a built-in module's other callables are not factories
        build_model("trainer.students:parse_student_kwargs", {"text": "{}"})
    with pytest.raises(ArchitectureError, match="no classification model"):
        build_model("torchvision:os")


def test_a_file_cannot_name_a_hugging_face_directory(tmp_path, corpus, labeled, monkeypatch):
    """hf:DIR is a registry a user types; a directory's config may ask for remote code (auto_map), so a
    checkpoint that names one is refused on the name, before the directory is read or anything imported."""
    monkeypatch.delenv("LOGITSTORE_TRUST_MODULES")
    canary = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text('{"model_type": "vit", "auto_map": {"AutoModelForImageClassification": '
                                      '"evil_model.EvilModel"}}')
    (evil / "evil_model.py").write_text(f"open({str(canary)!r}, 'w').close()\n")
    ckpt = hostile_checkpoint(tmp_path / "t.pt", f"hf:{evil}", {"trust_remote_code": True})
    for proc in (invoke("logitstore", "dump", "--teacher", str(ckpt), "--images", str(corpus), "--out",
                        str(tmp_path / "o.zarr"), "--quiet", "--num-workers", "0"),
                 invoke("logitstore", "teacher", str(ckpt)),
                 invoke("trainer", "eval", "--checkpoint", str(ckpt), "--images", str(labeled))):
        assert_one_line_error(proc, "Hugging Face model directory", "nothing was read or run")
    with pytest.raises(UntrustedCodeError):
        build_model(f"hf:{evil}", {}, trust_modules=["hf", "evil_model"])
    assert not canary.exists() and not (tmp_path / "o.zarr").exists()


def test_a_trusted_factory_must_return_a_network(tmp_path, corpus):
    ckpt = hostile_checkpoint(tmp_path / "t.pt", "nets:not_a_network", {})
    proc = invoke("logitstore", "dump", "--teacher", str(ckpt), "--images", str(corpus), "--out",
                  str(tmp_path / "o.zarr"), "--trust-module", "nets", "--num-workers", "0")
    assert_one_line_error(proc, "not an nn.Module")


def test_a_trusted_module_lends_only_its_own_factories(tmp_path):
    # nets imports nn from torch: a file naming nets:nn would reach a module nets merely imported
    with pytest.raises((UntrustedCodeError, ArchitectureError)):
        build_model("nets:nn", {}, trust_modules=["nets"])


def _torchscript(path: Path) -> Path:
    torch.jit.save(torch.jit.script(tiny_cnn()), str(path))
    return path


def _zip_bomb(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\0" * (200 << 20))  # 200 MiB of zeros in ~200 KiB
    return path


@pytest.mark.parametrize("kind", ["empty.pt", "truncated.pt", "garbage.pt", "garbage.pt2", "truncated-script.pt",
                                  "bomb.pt", "huge-size.pt", "classes-dict.pt"])
def test_damaged_and_hostile_model_files_are_one_line(tmp_path, corpus, kind):
    good = save_teacher(tmp_path / "good.pt")
    path = tmp_path / kind
    if kind == "empty.pt":
        path.write_bytes(b"")
    elif kind == "truncated.pt":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind.startswith("garbage"):
        path.write_bytes(b"\x80\x02not a checkpoint" * 64)
    elif kind == "truncated-script.pt":
        data = _torchscript(tmp_path / "script.pt").read_bytes()
        path.write_bytes(data[: len(data) - 200])
    elif kind == "bomb.pt":
        _zip_bomb(path)
    elif kind == "huge-size.pt":
        torch.save({"arch": "nets:tiny_cnn", "state_dict": tiny_cnn().state_dict(), "classes": CLASSES,
                    "preprocess": {**MNIST_PRE, "size": [100000, 100000]}}, path)
    elif kind == "classes-dict.pt":
        torch.save({"arch": "nets:tiny_cnn", "state_dict": tiny_cnn().state_dict(), "classes": {"a": 1},
                    "preprocess": MNIST_PRE}, path)
    proc = invoke("logitstore", "dump", "--teacher", str(path), "--images", str(corpus), "--out",
                  str(tmp_path / "o.zarr"), "--quiet", "--num-workers", "0")
    assert_one_line_error(proc, kind)
    assert not (tmp_path / "o.zarr").exists()


def test_zip_bomb_checkpoint_is_refused_by_the_trainer_too(tmp_path, labeled):
    proc = invoke("trainer", "eval", "--checkpoint", str(_zip_bomb(tmp_path / "b.pt")), "--images", str(labeled))
    assert_one_line_error(proc, "zip bomb")


def test_absurd_numeric_flags_are_one_line(tmp_path, corpus, teacher_ckpt):
    for flags in (["--num-workers", "-1"], ["--views", "0"], ["--flip-prob", "7"], ["--batch-size", "0"],
                  ["--size", "100000"], ["--mean", "nan"], ["--sample-temperature", "inf", "--sample", "2"]):
        proc = invoke("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out",
                      str(tmp_path / "o.zarr"), *flags)
        assert_one_line_error(proc, flags[0])
    assert not (tmp_path / "o.zarr").exists()


def test_a_student_of_a_user_module_teaches_the_next_round_once_trusted(tmp_path, corpus, trusted_store, labeled,
                                                                       monkeypatch):
    import trainer

    run = tmp_path / "run"
    trainer.fit([str(trusted_store)], run, student="nets:tiny_cnn", epochs=1, batch_size=32, num_workers=0,
                cache_images=0)  # a student the user typed: trusted by that act
    ckpt = run / "checkpoint.pt"
    monkeypatch.delenv("LOGITSTORE_TRUST_MODULES")
    assert_one_line_error(invoke("trainer", "eval", "--checkpoint", str(ckpt), "--images", str(labeled)),
                          "--trust-module nets")
    ok = invoke("trainer", "eval", "--checkpoint", str(ckpt), "--images", str(labeled), "--trust-module", "nets",
                "--json")
    assert ok.returncode == 0, ok.stderr
    assert 0 <= __import__("json").loads(ok.stdout)["top1"] <= 1
    out = tmp_path / "next.zarr"
    assert invoke("logitstore", "dump", "--teacher", str(ckpt), "--images", str(corpus), "--out", str(out),
                  "--trust-module", "nets", "--num-workers", "0", "--quiet").returncode == 0
    assert logitstore.open_store(out).meta.teacher.arch == "nets:tiny_cnn"


def test_a_file_cannot_make_a_registry_builder_load_files_of_its_choosing(tmp_path):
    import timm  # noqa: F401  (installed with the test extra)

    with pytest.raises(UntrustedCodeError, match="checkpoint_path"):
        build_model("timm:resnet18", {"checkpoint_path": str(tmp_path / "evil.pth"), "num_classes": 3})
    with pytest.raises(UntrustedCodeError, match="weights_backbone"):
        build_model("torchvision:resnet18", {"weights_backbone": "DEFAULT"})
    with pytest.raises(ArchitectureError, match="classification"):  # detectors fetch backbone weights
        build_model("torchvision:fasterrcnn_resnet50_fpn", {})
    assert build_model("timm:resnet18", {"num_classes": 3, "drop_path_rate": 0.1}).num_classes == 3

"""Nothing is lost: a tool writes or replaces only what is its own, a re-run of a finished job has nothing
to do, an interrupted write's leftovers are harmless, and an edited zarr.json is refused (docs/FORMAT.md,
"Writing and resuming", R3, R4, R7)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import logitstore
from logitstore.errors import DestinationError, FormatError

from conftest import REPO, TESTS, assert_one_line_error, invoke, run_cli


@pytest.fixture(scope="module")
def store(tmp_path_factory, corpus, teacher_ckpt) -> Path:
    out = tmp_path_factory.mktemp("safety") / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(out), num_workers=0, chunk_rows=32)
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def dump_cli(teacher: Path, corpus: Path, out: str, *flags: str):
    return invoke("logitstore", "dump", "--teacher", str(teacher), "--images", str(corpus), "--out", out,
                  "--quiet", "--num-workers", "0", *flags)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_of_user_files_keeps_every_byte(tmp_path, corpus, teacher_ckpt, store, overwrite):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "precious.txt").write_text("keep")
    (d / "sub" / "notes.md").write_text("mine")
    before = snapshot(d)
    for proc in (dump_cli(teacher_ckpt, corpus, str(d), *overwrite),
                 invoke("logitstore", "select", str(store), "-o", str(d), "--limit", "5", *overwrite),
                 invoke("logitstore", "merge", str(store), str(store), "-o", str(d), "--prefix", "a,b", *overwrite),
                 invoke("logitstore", "copy", str(store), str(d), *overwrite)):
        assert_one_line_error(proc, "not a logitstore store", "nothing was changed")
    assert snapshot(d) == before


def test_the_corpus_the_current_directory_and_empty_paths_are_refused(tmp_path, corpus, teacher_ckpt,
                                                                         monkeypatch):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(corpus / "part0", data / "images")
    monkeypatch.chdir(tmp_path / "data")
    before = snapshot(tmp_path)
    images = data / "images"
    cases = {str(images): "overlaps", str(images / "x.zarr"): "overlaps", str(data): "current directory",
             str(tmp_path): "current directory", "": "empty", ".": "current directory", "/": "root"}
    for out, needle in cases.items():
        assert_one_line_error(dump_cli(teacher_ckpt, images, out, "--overwrite"), needle)
    monkeypatch.chdir(REPO)  # the corpus inside the destination, which is not the current directory
    assert_one_line_error(dump_cli(teacher_ckpt, images, str(data), "--overwrite"), "overlaps")
    assert snapshot(tmp_path) == before


def test_library_refuses_a_foreign_folder_too(tmp_path, corpus, teacher_ckpt):
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.txt").write_text("x")
    with pytest.raises(DestinationError):
        logitstore.dump(str(teacher_ckpt), str(corpus), str(d), overwrite=True, num_workers=0)
    assert (d / "x.txt").read_text() == "x"


def test_rerunning_a_finished_command_has_nothing_to_do(tmp_path, corpus, teacher_ckpt, store):
    out = tmp_path / "a.zarr"
    assert dump_cli(teacher_ckpt, corpus, str(out)).returncode == 0
    before = snapshot(out)
    again = dump_cli(teacher_ckpt, corpus, str(out))
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr
    assert snapshot(out) == before
    assert_one_line_error(dump_cli(teacher_ckpt, corpus, str(out), "--seed", "1", "--views", "2"), "--overwrite",
                          "different recipe")
    for cmd in (["copy", str(store), str(tmp_path / "c.zarr")], ["pack", str(store), str(tmp_path / "p.zarr.zip")],
                ["select", str(store), "-o", str(tmp_path / "sel.zarr"), "--limit", "7"]):
        first = run_cli("logitstore", *cmd)
        target = Path(cmd[-1] if cmd[0] != "select" else cmd[3])
        made = snapshot(target) if target.is_dir() else target.read_bytes()
        second = run_cli("logitstore", *cmd)
        assert first.returncode == second.returncode == 0
        assert (snapshot(target) if target.is_dir() else target.read_bytes()) == made
    other = invoke("logitstore", "select", str(store), "-o", str(tmp_path / "sel.zarr"), "--limit", "8")
    assert_one_line_error(other, "--overwrite")
    pack_over_file = tmp_path / "notes.zip"
    pack_over_file.write_bytes(b"not a zip")
    assert_one_line_error(invoke("logitstore", "pack", str(store), str(pack_over_file), "--overwrite"),
                          "not a packed logitstore store")
    assert pack_over_file.read_bytes() == b"not a zip"


def test_temporary_leftovers_are_ignored_reported_and_cleaned(tmp_path, store):
    # exactly what zarr's LocalStore leaves when a write is killed before its rename
    copy = tmp_path / "c.zarr"
    run_cli("logitstore", "copy", str(store), str(copy))
    stray = copy / "logits" / "c" / "0" / "0" / ("0." + "ab" * 16 + ".partial")
    stray.write_bytes(b"half a chunk")
    v = run_cli("logitstore", "verify", str(copy))
    assert v.returncode == 0 and "OK" in v.stdout and "temporary file" in v.stderr
    run_cli("logitstore", "copy", str(copy), str(tmp_path / "again.zarr"))
    run_cli("logitstore", "pack", str(copy), str(tmp_path / "again.zarr.zip"))
    assert not list((tmp_path / "again.zarr").rglob("*.partial"))
    assert logitstore.open_store(tmp_path / "again.zarr.zip").meta.fingerprints == \
        logitstore.open_store(store).meta.fingerprints


def test_a_killed_copy_is_finished_by_the_same_command(tmp_path, store):
    dst = tmp_path / "k.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.Popen([sys.executable, "-m", "logitstore", "copy", str(store), str(dst)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (dst / "zarr.json").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (dst / "ids").mkdir(parents=True, exist_ok=True)
    (dst / "ids" / ("zarr.json." + "cd" * 16 + ".partial")).write_bytes(b"{")  # a write cut short
    run_cli("logitstore", "copy", str(store), str(dst))
    assert not list(dst.rglob("*.partial"))
    assert snapshot(dst) == snapshot(store)


def _edit_root(path: Path, edit) -> None:
    doc = json.loads((path / "zarr.json").read_text())
    edit(doc["attributes"]["logitstore"])
    (path / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("edit", [
    lambda m: m["preprocess"].__setitem__("mean", [0.5]),
    lambda m: m["classes"].__setitem__(3, "three"),
    lambda m: m["teacher"].__setitem__("sha256", "0" * 64),
    lambda m: m["corpus"].__setitem__("n_failed", 3),
    lambda m: m["fingerprints"].__setitem__("teacher", "sha256:" + "0" * 64),
    lambda m: m["fingerprints"].pop("metadata"),
], ids=["mean", "class-name", "teacher-sha", "counts", "teacher-fingerprint", "checksum-removed"])
def test_edited_metadata_is_refused_by_every_reader(tmp_path, store, edit):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    _edit_root(bad, edit)
    with pytest.raises(FormatError, match="R4"):
        logitstore.open_store(bad)
    for cmd in (["logitstore", "info", str(bad)], ["logitstore", "verify", str(bad)],
                ["trainer", "fit", "--store", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1"]):
        assert_one_line_error(invoke(*cmd), "R4")


@pytest.mark.parametrize("value", ["false", "true", 1, None])
def test_complete_must_be_a_boolean(tmp_path, store, value):
    import shutil

    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    _edit_root(bad, lambda m: m.__setitem__("complete", value))
    assert_one_line_error(invoke("logitstore", "info", str(bad)), "complete", "true or false")


def test_a_packed_store_with_compressed_entries_is_refused(tmp_path, store):
    bomb = tmp_path / "bomb.zarr.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(store.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(store).as_posix())
        zf.writestr("logits/c/9/0/0", b"\0" * (32 << 20))
    assert_one_line_error(invoke("logitstore", "info", str(bomb)), "compressed")


def test_a_deleted_chunk_is_a_hole_every_reader_refuses(tmp_path, store):
    import shutil

    bad = tmp_path / "holed.zarr"
    shutil.copytree(store, bad)
    (bad / "logits" / "c" / "1" / "0" / "0").unlink()
    with pytest.raises(FormatError, match=r"'logits' chunk 1 \(rows 32-63.*missing.*R5"):
        logitstore.open_store(bad)
    for cmd in (["logitstore", "info", str(bad)], ["logitstore", "verify", str(bad)],
                ["logitstore", "copy", str(bad), str(tmp_path / "c.zarr")],
                ["trainer", "fit", "--store", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1"]):
        assert_one_line_error(invoke(*cmd), "chunk 1", "missing")
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.zarr").exists()


def test_non_finite_logits_written_with_valid_checksums_stop_every_reader(tmp_path, store):
    import shutil

    import numpy as np
    import zarr

    bad = tmp_path / "nan.zarr"
    shutil.copytree(store, bad)
    logits = zarr.open_array(str(bad / "logits"), mode="r+")
    row = logits[40]
    row[0, 3] = np.nan
    logits[40] = row  # through zarr: the chunk's CRC32C is valid
    st = logitstore.open_store(bad)
    with pytest.raises(logitstore.IntegrityError, match=r"'logits' holds NaN or inf at row 40 \(chunk 1"):
        st.read(32, 64)
    assert np.isfinite(st.read(0, 32).logits.astype(np.float32)).all()  # the other chunks still read
    fit = invoke("trainer", "fit", "--store", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--num-workers", "0", "--cache-images", "0")
    assert_one_line_error(fit, "row 40", "NaN or inf")
    verify = invoke("logitstore", "verify", str(bad))
    assert verify.returncode == 1 and "NaN or inf" in verify.stderr


@pytest.mark.parametrize("moved", ["digests", "a count of 2^32 - 1"])
def test_a_chunk_moved_into_the_ids_is_refused_before_it_is_decoded(tmp_path, store, moved):
    """A vlen-utf8 chunk starts with its item count: a chunk of another array moved in (its CRC32C holds), or
    a count written wrong, is refused by that count, not after allocating that many strings (tens of GB)."""
    import shutil
    import struct

    import numcodecs

    from logitstore.chunk_io import with_crc32c

    bad = tmp_path / "moved.zarr"
    shutil.copytree(store, bad)
    target = bad / "ids" / "c" / "1"
    if moved == "digests":
        target.write_bytes((bad / "digests" / "c" / "0" / "0").read_bytes())
    else:
        packed = struct.pack("<I", 2 ** 32 - 1) + struct.pack("<I", 3) + b"abc"
        target.write_bytes(with_crc32c(numcodecs.Zstd(level=3).encode(packed)).tobytes())
    held = int.from_bytes(numcodecs.Zstd().decode(target.read_bytes()[:-4])[:4], "little")
    assert held not in (32, 0)
    st = logitstore.open_store(bad)
    with pytest.raises(logitstore.IntegrityError,
                       match=rf"'ids' rows 32-63 do not decode .*chunk 1 \('ids/c/1'\) holds {held} strings, not its "
                             r"32 rows.*chunks were moved"):
        st.read_array("ids", 32, 64)
    good = logitstore.open_store(store)
    assert list(st.read_array("ids", 0, 32)) == list(good.read_array("ids", 0, 32))  # the other chunks still read
    assert list(st.read_array("ids", 64, len(st))) == list(good.read_array("ids", 64, len(good)))
    verify = invoke("logitstore", "verify", str(bad))
    assert verify.returncode == 1 and f"holds {held} strings" in verify.stderr, verify.stderr
    fit = invoke("trainer", "fit", "--store", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--num-workers", "0", "--cache-images", "0")
    assert_one_line_error(fit, "'ids'", "chunk 1", f"holds {held} strings")


def test_derived_stores_are_made_only_of_rows_that_pass_verify(tmp_path, store):
    """A logits chunk rewritten through zarr (valid CRC32C, finite values) fails verify by its 1.4 record:
    select and merge refuse to copy it, naming the chunk; a missing records chunk is a hole every reader refuses."""
    import shutil

    import zarr

    bad = tmp_path / "altered.zarr"
    shutil.copytree(store, bad)
    logits = zarr.open_array(str(bad / "logits"), mode="r+")
    row = logits[40]
    row[0, 3] += 1
    logits[40] = row
    words = ("'logits' chunk 1 (rows 32-63) differs from its record", "restore it from its source")
    assert invoke("logitstore", "verify", str(bad)).returncode == 1
    assert_one_line_error(invoke("logitstore", "select", str(bad), "-o", str(tmp_path / "s.zarr"), "--limit", "100"),
                          *words)
    assert_one_line_error(invoke("logitstore", "merge", str(store), str(bad), "-o", str(tmp_path / "m.zarr"),
                                 "--prefix", "a,b"), *words)
    ok = invoke("logitstore", "select", str(store), "-o", str(tmp_path / "ok.zarr"), "--limit", "100")
    assert ok.returncode == 0 and invoke("logitstore", "verify", str(tmp_path / "ok.zarr")).returncode == 0
    holed = tmp_path / "holed.zarr"
    shutil.copytree(store, holed)
    (holed / "chunk_sha256" / "c" / "0" / "0" / "0").unlink()
    for cmd in (["verify", str(holed)], ["copy", str(holed), str(tmp_path / "c.zarr")],
                ["merge", str(holed), str(store), "-o", str(tmp_path / "m2.zarr"), "--prefix", "a,b"]):
        assert_one_line_error(invoke("logitstore", *cmd), "'chunk_sha256' chunk 0", "is missing")


@pytest.fixture
def small_disk(tmp_path):
    """A real file system that fills up: a tmpfs of 96 KiB (root can mount one; CI runs as root)."""
    where = tmp_path / "disk"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_is_one_line_and_the_same_command_resumes(tmp_path, corpus, teacher_ckpt, small_disk):
    out = small_disk / "s.zarr"
    args = ("--embed-images", "--chunk-rows", "16", "--batch-size", "8")
    full = run_cli("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out", str(out),
                   "--quiet", "--num-workers", "0", *args, check=False)
    assert_one_line_error(full, "a write failed", "No space left", "run the same command again")
    with pytest.raises(logitstore.StoreStateError, match="incomplete"):
        logitstore.open_store(out)
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    run_cli("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(corpus), "--out", str(out),
            "--quiet", "--num-workers", "0", *args)
    ref = tmp_path / "ref.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(ref), num_workers=0, embed_images=True, chunk_rows=16,
                    batch_size=8)
    assert logitstore.open_store(out).meta.fingerprints == logitstore.open_store(ref).meta.fingerprints


def test_corpora_that_bite_never_hang(tmp_path, corpus, teacher_ckpt):
    import shutil

    root = tmp_path / "bite"
    shutil.copytree(corpus / "part0", root / "a")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)   # a cycle
    (root / "b").symlink_to(root / "a", target_is_directory=True)      # an alias, whose loop/ is a second cycle
    os.mkfifo(root / "pipe.png")                                         # reading it would block forever
    (root / "folder.png").mkdir()
    (root / "folder.png" / "x.txt").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{root / 'a' / 'img00000.png'}\n{root / 'pipe.png'}\n")
    dumped = logitstore.dump(str(teacher_ckpt), str(root), str(tmp_path / "d.zarr"), num_workers=0)
    # a/ and its alias b/ (a link is a folder, as os.walk(followlinks=True) lists it); the loops back to
    # the root are not followed, the FIFO is not read
    assert dumped.n_images == 80 and dumped.n_failed == 0
    ids = list(logitstore.open_store(tmp_path / "d.zarr").read(0, 80).ids)
    assert sum(i.startswith("a/") for i in ids) == sum(i.startswith("b/") for i in ids) == 40
    listed = run_cli("logitstore", "dump", "--teacher", str(teacher_ckpt), "--images", str(listing), "--out",
                     str(tmp_path / "l.zarr"), "--quiet", "--num-workers", "0", timeout=120)
    st = logitstore.open_store(tmp_path / "l.zarr")
    assert listed.returncode == 0 and len(st) == 1
    assert st.failures()[0][0].endswith("pipe.png") and "not a regular file" in st.failures()[0][1]


def test_two_writers_never_share_a_store(tmp_path, corpus):
    from conftest import save_teacher

    slow = save_teacher(tmp_path / "slow.pt", arch="nets:slow_cnn", seconds=0.3)
    out = tmp_path / "s.zarr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    first = subprocess.Popen([sys.executable, "-m", "logitstore", "dump", "--teacher", str(slow), "--images",
                              str(corpus), "--out", str(out), "--quiet", "--num-workers", "0", "--batch-size", "8"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "zarr.json").exists():
        time.sleep(0.05)
    second = invoke("logitstore", "dump", "--teacher", str(slow), "--images", str(corpus), "--out", str(out),
                    "--quiet", "--num-workers", "0", "--batch-size", "8", "--overwrite")
    assert_one_line_error(second, "is in use by process")
    assert first.wait(timeout=300) == 0, first.stderr
    assert len(logitstore.open_store(out)) == 120
    again = invoke("logitstore", "dump", "--teacher", str(slow), "--images", str(corpus), "--out", str(out),
                   "--quiet", "--num-workers", "0", "--batch-size", "8")
    assert again.returncode == 0 and "nothing to do" in again.stdout  # the lock went with its writer


def test_a_store_a_fit_is_reading_is_not_replaced_under_it(tmp_path, world):
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(world.store, store)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    fit = subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--store", str(store), "--out", str(tmp_path / "run"),
                            "--epochs", "40", "--num-workers", "0", "--quiet"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "metrics.jsonl").exists():
            time.sleep(0.1)
        before = snapshot(store)
        refused = invoke("logitstore", "dump", "--teacher", str(world.teacher), "--images", str(world.corpus),
                         "--out", str(store), "--overwrite", "--quiet", "--num-workers", "0")
        assert_one_line_error(refused, "in use by")
        assert snapshot(store) == before
    finally:
        fit.kill()
        fit.wait()

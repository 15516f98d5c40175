"""`logitstore card`: a self-contained HTML page, checked in a real headless browser (Debian's chromium).

The page must load with nothing fetched, show every plot and the contact sheet, carry exactly the
numbers `info()` reports, and show a hostile class name as text.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import logitstore
from logitstore.tools.card import write_card
from logitstore.tools.inspect_store import info

from conftest import assert_one_line_error, invoke, run_cli, save_teacher

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE = "<script>alert(1)</script>"
CLASSES = [HOSTILE, "a & b", '"quoted"', r"$\frac$", "4", "5", "6", "7", "8", "9"]  # mathtext that cannot parse


@pytest.fixture(scope="module")
def browser():
    """Headless chromium driven by selenium; never downloads a browser. Missing: the test fails."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install chromium chromium-driver (see .ci/run)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def hostile_store(tmp_path_factory, corpus, teacher_ckpt) -> tuple[Path, Path]:
    """40 images and one broken file, class names that are HTML."""
    root = tmp_path_factory.mktemp("card")
    images = root / "images"
    for p in sorted(corpus.rglob("*.png"))[:40]:
        dst = images / p.relative_to(corpus)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)
    (images / "part0" / "broken.png").write_bytes(b"\x89PNG broken")
    out = root / "s.zarr"
    logitstore.dump(str(teacher_ckpt), str(images), str(out), num_workers=0, chunk_rows=16, classes=CLASSES)
    return out, images


def load(browser, page: Path) -> dict:
    """Open the card as file:// and collect what the page shows."""
    browser.get(page.as_uri())
    return browser.execute_script("""
        const imgs = Array.from(document.images);
        return {
          images: imgs.map(i => ({id: i.id, width: i.naturalWidth, complete: i.complete, src: i.src.slice(0, 22)})),
          numbers: Array.from(document.querySelectorAll('[data-key]')).map(e => [e.dataset.key, e.textContent]),
          scripts: document.scripts.length,
          links: document.querySelectorAll('link, iframe, object, embed').length,
          cells: Array.from(document.querySelectorAll('td, th')).map(e => e.textContent),
          text: document.body.innerText,
        };""")


def shown_value(d: dict, key: str) -> float:
    """The info() value a card's `data-key` names."""
    head, _, rest = key.partition(".")
    if head in ("confidence_histogram", "entropy_histogram"):
        return d[head]["counts"][int(rest)]
    if head in ("class_histogram", "failures_by_reason"):
        return list(d[head].values())[int(rest)]
    if head == "teacher_agreement":
        return next(a["agreement"] for a in d[head] if a["name"] == rest)
    value = d[head]
    return value[rest] if rest else value


def assert_numbers_match(shown: list[list[str]], d: dict) -> set[str]:
    for key, text in shown:
        number = text.replace(",", "")
        decimals = len(number.split(".")[1]) if "." in number else 0
        assert float(number) == pytest.approx(shown_value(d, key), abs=0.5 * 10 ** -decimals), (key, text)
    return {key for key, _ in shown}


def assert_rendered(browser, page: Path, plots: int) -> dict:
    got = load(browser, page)
    assert len(got["images"]) == plots + 1  # and the contact sheet
    for img in got["images"]:
        assert img["complete"] and img["width"] > 0, img
        assert img["src"] == "data:image/png;base64,", img  # nothing fetched
    assert got["scripts"] == 0 and got["links"] == 0
    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("L"), dtype=np.float64)
    assert shot.std() > 10, "the page renders blank"
    sheet = browser.find_element("id", "contact-sheet")
    browser.execute_script("arguments[0].scrollIntoView()", sheet)
    pixels = np.asarray(Image.open(io.BytesIO(sheet.screenshot_as_png)).convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "the contact sheet renders blank"
    return got


def test_card_shows_infos_numbers_plots_and_hostile_names_as_text(browser, hostile_store, tmp_path):
    store, images = hostile_store
    page = tmp_path / "card.html"
    rep = write_card(str(store), page)
    assert rep.contact_sheet == "corpus" and rep.plots == ["top1_per_class", "confidence", "entropy",
                                                           "failures_by_reason"]
    d = info(logitstore.open_store(store))
    assert d["failed"] == 1 and sum(d["confidence_histogram"]["counts"]) == d["images"] == 40
    got = assert_rendered(browser, page, plots=4)
    keys = assert_numbers_match(got["numbers"], d)
    assert {"images", "failed", "views.count", "num_classes", "bytes_on_disk", "logits_compression_ratio",
            "confidence.mean", "entropy_nats.mean", "failures_by_reason.0"} <= keys
    assert {f"class_histogram.{k}" for k in range(10)} | {f"confidence_histogram.{k}" for k in range(20)} \
        | {f"entropy_histogram.{k}" for k in range(20)} <= keys
    assert {HOSTILE, "a & b", '"quoted"', r"$\frac$"} <= set(got["cells"])
    assert d["teacher"]["sha256"] in got["text"] and d["corpus"]["root"] in got["text"]
    raw = page.read_text()
    assert HOSTILE not in raw and "&lt;script&gt;alert(1)&lt;/script&gt;" in raw


def test_embedded_pixels_draw_the_contact_sheet_when_the_corpus_is_gone(browser, tmp_path, corpus, teacher_ckpt):
    images = Path(shutil.copytree(corpus, tmp_path / "gone"))
    store = tmp_path / "e.zarr"
    logitstore.dump(str(teacher_ckpt), str(images), str(store), num_workers=0, chunk_rows=32, embed_images=True)
    shutil.rmtree(images)
    page = tmp_path / "card.html"
    r = run_cli("logitstore", "card", str(store), "--out", str(page), "--json")
    assert json.loads(r.stdout)["contact_sheet"] == "embedded pixels"
    got = assert_rendered(browser, page, plots=3)
    assert_numbers_match(got["numbers"], info(logitstore.open_store(store)))
    assert "embedded in the store" in got["text"]


def test_an_ensemble_store_shows_each_teachers_agreement(browser, tmp_path, corpus, teacher_ckpt):
    from logitstore.teacher.add import add_teacher

    store = tmp_path / "ens.zarr"
    logitstore.dump(str(teacher_ckpt), str(corpus), str(store), num_workers=0, chunk_rows=32)
    add_teacher(str(store), str(teacher_ckpt), name="same", num_workers=0)
    add_teacher(str(store), str(save_teacher(tmp_path / "other.pt", seed=7)), name="other", num_workers=0)
    d = info(logitstore.open_store(store))
    assert [a["name"] for a in d["teacher_agreement"]] == ["same", "other"]
    assert d["teacher_agreement"][0]["agreement"] == 1.0 and d["teacher_agreement"][1]["agreement"] < 1.0
    page = tmp_path / "card.html"
    rep = write_card(str(store), page)
    assert rep.plots == ["top1_per_class", "confidence", "entropy", "teacher_agreement"]
    got = assert_rendered(browser, page, plots=4)
    keys = assert_numbers_match(got["numbers"], d)
    assert {"teacher_agreement.same", "teacher_agreement.other"} <= keys


def test_card_refuses_an_existing_file_unless_overwrite(tmp_path, hostile_store):
    store, _ = hostile_store
    page = tmp_path / "notes.html"
    page.write_text("my notes")
    assert_one_line_error(invoke("logitstore", "card", str(store), "--out", str(page)), str(page), "--overwrite")
    assert page.read_text() == "my notes"
    r = invoke("logitstore", "card", str(store), "--out", str(page), "--overwrite")
    assert r.returncode == 0 and "wrote" in r.stdout and page.read_text().startswith("<!DOCTYPE html>")

"""`logitstore card`: one self-contained HTML page to publish beside a shared store.

What the teacher is, what corpus it ran over, the counts, plots of its predictions and a contact
sheet. Every number comes from `info(store)`; every plot is an inline PNG (data: URI), the CSS is
inline, and nothing is fetched when the page is opened. Everything read from the store (class
names, ids, failure reasons, paths) is HTML-escaped: a store is untrusted input.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..errors import DestinationError
from ..store import LogitStore, open_store
from .inspect_store import info as store_info
from .show import contact_sheet, corpus_location, literal

MAX_BARS = 40  # classes drawn in the top-1 plot; a 1000-class teacher gets its most predicted ones

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
code, .mono { font-family: ui-monospace, monospace; font-size: 0.92em; overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; } .plots img { width: 48%; min-width: 320px; vertical-align: top; }
.note { color: #666; } .classes { column-width: 12em; }
"""


@dataclass
class CardReport:
    out: str
    store: str
    images: int
    plots: list[str] = field(default_factory=list)   # the plots drawn, in page order
    contact_sheet: str = "none"                      # "corpus", "embedded pixels" or "none"
    contact_sheet_note: str = ""
    bytes: int = 0


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    return Figure(figsize=(w, h), layout="constrained")


def _bars(labels: list[str], values: list[float], title: str, xlabel: str, fmt: str = "{:,}") -> str:
    fig = _figure(6.4, max(2.0, 0.6 + 0.24 * len(labels)))
    ax = fig.add_subplot()
    ys = list(range(len(labels)))
    ax.barh(ys, values, color="#4c72b0", height=0.7)
    ax.set_yticks(ys, [literal(lab if len(lab) <= 48 else lab[:47] + "…") for lab in labels], fontsize=8)
    ax.invert_yaxis()
    top = max(values) if values else 1
    for y, v in zip(ys, values):
        ax.text(v + 0.01 * top, y, fmt.format(v), va="center", fontsize=7)
    ax.set_xlim(0, top * 1.15 or 1)
    if fmt == "{:,}":
        ax.xaxis.get_major_locator().set_params(integer=True)  # image counts
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    return _png(fig)


def _histogram(h: dict[str, list], title: str, xlabel: str) -> str:
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    edges, counts = h["edges"], h["counts"]
    ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges, edges[1:])], align="edge", color="#55a868",
           edgecolor="white")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    return _png(fig)


def _rows(pairs: Iterable[tuple[str, Any]], key_prefix: str = "") -> str:
    """Table rows; a number gets `data-key` so it can be traced to (and checked against) info()."""
    out = []
    for label, value, *key in pairs:
        attr = f' class="n" data-key="{_e(key[0])}"' if key else ""
        out.append(f"<tr><th>{_e(label)}</th><td{attr}>{_e(value)}</td></tr>")
    return "\n".join(out)


def _num(x: float | int | None, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def _sheet(store: LogitStore, images: str | None,
           storage_options: dict[str, Any] | None) -> tuple[str | None, str, str]:
    """(PNG data URI or None, where its pictures came from, a note)."""
    recorded = store.meta.corpus.root
    where, corpus_there = corpus_location(store, images)
    if images is None and not corpus_there and not store.meta.embedded_pixels:
        return None, "none", (f"no contact sheet: the corpus is not at {recorded} (pass --images) and the store "
                              "embeds no pixels")
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "sheet.png"
        contact_sheet(store, images, png, per_class=6, max_classes=20, title=" ", storage_options=storage_options)
        data = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    if images is not None or corpus_there:
        return data, "corpus", f"images read from {where}, each checked against its stored digest"
    return data, "embedded pixels", "images are the pixels embedded in the store (the corpus is not here)"


def write_card(store: LogitStore | str, out: str | os.PathLike, *, images: str | None = None,
               overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> CardReport:
    """Write the store's card to `out` (an HTML file); refuses an existing file unless `overwrite`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DestinationError(f"--out {out} exists; nothing was changed; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise DestinationError(f"--out {out}: no folder {out.parent}; create it first or choose another path")
    if not isinstance(store, LogitStore):
        store = open_store(store, storage_options=storage_options)
    d = store_info(store)
    sheet, source, note = _sheet(store, images, storage_options)
    report = CardReport(out=str(out), store=store.location, images=d["images"], contact_sheet=source,
                        contact_sheet_note=note)

    plots: list[tuple[str, str, str]] = []  # (name, alt text, data URI)
    hist = sorted(d["class_histogram"].items(), key=lambda kv: -kv[1])[:MAX_BARS]
    more = f" (the {len(hist)} most predicted of {d['num_classes']})" if d["num_classes"] > len(hist) else ""
    plots.append(("top1_per_class", "teacher's top-1 class counts",
                  _bars([c for c, _ in hist], [n for _, n in hist], f"teacher's top-1 per class{more}", "images")))
    plots.append(("confidence", "confidence histogram",
                  _histogram(d["confidence_histogram"], "confidence (top-1 probability, first view)", "probability")))
    entropy_known = sum(d["entropy_histogram"]["counts"]) or not d["images"]
    unknown = "" if entropy_known else " (unknown: the store keeps sampled classes)"
    plots.append(("entropy", "entropy histogram",
                  _histogram(d["entropy_histogram"], f"entropy of the teacher's prediction (first view){unknown}",
                             "nats")))
    if d["teacher_agreement"]:
        plots.append(("teacher_agreement", "agreement of each added teacher with the primary",
                      _bars([a["name"] for a in d["teacher_agreement"]],
                            [a["agreement"] for a in d["teacher_agreement"]],
                            "top-1 agreement with the primary teacher", "fraction of images", "{:.3f}")))
    if d["failures_by_reason"]:
        reasons = sorted(d["failures_by_reason"].items(), key=lambda kv: -kv[1])[:MAX_BARS]
        plots.append(("failures_by_reason", "failures by reason",
                      _bars([r for r, _ in reasons], [n for _, n in reasons], "images that failed, by reason",
                            "images")))
    report.plots = [name for name, _, _ in plots]

    page = _render(d, plots, sheet, note)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)  # never a half-written card under the final name
    report.bytes = out.stat().st_size
    return report


def _render(d: dict[str, Any], plots: list[tuple[str, str, str]], sheet: str | None, note: str) -> str:
    t, c = d["teacher"], d["corpus"]
    title = f"{Path(str(d['location']).rstrip('/')).name or d['location']}: a logitstore cache"
    ratio = d["logits_compression_ratio"]
    counts = _rows([
        ("images (rows)", _num(d["images"]), "images"),
        ("listed in the corpus", _num(d["listed"]), "listed"),
        ("failed", _num(d["failed"]), "failed"),
        ("views per image", _num(d["views"]["count"]), "views.count"),
        ("classes", _num(d["num_classes"]), "num_classes"),
        ("bytes on disk", _num(d["bytes_on_disk"]), "bytes_on_disk"),
        ("bytes per image", _num(d["bytes_per_image"], 1), "bytes_per_image"),
        ("logits, raw bytes", _num(d["logits_raw_bytes"]), "logits_raw_bytes"),
        ("logits compression (x)", _num(ratio, 3), "logits_compression_ratio"),
        ("confidence: mean", _num(d["confidence"]["mean"]), "confidence.mean"),
        ("confidence: p10", _num(d["confidence"]["p10"]), "confidence.p10"),
        ("confidence: median", _num(d["confidence"]["median"]), "confidence.median"),
        ("confidence: p90", _num(d["confidence"]["p90"]), "confidence.p90"),
        ("entropy (nats): mean", _num(d["entropy_nats"]["mean"]), "entropy_nats.mean"),
        ("entropy (nats): median", _num(d["entropy_nats"]["median"]), "entropy_nats.median"),
        ("entropy (nats): largest possible", _num(d["entropy_nats"]["max_possible"]), "entropy_nats.max_possible"),
    ])
    teacher = _rows([
        ("architecture", t.get("arch")), ("source", t.get("source")), ("file", t.get("file")),
        ("weights sha256", t.get("sha256")), ("arch kwargs", json.dumps(t.get("arch_kwargs"), sort_keys=True)),
        ("precision the teacher ran in", d["precision"]), ("logits stored as", d["dtype"]),
        ("targets", "full logits" if d["targets"].get("kind") == "logits" else json.dumps(d["targets"], sort_keys=True)),
        ("preprocessing", json.dumps(d["preprocess"], sort_keys=True)),
        ("views", json.dumps(d["views"], sort_keys=True)),
        *[(f"fingerprint: {k}", v) for k, v in d["fingerprints"].items()],
    ])
    extra = "".join(f"<tr><td class='mono'>{_e(x['name'])}</td><td class='mono'>{_e(x['arch'])}</td>"
                    f"<td class='mono'>{_e(x.get('logits_sha256') or x.get('fingerprint') or '')}</td></tr>"
                    for x in d["teachers"][1:])
    agreement = "".join(f"<tr><th>{_e(a['name'])}</th><td class='n' data-key='teacher_agreement.{_e(a['name'])}'>"
                        f"{_num(a['agreement'])}</td></tr>" for a in d["teacher_agreement"])
    corpus = _rows([("root", c.get("root")), ("listing", c.get("listing")),
                    ("listing sha256", c.get("listing_sha256")),
                    ("listed", _num(c.get("n_listed")), "corpus.n_listed"),
                    ("images", _num(c.get("n_images")), "corpus.n_images"),
                    ("failed", _num(c.get("n_failed")), "corpus.n_failed")])
    classes = "".join(f"<tr><td class='mono'>{_e(name)}</td><td class='n' data-key='class_histogram.{_e(k)}'>"
                      f"{_num(n)}</td></tr>" for k, (name, n) in enumerate(d["class_histogram"].items()))
    ch, eh = d["confidence_histogram"], d["entropy_histogram"]
    hist_rows = "".join(
        f"<tr><td class='n'>{a:.3f} - {b:.3f}</td><td class='n' data-key='confidence_histogram.{k}'>{_num(n1)}</td>"
        f"<td class='n'>{e:.3f} - {f:.3f}</td><td class='n' data-key='entropy_histogram.{k}'>{_num(n2)}</td></tr>"
        for k, (a, b, n1, e, f, n2) in enumerate(zip(ch["edges"], ch["edges"][1:], ch["counts"],
                                                     eh["edges"], eh["edges"][1:], eh["counts"])))
    reasons = "".join(f"<tr><td class='mono'>{_e(r)}</td><td class='n' data-key='failures_by_reason.{k}'>{_num(n)}"
                      f"</td></tr>" for k, (r, n) in enumerate(d["failures_by_reason"].items()))
    failures = "".join(f"<li><span class='mono'>{_e(f['id'])}</span>: {_e(f['reason'])}</li>" for f in d["failures"])
    figures = "\n".join(f'<img id="plot-{_e(name)}" alt="{_e(alt)}" src="{uri}">' for name, alt, uri in plots)
    sheet_html = (f'<img id="contact-sheet" alt="contact sheet" src="{sheet}">' if sheet else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{_e(title)}</title><style>{CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class="note">Store <span class="mono">{_e(d['location'])}</span>, format {_e(d['format_version'])}
({'complete' if d['complete'] else 'INCOMPLETE'}), created {_e(d['created'])}. Written by <code>logitstore card</code>;
every number below is what <code>logitstore info</code> reports.</p>

<h2>Teacher</h2>
<table>{teacher}</table>
{f"<h3>Added teachers</h3><table><tr><th>name</th><th>architecture</th><th>logits sha256</th></tr>{extra}</table>"
 f"<table><tr><th>added teacher</th><th>top-1 agreement with the primary</th></tr>{agreement}</table>" if extra else ""}

<h2>Corpus</h2>
<table>{corpus}</table>

<h2>Counts</h2>
<table>{counts}</table>

<h2>Plots</h2>
<div class="plots">
{figures}
</div>

<h2>Classes (teacher's top-1, first view)</h2>
<table class="classes"><tr><th>class</th><th>images</th></tr>{classes}</table>
<details><summary>Histogram counts</summary>
<table><tr><th>confidence</th><th>images</th><th>entropy (nats)</th><th>images</th></tr>{hist_rows}</table>
</details>

<h2>Failures</h2>
{f"<table><tr><th>reason</th><th>images</th></tr>{reasons}</table><ul>{failures}</ul>" if reasons
 else "<p>No image failed.</p>"}

<h2>Contact sheet</h2>
<p class="note">{_e(note)}</p>
{sheet_html}
</body></html>
"""

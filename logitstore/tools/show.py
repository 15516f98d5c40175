"""`logitstore show`: see what the teacher saw, to judge whether an unlabeled corpus will teach.

One PNG: for each class the teacher predicts, a row of sample images (the exact input view the
teacher was given) with the teacher's confidence, next to the class histogram of its top-1
predictions over the whole store.
"""
from __future__ import annotations

import os
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..corpus import decode_image, sha256_bytes
from ..sources import images_root as _images_root, is_url, open_reader
from ..errors import CorpusError, IntegrityError, OptionError
from .inspect_store import predictions
from ..store import LogitStore, open_store
from .. import schema
from ..augment import mix_view, premix_views
from ..views import apply_view


@dataclass
class SheetSummary:
    out: Path
    images: int                      # rows of the store (first view of each)
    class_counts: dict[str, int]     # teacher's top-1 histogram, every class
    shown: dict[str, int]            # images drawn per class row
    classes_drawn: list[str]         # the row order


def _top1(store: LogitStore) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 class, its softmax probability at T=1) of every row's first view, chunk by chunk."""
    preds, confs = [], []
    for _, rows in store.iter_chunks():
        conf, _, top = predictions(rows, store.meta)
        preds.append(top)
        confs.append(conf)
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(preds), np.concatenate(confs)


def corpus_location(store: LogitStore, images: str | os.PathLike | None) -> tuple[str, bool]:
    """(the root a store's ids are under: `images` or the recorded one, whether it can be read here):
    a local folder that exists, or any URL (an object store is not probed before it is read)."""
    root = _images_root(images) if images is not None else store.meta.corpus.root
    return root, is_url(root) or Path(root).expanduser().is_dir()


def _rows_by_chunk(store: LogitStore, wanted: list[int]) -> dict[int, list[int]]:
    by_chunk: dict[int, list[int]] = {}
    for r in sorted(wanted):
        by_chunk.setdefault(r // store.chunk_rows, []).append(r)
    return by_chunk


def _teacher_views(store: LogitStore, root: str, wanted: list[int],
                   storage_options: dict[str, Any] | None = None) -> dict[int, np.ndarray]:
    """The first view of each wanted row as uint8 HxW (L) or HxWx3 (RGB), digest-checked.

    Each chunk holding a wanted row is read once.
    """
    out: dict[int, np.ndarray] = {}
    by_chunk = _rows_by_chunk(store, wanted)
    with open_reader(root, store.meta.corpus.source, storage_options) as reader:
        _read_views(store, root, reader, by_chunk, out)
    return out


def _read_views(store: LogitStore, root: str, reader: Any, by_chunk: dict[int, list[int]],
                out: dict[int, np.ndarray]) -> None:
    pre, kind = store.meta.preprocess, store.meta.views.kind

    def original(image_id: str, stored_digest: np.ndarray) -> Any:
        path = f"{root.rstrip('/')}/{image_id}"
        try:
            data = reader.read(str(image_id))
            digest, img = sha256_bytes(data), decode_image(data, pre.mode)
        except FileNotFoundError:
            raise CorpusError(f"{path}: missing; --images must be the corpus the store was dumped from "
                              f"(recorded root: {store.meta.corpus.root})") from None
        except OSError as exc:
            raise CorpusError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        if digest != stored_digest.tobytes():
            raise IntegrityError(f"{path}: its bytes differ from the digest stored when it was dumped; "
                                 "--images points at a different or modified corpus")
        return img

    for k, rows_in_chunk in by_chunk.items():
        first, _ = store.chunk_bounds(k)
        rows = store.read_chunk(k)
        for r in rows_in_chunk:
            i = r - first
            img = original(rows.ids[i], rows.digests[i])
            view = (_augmented_view(store, rows, i, r, img, original) if store.meta.views.augmented
                    else apply_view(img, rows.view_params[i, 0], pre, kind))
            arr = view.numpy().transpose(1, 2, 0)
            out[r] = arr[:, :, 0] if arr.shape[2] == 1 else arr


def _augmented_view(store: LogitStore, rows: Any, i: int, r: int, img: Any, original: Any) -> Any:
    """1.5: row r's first view as the teacher saw it (crop, flip, ops, erasing, then mixed with its
    partner's first view), with the functions the dump and the trainer use (logitstore/augment.py)."""
    spec, pre = store.meta.views, store.meta.preprocess

    def premix(rw: Any, j: int, picture: Any) -> Any:
        ex = rw.view_extras or {}
        part = lambda name: None if name not in ex else ex[name][j, :1]  # noqa: E731
        return premix_views([picture], rw.view_params[j, :1], part(schema.AUGMENT_OPS), part(schema.ERASE_BOXES),
                            pre, spec)[0]

    view = premix(rows, i, img)
    ex = rows.view_extras or {}
    if schema.MIX_PARAMS in ex and int(ex[schema.MIX_PARAMS][i, 0, 0]) != 0:
        p = r + int(ex[schema.MIX_PARAMS][i, 0, 0])
        partner = store.read(p, p + 1, pixels=False)
        pview = premix(partner, 0, original(partner.ids[0], partner.digests[0]))
        view = mix_view(view, pview, float(ex[schema.MIX_LAMBDA][i, 0]), ex[schema.MIX_PARAMS][i, 0, 1:])
    return view


def literal(text: str) -> str:
    """A store's string as matplotlib text: shown as is, never parsed as mathtext ("$...$" from an
    untrusted class name would be, and can make drawing fail)."""
    return str(text).replace("$", r"\$")


def _embedded_views(store: LogitStore, wanted: list[int]) -> dict[int, np.ndarray]:
    """The first view of each wanted row from the pixels the store embeds (the teacher's exact input)."""
    out: dict[int, np.ndarray] = {}
    for k, rows_in_chunk in _rows_by_chunk(store, wanted).items():
        first, _ = store.chunk_bounds(k)
        pixels = store.read_chunk(k).pixels
        for r in rows_in_chunk:
            arr = pixels[r - first, 0].transpose(1, 2, 0)
            out[r] = arr[:, :, 0] if arr.shape[2] == 1 else arr
    return out


def contact_sheet(store: LogitStore | str | os.PathLike, images_root: str | os.PathLike | None,
                  out_png: str | os.PathLike, per_class: int = 8, seed: int = 0, max_classes: int = 20,
                  title: str | None = None, storage_options: dict[str, Any] | None = None) -> SheetSummary:
    """Draw `per_class` random images of each class the teacher predicts, with its confidence, and
    its top-1 class histogram, into one PNG. With more than `max_classes` classes only the most
    predicted ones get a row.

    `images_root` defaults to the corpus root recorded in the store. Each drawn image is checked
    against its stored digest, so a sheet never shows pictures the logits were not computed on.
    Without `images_root`, a store that embeds its pixels is drawn from them when the recorded
    corpus is not here.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    if per_class < 1 or max_classes < 1:
        raise OptionError(f"per_class ({per_class}) and max_classes ({max_classes}) must be at least 1")
    if not isinstance(store, LogitStore):
        store = open_store(store)
    root, here = corpus_location(store, images_root)
    embedded = images_root is None and not here and store.meta.embedded_pixels
    if not here and not embedded:
        raise CorpusError(f"{root}: no such folder; pass --images, the corpus root the store was dumped from")
    classes = store.classes
    pred, conf = _top1(store)
    counts = np.bincount(pred, minlength=len(classes)) if len(pred) else np.zeros(len(classes), np.int64)
    # Rows: every class in class order for small label sets (an empty row says "never predicted"),
    # else the most predicted classes, most first.
    drawn = (np.argsort(-counts, kind="stable")[:max_classes] if len(classes) > max_classes
             else np.arange(len(classes)))
    rng = np.random.default_rng(seed)
    picks = {int(c): rng.permutation(np.nonzero(pred == c)[0])[:per_class] for c in drawn}
    wanted = [int(r) for p in picks.values() for r in p]
    views = _embedded_views(store, wanted) if embedded else _teacher_views(store, root, wanted, storage_options)

    cell = 0.9
    n_rows = len(drawn)
    fig = Figure(figsize=(1.6 + per_class * cell + 4.2, 0.9 + n_rows * (cell + 0.25)))
    grid = fig.add_gridspec(n_rows, per_class + 2, width_ratios=[1.8] + [cell] * per_class + [4.2],
                            left=0.01, right=0.95, top=1 - 0.7 / fig.get_figheight(), bottom=0.02,
                            wspace=0.08, hspace=0.45)
    n = max(1, len(pred))
    for r, c in enumerate(drawn):
        label_ax = fig.add_subplot(grid[r, 0])
        label_ax.axis("off")
        label_ax.text(0.95, 0.5, f"{literal(classes[c])}\n{counts[c]:,} ({100 * counts[c] / n:.1f}%)",
                      ha="right", va="center", fontsize=9, transform=label_ax.transAxes)
        for j in range(per_class):
            ax = fig.add_subplot(grid[r, 1 + j])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_facecolor("none")  # so the "never predicted" note may run on across empty cells
            for side in ax.spines.values():
                side.set_visible(False)
            if j == 0 and not len(picks[int(c)]):
                ax.text(0.05, 0.5, "never predicted", fontsize=8, color="grey", va="center",
                        transform=ax.transAxes, clip_on=False)
            if j < len(picks[int(c)]):
                row = int(picks[int(c)][j])
                img = views[row]
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
                ax.set_title(f"{conf[row]:.2f}", fontsize=7, pad=2)
    # The histogram's bars line up with the rows: the same classes, in the same order.
    hist_ax = fig.add_subplot(grid[:, -1])
    ys = np.arange(n_rows)
    frac = counts[drawn] / n
    hist_ax.barh(ys, frac, height=0.6, color="#4c72b0")
    for y, f in zip(ys, frac):
        hist_ax.text(f, y, f" {100 * f:.1f}%", va="center", fontsize=7)
    hist_ax.set_ylim(n_rows - 0.5, -0.5)
    hist_ax.set_yticks(ys, [literal(classes[int(c)]) for c in drawn], fontsize=8)
    hist_ax.yaxis.tick_right()
    hist_ax.set_xlim(0, max(1 / len(classes), float(frac.max()) if n_rows else 0) * 1.25)
    hist_ax.axvline(1 / len(classes), color="grey", lw=0.8, ls="--", label="uniform")
    other = 1 - float(frac.sum())
    hist_ax.set_xlabel("teacher's top-1, fraction of images" + (f"\n(other classes: {100 * other:.1f}%)"
                                                               if len(drawn) < len(classes) else ""), fontsize=8)
    hist_ax.tick_params(axis="x", labelsize=7)
    hist_ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"{Path(store.location).name}: {len(pred):,} images by the teacher's top-1 class "
                 f"(confidence above each image)", fontsize=10)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return SheetSummary(out=out, images=len(pred), class_counts={classes[k]: int(counts[k]) for k in range(len(classes))},
                        shown={classes[int(c)]: len(picks[int(c)]) for c in drawn},
                        classes_drawn=[classes[int(c)] for c in drawn])

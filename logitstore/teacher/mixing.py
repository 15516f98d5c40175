"""The dump's side of mixup / cutmix (format 1.5): which listing positions a run must read so that every mix
group it stores is whole, and the batches of pre-mix views turned into mixed ones, a group at a time.

A view's partner is another readable image of its mix group (listing positions [k * G, (k + 1) * G),
G = views.mix.group), drawn from the image's own generator (augment.sample_extras, augment.partner_rank).
The groups are fixed by the listing alone, so the partners do not depend on --batch-size, workers,
processes or where a run resumed; a batch waits (its pre-mix views kept) until every group it touches
has been read, then goes to the teacher as it would have in any other run.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np

from .. import schema
from ..augment import mix_group


def span(start: int, stop: int, batch: int, group: int | None, n_listed: int) -> tuple[int, int]:
    """Listing positions to read for [start, stop): whole batches (a resumed run starts at a batch
    boundary) and, with mixing, whole mix groups around them."""
    a = (start // batch) * batch
    if group is None:
        return a, stop
    a = ((start // group) * group // batch) * batch
    b = min(n_listed, -(-(-(-stop // group) * group) // batch) * batch)
    return a, max(b, stop)


def _positions(batch: dict[str, Any]) -> list[int]:
    ok = batch["ok"]
    return [*(ok["source"].tolist() if ok else []), *(f[0] for f in batch["failures"])]


def with_partners(batches: Iterable[dict[str, Any]], group: int) -> Iterator[dict[str, Any]]:
    """Collated dump batches (job._collate) in listing order -> the same batches, their pixels mixed and
    their mix arrays settled. A batch is handed on once every mix group it touches has been read (or the
    batches ran out: the listing's last group is short)."""
    buf: list[dict[str, Any]] = []
    done, seen = 0, -1
    for batch in batches:
        buf.append(batch)
        seen = max([seen, *_positions(batch)])
        while done < len(buf) and _last_group_end(buf[done], group) <= seen + 1:
            yield _mixed(buf, done, group)
            done += 1
            buf, done = _drop_used(buf, done, group)
    while done < len(buf):
        yield _mixed(buf, done, group)
        done += 1


def _groups(batch: dict[str, Any], group: int) -> list[int]:
    return sorted({p // group for p in _positions(batch)})


def _last_group_end(batch: dict[str, Any], group: int) -> int:
    g = _groups(batch, group)
    return (g[-1] + 1) * group if g else 0


def _drop_used(buf: list[dict[str, Any]], done: int, group: int) -> tuple[list[dict[str, Any]], int]:
    """Forget handed-on batches that no batch still waiting shares a group with."""
    if done >= len(buf):
        return [], 0
    first = min(_groups(buf[done], group), default=0)
    k = 0
    while k < done and max(_groups(buf[k], group), default=-1) < first:
        k += 1
    return buf[k:], done - k


def _mixed(buf: list[dict[str, Any]], k: int, group: int) -> dict[str, Any]:
    batch = buf[k]
    ok = batch["ok"]
    if not ok:
        return batch
    # Every readable member of the groups this batch touches, in listing order: (position, batch, item).
    wanted = {int(p) // group for p in ok["source"]}
    members: dict[int, list[tuple[int, int, int]]] = {g: [] for g in wanted}
    for j, other in enumerate(buf):
        if other["ok"]:
            for i, p in enumerate(other["ok"]["source"].tolist()):
                if p // group in wanted:
                    members[p // group].append((p, j, i))
    ex = ok["extras"]
    pixels = ok["pixels"].clone()
    for g, ms in members.items():
        ms.sort()
        mine = [r for r, (_, j, _) in enumerate(ms) if j == k]
        premix = [buf[j]["ok"]["pixels"][i] for _, j, i in ms]
        # Partners are settled for the whole group at once (cheap), but only this batch's rows are kept.
        u = np.stack([buf[j]["ok"]["partner_u"][i] for _, j, i in ms])
        mix = np.stack([buf[j]["ok"]["extras"][schema.MIX_PARAMS][i] for _, j, i in ms])
        lam = np.stack([buf[j]["ok"]["extras"][schema.MIX_LAMBDA][i] for _, j, i in ms])
        views = mix_group(premix, u, mix, lam, mine)
        for r in mine:
            i = ms[r][2]
            pixels[i] = views[r]
            ex[schema.MIX_PARAMS][i] = mix[r]
            ex[schema.MIX_LAMBDA][i] = lam[r]
    return {**batch, "ok": {**ok, "pixels": pixels}}

"""Tables (Markdown) and figures (PNG) from a run's results.json.

    python -m examples.mnist_ood.report runs/mnist_ood/results.json --out examples/mnist_ood/figures
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np


def sweep(steps: dict[str, Any], key: str, main: str = "student letters") -> list[tuple[float, dict[str, Any]]]:
    """Points of the temperature ("T") or size ("n") sweep, the main letters student included."""
    pts = [(float(k.split("=", 1)[1]), v) for k, v in steps.items() if k.startswith(f"sweep {key}=")]
    m = steps[main]
    pts.append((m["T"] if key == "T" else m["store_rows"], m))
    return sorted(pts)


def _references(ax: Any, steps: dict[str, Any]) -> None:
    ax.axhline(100 * steps["teacher accuracy"]["top1"], color="black", ls="--", lw=1, label="teacher")
    if "labels 100% scratch" in steps:
        ax.axhline(100 * steps["labels 100% scratch"]["top1"], color="tab:green", ls=":", lw=1.2,
                   label="same student, all MNIST labels")
    if "student mnist" in steps:
        ax.axhline(100 * steps["student mnist"]["top1"], color="tab:purple", ls="-.", lw=1,
                   label="student from MNIST images, no labels")


def figures(results: dict[str, Any], out: Path) -> list[Path]:
    from matplotlib.figure import Figure

    steps, plan = results["steps"], results["plan"]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    where = f"{results['machine']['cores']}-core CPU ({results['machine']['cpu']}), no GPU"
    if any(k.startswith("sweep T=") for k in steps):
        pts = sweep(steps, "T")
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        ax.plot([t for t, _ in pts], [100 * v["top1"] for _, v in pts], "o-", color="tab:blue",
                label=f"student from {plan['letters']:,} letters, no labels")
        _references(ax, steps)
        seeds = [100 * v["top1"] for k, v in steps.items() if k.split(" seed=")[0] == "student letters"]
        if len(seeds) > 1:  # the seed-to-seed spread at the main temperature: the scale of "noise"
            ax.errorbar([plan["temperature"]], [np.mean(seeds)], yerr=[[np.mean(seeds) - min(seeds)],
                                                                     [max(seeds) - np.mean(seeds)]],
                        fmt="s", color="tab:orange", capsize=4, label=f"T={plan['temperature']:g}: "
                        f"mean and range of {len(seeds)} seeds")
        ax.set_xscale("log", base=2)
        ax.set_xticks([t for t, _ in pts], [f"{t:g}" for t, _ in pts])
        ax.minorticks_off()
        ax.set_ylim(88, 100)
        ax.set_xlabel("distillation temperature T")
        ax.set_ylabel("MNIST test top-1 (%)")
        ax.set_title(f"LeNet-5 distilled from one letters store, {plan['student_epochs']} epochs, seed {plan['seed']}",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.text(0.01, 0.01, where, fontsize=6, color="grey")
        fig.tight_layout()
        written.append(out / "accuracy_vs_temperature.png")
        fig.savefig(written[-1], dpi=110)
    if any(k.startswith("sweep n=") for k in steps):
        pts = sweep(steps, "n")
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        ax.plot([n for n, _ in pts], [100 * v["top1"] for _, v in pts], "o-", color="tab:blue",
                label=f"student from the first n letters, T={plan['temperature']:g}, no labels")
        _references(ax, steps)
        ax.set_xscale("log")
        ax.set_xticks([n for n, _ in pts], [f"{n / 1000:g}k" for n, _ in pts])
        ax.minorticks_off()
        ax.set_ylim(88, 100)
        ax.set_xlabel("transfer-set size (letter images; same number of optimiser steps for each)")
        ax.set_ylabel("MNIST test top-1 (%)")
        ax.set_title(f"LeNet-5 distilled from one letters store, seed {plan['seed']}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.text(0.01, 0.01, where, fontsize=6, color="grey")
        fig.tight_layout()
        written.append(out / "accuracy_vs_size.png")
        fig.savefig(written[-1], dpi=110)
    return written


def markdown(results: dict[str, Any]) -> str:
    """The README's tables, from the numbers in results.json."""
    from .run import summary_rows

    steps = results["steps"]
    lines = ["| model | trained on | MNIST test top-1 | dump time | store size |", "| --- | --- | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(results)]
    for key, label, fmt in (("T", "temperature T", "{:g}"), ("n", "letter images", "{:,.0f}")):
        pts = sweep(steps, key) if any(k.startswith(f"sweep {key}=") for k in steps) else []
        if not pts:
            continue
        lines += ["", f"| {label} | epochs | MNIST test top-1 | agreement with the teacher (held-out letters) | fit time |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        for x, v in pts:
            agree = f"{100 * v['agree_holdout']:.1f}%" if v.get("agree_holdout") is not None else ""
            lines.append(f"| {fmt.format(x)} | {v['epochs']} | {100 * v['top1']:.2f}% | {agree} | {v['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def histogram_table(results: dict[str, Any]) -> str:
    steps = results["steps"]
    order = ["letters", "letters x4", "letters-no-lookalikes", "noise", "mnist"]
    names = sorted((k[len("dump "):] for k in steps if k.startswith("dump ")),
                   key=lambda n: order.index(n) if n in order else len(order))
    lines = ["| corpus | " + " | ".join(str(c) for c in range(10)) + " | mean confidence |",
             "| --- |" + " ---: |" * 11]
    for name in names:
        h = steps[f"dump {name}"]["histogram"]
        n = max(1, sum(h.values()))
        lines.append(f"| {name} | " + " | ".join(f"{100 * h[str(c)] / n:.1f}%" for c in range(10))
                     + f" | {steps[f'dump {name}']['confidence_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def glyph_table(results: dict[str, Any]) -> str:
    """Which glyphs the teacher calls each digit most often (from the "teacher reading letters" step)."""
    reading = results["steps"].get("teacher reading letters")
    if not reading:
        return ""
    lines = ["| digit | glyphs it is given most often (images) |", "| ---: | --- |"]
    for digit, glyphs in reading["top_glyphs"].items():
        cells = ", ".join(f"`{ch}` {n}" if ch not in "|`" else f"<code>{ch}</code> {n}" for ch, n in glyphs)
        lines.append(f"| {digit} | {cells.replace('|', '&#124;')} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("results_json", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the PNGs and tables.md.")
def main(results_json: str, out: str) -> None:
    """Figures and Markdown tables from a results.json written by `python -m examples.mnist_ood`."""
    results = json.loads(Path(results_json).read_text())
    paths = figures(results, Path(out))
    md = Path(out) / "tables.md"
    md.write_text(markdown(results) + "\n" + histogram_table(results) + "\n" + glyph_table(results))
    for p in paths + [md]:
        click.echo(p)


if __name__ == "__main__":
    main()

"""compare.py's figures (matplotlib, one function per figure): Dice vs trainable parameters, Dice vs rank, validation
Dice vs lr, each beside the paired Δ Dice vs decoder-only."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from tcurlora_seg.compare.collect import _float, tuning_seeds
from tcurlora_seg.compare.constants import METHODS, PAIRED, REFERENCE, ZERO_SHOT


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def _plain_ticks(ax, axis: str = "x") -> None:
    """Log-axis ticks as 0.5, 2, 16 rather than 5×10⁻¹; minor ticks labelled too when the range is under a decade."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = ax.get_xlim() if axis == "x" else ax.get_ylim()
    plain = FuncFormatter(lambda x, _: f"{x:g}")
    getattr(ax, f"{axis}axis").set_major_formatter(plain)
    getattr(ax, f"{axis}axis").set_minor_formatter(plain if hi / lo < 10 else NullFormatter())


def plot_comparison(entries: Sequence[dict], path: Path) -> None:
    """Dice vs trainable parameters (log x), one point per method, error bars = std of Dice over seeds; beside it,
    when decoder-only ran with the same seeds, Δ Dice vs decoder-only paired by seed, one row per method (its much
    smaller spread is what separates a method from decoder-only)."""
    _figure(path, _method_panel, _paired_rows, entries, [e for e in entries if e["method"] != REFERENCE],
            "Dice vs trainable parameters (mean ± std over seeds)")


def _figure(path: Path, panel, paired_panel, entries: Sequence[dict], paired_entries: Sequence[dict], title: str) -> None:
    """``panel`` of the Dice, and beside it, where any entry has a paired Δ Dice, ``paired_panel`` of that."""
    plt = _pyplot()
    paired = any(not math.isnan(e[PAIRED][0]) for e in paired_entries)
    fig, axes = plt.subplots(1, 2 if paired else 1, figsize=(13 if paired else 6.5, 4.5), squeeze=False)
    panel(axes[0, 0], entries, "dice", "test Dice (%)", title)
    if paired:
        paired_panel(axes[0, 1], paired_entries, PAIRED, "Δ test Dice vs decoder-only (points)",
                     "paired by seed: Dice − decoder-only's (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def _style(method: str) -> dict:
    """One colour and marker per method, the same in both panels and in every plot."""
    if method == ZERO_SHOT:
        return {"color": "grey", "marker": "x"}
    i = METHODS.index(method) if method in METHODS else len(METHODS)
    return {"color": f"C{i % 10}", "marker": "osD^v<>ph*"[i % 10]}


def _method_panel(ax, entries: Sequence[dict], metric: str, ylabel: str, title: str) -> None:
    # a legend, not labels at the points: methods of about the same size (decoder-only, CURLoRA, tCURLoRA, LoKr)
    # share an x, and their labels would print over each other
    for entry in entries:
        (params, _), (value, std) = entry["trainable"], entry[metric]
        if entry["method"] == ZERO_SHOT and not math.isnan(value):  # no parameters trained: a level, not a point
            ax.axhline(value, linestyle="--", color="grey", label="zero-shot (the source model)")
            continue
        if math.isnan(params) or math.isnan(value):
            continue
        ax.errorbar(params / 1e6, value, yerr=0.0 if math.isnan(std) else std, linestyle="none", capsize=3,
                    label=entry["method"], **_style(entry["method"]))
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    if hi / lo < 4:  # methods of near-equal size: widen around them, a log axis needs some ticks to label
        ax.set_xlim(math.sqrt(lo * hi) / 2, math.sqrt(lo * hi) * 2)
    ax.set(xlabel="trainable parameters (M, log scale)", ylabel=ylabel, title=title)
    _plain_ticks(ax)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)


def _paired_rows(ax, entries: Sequence[dict], metric: str, xlabel: str, title: str) -> None:
    """One row per method (the table's order, top down), mean ± std of the paired difference, a line at 0."""
    rows = [e for e in entries if not math.isnan(e[metric][0])]
    for y, entry in enumerate(reversed(rows)):
        value, std = entry[metric]
        ax.errorbar(value, y, xerr=0.0 if math.isnan(std) else std, linestyle="none", capsize=3,
                    **_style(entry["method"]))
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(rows)), [e["method"] for e in reversed(rows)])
    ax.set(xlabel=xlabel, title=title)
    ax.grid(True, axis="x", alpha=0.3)


def plot_tuning(rows: Sequence[dict], chosen: dict[str, float], path: Path) -> Path:
    """Validation Dice (mean over the tuning seeds) vs the adapter lr, one line per tuned method, its chosen lr
    circled; beside it, when the decoder lr was tuned, decoder-only's validation Dice vs that lr. Test Dice plays no
    part in it."""
    plt = _pyplot()
    panels = [("adapter_lr", [m for m in chosen if m != "lr"], "adapter lr (the method's own tensors)")]
    if "lr" in chosen:
        panels.append(("lr", [REFERENCE], "decoder lr (decoder-only)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (key, methods, xlabel) in zip(axes[0], panels):
        for method in methods:
            mine = [r for r in rows if r["method"] == method and _float(r[key]) is not None and _float(r["val_dice"]) is not None]
            if key == "adapter_lr" and "lr" in chosen:
                mine = [r for r in mine if _float(r["lr"]) == chosen["lr"]]
            tune = tuning_seeds(mine, key)  # what the choice saw: not the final seeds at the chosen lr
            mine = [r for r in mine if str(r["seed"]) in tune]
            lrs = sorted({_float(r[key]) for r in mine})
            means = [statistics.fmean(_float(r["val_dice"]) for r in mine if _float(r[key]) == lr) for lr in lrs]
            ax.plot(lrs, means, label=method, **_style(method))
            best = chosen["lr" if key == "lr" else method]
            if best in lrs:
                ax.plot(best, means[lrs.index(best)], marker="o", markersize=12, fillstyle="none", color="black")
        ax.set_xscale("log")
        ax.set(xlabel=xlabel, ylabel="validation Dice (%), mean over tuning seeds",
               title="lr chosen on validation (circled)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_ablation(entries: Sequence[dict], path: Path) -> None:
    """tCURLoRA Dice vs rank (log2 x), one line per tensor-group setting, error bars = std over seeds; beside it,
    when the comparison's decoder-only ran with the same seeds, Δ Dice vs decoder-only paired by seed."""
    _figure(path, _rank_panel, _rank_panel, entries, entries, "tCURLoRA: rank and tensor groups (mean ± std over seeds)")


def _rank_panel(ax, entries: Sequence[dict], metric: str, ylabel: str, title: str) -> None:
    if metric == PAIRED:
        ax.axhline(0.0, color="grey", linewidth=1)
    settings = list(dict.fromkeys(e["groups"] for e in entries))
    for i, groups in enumerate(settings):
        mine = [e for e in entries if e["groups"] == groups and not math.isnan(e[metric][0])]
        points = sorted((int(e["rank"]), *e[metric]) for e in mine)  # (rank, mean, std)
        if points:
            ranks, mean, std = zip(*points)
            shift = 2 ** (0.06 * (i - (len(settings) - 1) / 2))  # settings at the same rank side by side, not on top
            ax.errorbar([r * shift for r in ranks], mean, yerr=[0.0 if math.isnan(s) else s for s in std], marker="o",
                        capsize=3, label=groups)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(e["rank"]) for e in entries}))
    _plain_ticks(ax)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set(xlabel="rank r", ylabel=ylabel, title=title)
    ax.legend(title="groups")
    ax.grid(True, which="both", alpha=0.3)

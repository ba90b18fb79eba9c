"""Is transfer worth it, and with how many cases? (issue 29): test Dice vs the number of training cases k per method,
each paired with training from scratch on the same k cases, and the k from which a method beats scratch.

From the comparison's selected rows (``collect``; their ``shots`` column is the k a run trained on): ``shots.md``
(test Dice vs k, mean ± std over seeds; Δ Dice vs scratch with its 95 % paired-bootstrap CI from ``compare.stats``,
paired by seed and test case within each k; the crossing points under it) and ``shots.png`` (Dice vs k per method,
the zero-shot level as a horizontal line, scratch in bold). An ``nnunet`` row in the comparison is one method more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from tcurlora_seg.compare import stats
from tcurlora_seg.compare.collect import case_values, mean_std, shots_key
from tcurlora_seg.compare.constants import ORDER, SCRATCH, ZERO_SHOT

__all__ = ["several_shots", "shots_entries", "crossings", "winners", "shots_markdown", "plot_shots", "shots_report"]


def several_shots(rows: Sequence[dict]) -> bool:
    """Whether the rows trained on more than one number of cases (a shots sweep)."""
    return len({shots_key(r) for r in rows if r["method"] != ZERO_SHOT} - {None}) > 1


def _order(method: str) -> int:
    return ORDER.index(method) if method in ORDER else len(ORDER)


def shots_entries(rows: Sequence[dict]) -> tuple[list[int], dict[str, dict[int, dict]]]:
    """(the ks ascending, {method: {k: {"dice": (mean, std) over seeds, "n": seeds, "vs_scratch": PairedDifference
    or None, "cases": {(seed, case): Dice}}}}); zero-shot (trained on nothing) is the same level at every k, paired with scratch at each k."""
    ks = sorted({shots_key(r) for r in rows if r["method"] != ZERO_SHOT} - {None})
    methods = sorted({r["method"] for r in rows}, key=_order)
    scratch = {k: case_values([r for r in rows if r["method"] == SCRATCH and shots_key(r) == k]) for k in ks}
    table: dict[str, dict[int, dict]] = {}
    for method in methods:
        for k in ks:
            mine = [r for r in rows if r["method"] == method and (method == ZERO_SHOT or shots_key(r) == k)]
            dice = [float(r["dice"]) for r in mine if r.get("dice") not in (None, "")]
            cases = case_values(mine)
            paired = None if method == SCRATCH or not scratch[k] else stats.paired_difference(cases, scratch[k])
            if dice:
                table.setdefault(method, {})[k] = {"dice": mean_std(dice), "n": len(dice), "vs_scratch": paired,
                                                   "cases": cases}
    return ks, table


def crossings(table: dict[str, dict[int, dict]]) -> dict[str, list[int]]:
    """Per method other than scratch: the ks at which its mean Dice beats scratch's with a CI that excludes 0."""
    return {method: [k for k, cell in by_k.items() if cell["vs_scratch"] is not None and cell["vs_scratch"].low > 0]
            for method, by_k in table.items() if method != SCRATCH}


def winners(ks: Sequence[int], table: dict[str, dict[int, dict]]) -> dict[int, tuple[str, str | None, object]]:
    """Per k: (the method with the highest mean test Dice, zero-shot included, the runner-up, the leader's paired Δ
    over the runner-up or None): whether the best method at k is ahead of the next one beyond the noise."""
    result = {}
    for k in ks:
        ranked = sorted((m for m, by_k in table.items() if k in by_k), key=lambda m: -table[m][k]["dice"][0])
        if not ranked:
            continue
        second = ranked[1] if len(ranked) > 1 else None
        paired = stats.paired_difference(table[ranked[0]][k]["cases"], table[second][k]["cases"]) if second else None
        result[k] = (ranked[0], second, paired)
    return result


def winner_lines(ks: Sequence[int], table: dict[str, dict[int, dict]]) -> list[str]:
    """The winners as sentences: a lead is real only when its CI excludes 0."""
    lines = []
    for k, (best, second, paired) in winners(ks, table).items():
        text = f"- k = {k}: **{best}** ({table[best][k]['dice'][0]:.2f} %)"
        if second is not None:
            lead = "no paired cases" if paired is None else (
                f"Δ {paired.mean:+.2f} [{paired.low:+.2f}, {paired.high:+.2f}], "
                + ("a real lead" if paired.real else "not distinguishable"))
            text += f", ahead of {second} ({table[second][k]['dice'][0]:.2f} %): {lead}"
        lines.append(text)
    return lines


def _dice_cell(cell: dict | None) -> str:
    if cell is None:
        return "–"
    mean, std = cell["dice"]
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _delta_cell(cell: dict | None) -> str:
    result = None if cell is None else cell["vs_scratch"]
    if result is None:
        return "–"
    interval = f"[{result.low:+.2f}, {result.high:+.2f}]"
    return f"{result.mean:+.2f} {f'**{interval}**' if result.real else interval}"


def shots_markdown(ks: Sequence[int], table: dict[str, dict[int, dict]]) -> str:
    """Two tables (Dice vs k; Δ vs scratch with its CI) and the crossing points written out below them."""
    header = "| method | " + " | ".join(f"k = {k}" for k in ks) + " |\n|---|" + "---:|" * len(ks) + "\n"
    dice = "".join(f"| {m} | " + " | ".join(_dice_cell(by_k.get(k)) for k in ks) + " |\n" for m, by_k in table.items())
    delta = "".join(f"| {m} | " + " | ".join(_delta_cell(by_k.get(k)) for k in ks) + " |\n"
                    for m, by_k in table.items() if m != SCRATCH)
    seeds = sorted({cell["n"] for by_k in table.values() for cell in by_k.values()})
    lines = ["## Test Dice % vs the number of training cases k", "",
             f"Mean ± std over seeds ({'/'.join(map(str, seeds))} per cell); every k is scored on the same validation "
             f"and test cases; zero-shot (the source model, trained on none) is the same at every k.", "", header + dice,
             "## Δ Dice vs scratch (same k, same seed)", "",
             f"Mean of the paired differences and its 95 % CI: paired bootstrap over test cases × seeds "
             f"({stats.RESAMPLES:,} resamples, compare/stats.py); **bold**: the interval excludes 0.", "", header + delta,
             "## Where transfer beats training from scratch", ""]
    if SCRATCH not in table:
        lines.append("No scratch runs (peft=scratch) among the runs: nothing to compare with.")
    for method, beaten in crossings(table).items():
        if beaten:
            rest = f" (at k = {', '.join(map(str, beaten))})" if len(beaten) > 1 else ""
            lines.append(f"- {method}: beats scratch from k = {beaten[0]} on{rest}; "
                         + (f"not at k = {', '.join(str(k) for k in ks if k not in beaten)}" if len(beaten) < len(ks)
                            else "at every k"))
        elif SCRATCH in table:
            lines.append(f"- {method}: never beats scratch with a CI that excludes 0 (k = {', '.join(map(str, ks))})")
    lines.append("\nA method beats scratch at k when its mean test Dice is above scratch's and the 95 % CI of the "
                 "paired Δ excludes 0; the smallest such k is its crossing point.")
    lines += ["", "## Which method wins at each k", "",
              *winner_lines(ks, table), "",
              "The highest mean test Dice at each k (zero-shot included: the source model used as it is) and its paired "
              "Δ over the runner-up with the same 95 % CI; a lead is real only when the interval excludes 0."]
    return "\n".join(lines) + "\n"


def plot_shots(ks: Sequence[int], table: dict[str, dict[int, dict]], path: Path) -> Path:
    """Test Dice vs k (log x), mean ± std over seeds, one line per method; zero-shot a dashed level, scratch bold."""
    from tcurlora_seg.compare.figures import _plain_ticks, _pyplot, _style

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_k in table.items():
        points = [(k, *by_k[k]["dice"]) for k in ks if k in by_k]
        if method == ZERO_SHOT:
            ax.axhline(points[0][1], linestyle="--", color="grey", label="zero-shot (the source model)")
            continue
        x, mean, std = zip(*points)
        style = {"color": "black", "marker": "s", "linewidth": 3, "zorder": 3} if method == SCRATCH else \
            {**_style(method), "linewidth": 1.2}
        ax.errorbar(x, mean, yerr=[0.0 if math.isnan(s) else s for s in std], capsize=3,
                    label="scratch (no transfer)" if method == SCRATCH else method, **style)
    ax.set_xscale("log")
    ax.set_xticks(list(ks))
    _plain_ticks(ax)
    ax.set(xlabel="training cases k (log scale)", ylabel="test Dice (%)",
           title="Is transfer worth it? Test Dice vs k (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def shots_report(rows: Sequence[dict], out: Path) -> list[Path]:
    """shots.md (also printed) and shots.png from the comparison's selected rows."""
    ks, table = shots_entries(rows)
    text = shots_markdown(ks, table)
    (out / "shots.md").write_text(text)
    print(f"\nshots ({out / 'shots'}.md/.png)\n{text}", flush=True)
    return [out / "shots.md", plot_shots(ks, table, out / "shots.png")]

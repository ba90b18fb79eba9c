"""What choosing the lr on validation cost (``tuning.md``): each tuned method's test Dice at every lr of the grid on
the tuning seeds, the lr validation chose (the one the tables use) beside the lr the test split would have chosen.

Test Dice plays no part in the choice (``collect.select``); this table only shows, after the fact, how far the
validation cases' choice was from the best one the grid held on the test cases.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from tcurlora_seg.compare.collect import _float, tuning_seeds
from tcurlora_seg.compare.constants import METHODS, REFERENCE

__all__ = ["tuning_markdown"]


def _mean(rows: Sequence[dict], key: str) -> float | None:
    values = [_float(r[key]) for r in rows if _float(r[key]) is not None]
    return statistics.fmean(values) if values else None


def _grid_rows(rows: Sequence[dict], key: str, grid: Sequence[float]) -> tuple[list[float], list[dict]]:
    """The lrs (the grid's order, then any others ascending) and the rows of the seeds that ran several of them."""
    tune = tuning_seeds(rows, key)
    mine = [r for r in rows if str(r["seed"]) in tune and _float(r[key]) is not None]
    found = {_float(r[key]) for r in mine}
    return [v for v in grid if v in found] + sorted(found - set(grid)), mine


def _table(methods: dict[str, list[dict]], key: str, chosen: dict[str, float], grid: Sequence[float], label: str) -> str:
    """Test Dice per method x lr, marked (val) at the chosen lr and (test) at the best test Dice (ties: the grid's
    first, as for the choice), then validation Dice the same way; with the cost of the choice on the test cases."""
    lrs, body = list(grid), []
    tested = {}
    for method, rows in methods.items():
        mine_lrs, mine = _grid_rows(rows, key, grid)
        lrs += [v for v in mine_lrs if v not in lrs]
        test = {v: _mean([r for r in mine if _float(r[key]) == v], "dice") for v in mine_lrs}
        val = {v: _mean([r for r in mine if _float(r[key]) == v], "val_dice") for v in mine_lrs}
        scored = [v for v in mine_lrs if test[v] is not None]
        best = max(scored, key=lambda v: (test[v], -mine_lrs.index(v))) if scored else None
        tested[method] = (test, val, chosen.get(method), best, sorted(tuning_seeds(rows, key), key=str))
    header = [f"test Dice % at {label} {v:g}" for v in lrs]
    lines = ["| method | chosen on validation | best on test | " + " | ".join(header)
             + " | cost of the choice (test Dice) | tuning seeds |",
             "|---|---:|---:|" + "---:|" * len(lrs) + "---:|---|"]
    for method, (test, _, pick, best, seeds) in tested.items():
        cells = [_marked(test.get(v), v == pick, v == best) for v in lrs]
        cost = test[pick] - test[best] if pick in test and best is not None and test[pick] is not None else None
        lines.append(f"| {method} | {_lr(pick)} | {_lr(best)} | " + " | ".join(cells)
                     + f" | {'–' if cost is None else f'{cost:+.2f}'} | {', '.join(seeds) or '–'} |")
    lines += ["", "| method | " + " | ".join(f"validation Dice % at {label} {v:g}" for v in lrs) + " |",
              "|---|" + "---:|" * len(lrs)]
    for method, (_, val, pick, _, _) in tested.items():
        lines.append(f"| {method} | " + " | ".join(_marked(val.get(v), v == pick, False) for v in lrs) + " |")
    return "\n".join(lines) + "\n"


def _marked(value: float | None, chosen: bool, best: bool) -> str:
    if value is None:
        return "–"
    marks = [m for m, on in (("val", chosen), ("test", best)) if on]
    return f"{value:.2f}" + (f" ({', '.join(marks)})" if marks else "")


def _lr(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def tuning_markdown(rows: Sequence[dict], chosen: dict[str, float], adapter_grid: Sequence[float] = (),
                    lr_grid: Sequence[float] = ()) -> str:
    """``tuning.md``: for the decoder lr (when ``--lrs`` chose one) and every method's adapter lr, the test and
    validation Dice at each lr of the grid on the tuning seeds (those that ran the grid, not the final seeds)."""
    order = lambda m: METHODS.index(m) if m in METHODS else len(METHODS)  # noqa: E731
    parts = []
    if "lr" in chosen:
        decoder = {REFERENCE: [r for r in rows if r["method"] == REFERENCE]}
        parts += ["## Decoder lr (decoder-only's validation Dice chose it for every method)", "",
                  _table(decoder, "lr", {REFERENCE: chosen["lr"]}, lr_grid, "lr")]
    tuned = sorted((m for m in chosen if m != "lr"), key=order)
    if tuned:
        # at the chosen decoder lr: the adapter grid ran there
        at = lambda r: "lr" not in chosen or _float(r["lr"]) == chosen["lr"]  # noqa: E731
        methods = {m: [r for r in rows if r["method"] == m and _float(r["adapter_lr"]) is not None and at(r)]
                   for m in tuned}
        parts += ["## Adapter lr (each method's own tensors)", "", _table(methods, "adapter_lr", chosen, adapter_grid, "adapter lr")]
    notes = ("Means over the tuning seeds (those that ran every lr; the final seeds ran the chosen lr only and are not "
             "in these cells). (val): the lr with the best validation Dice, the one every table uses; (test): the lr "
             "the test cases would have chosen (never used). Cost of the choice: test Dice at (val) minus test Dice at "
             "(test), what choosing on the validation cases cost on the test cases (0 when they agree).")
    return "\n".join(["# lr tuning: validation's choice and the test Dice at every lr", "", notes, "", *parts])

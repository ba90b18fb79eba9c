"""The outputs of a comparison folder: comparison / ablation / attribution CSVs and Markdown tables, with their figures."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from tcurlora_seg.adapters.backbones import BACKBONES
from tcurlora_seg.compare.collect import _read_json, aggregate, pair_with_reference, pair_with_zero_shot, select, sweep_rows, zero_shot_rows
from tcurlora_seg.compare.constants import COLUMNS, FIELDS, KEYS, METHODS, PAIRED, REFERENCE, SWEEPS, VS_ZERO_SHOT, ZERO_SHOT, attribution
from tcurlora_seg.compare.figures import plot_ablation, plot_comparison, plot_tuning
from tcurlora_seg.errors import UserError


def cell(stat: tuple[float, float], scale: float, decimals: int, spread: bool = True, signed: bool = False) -> str:
    mean, std = stat
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:{'+' if signed else ''},.{decimals}f}"
    return text if math.isnan(std) or not spread else f"{text} ± {std * scale:,.{decimals}f}"


def markdown(entries: Sequence[dict], keys: Sequence[str], columns: Sequence[tuple] = COLUMNS["comparison"]) -> str:
    headers = [*keys, *(c[0] for c in columns), "n seeds"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(keys) + "---:|" * (len(columns) + 1)]
    for entry in entries:
        cells = [str(entry[k]) for k in keys] + [cell(entry[m], *fmt) if fmt else entry[m] for _, m, *fmt in columns]
        lines.append("| " + " | ".join([*cells, str(entry["n"])]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def report(out: Path) -> list[Path]:
    """Collect every sweep folder of ``out`` into its CSV, Markdown table and plot; print the tables."""
    written = []
    collected: dict[str, list[dict]] = {}
    tuning = _read_json(out / "tuning.json")  # the grids of a tuned run (their order breaks ties)
    for folder, stem in SWEEPS.items():  # the comparison first: the ablation takes in its tCURLoRA rows
        rows = sweep_rows(out, folder, stem, collected.get("comparison", ()))
        if not rows:
            continue
        if stem == "comparison":
            rows = zero_shot_rows(rows) + rows
            chosen = select(rows, tuning.get("adapter_lrs", ()), tuning.get("lrs") or ())
            if chosen:
                written += [plot_tuning(rows, chosen, out / "tuning.png")]
                print("selected on validation Dice: " + ", ".join(f"{k} {v:g}" for k, v in chosen.items()), flush=True)
        collected[stem] = rows
        reference = collected["comparison"] if "comparison" in collected else ()
        pair_with_reference(rows, reference)  # the ablation pairs with the comparison's runs
        pair_with_zero_shot(rows, reference)
        entries = aggregate([r for r in rows if r["selected"]], KEYS[stem])
        if stem == "ablation":  # grouped by tensor setting, ranks ascending, whatever order the sub-sweeps ran in
            entries.sort(key=lambda e: (e["groups"] or "", int(e["rank"])))
        elif stem == "attribution":  # from decoder-only up to full
            settings = [setting for backbone in BACKBONES for setting in attribution(backbone).values()]
            order = [ZERO_SHOT, REFERENCE, *("+".join([m, *extra]) for m, extra in settings), "full"]
            entries.sort(key=lambda e: order.index(e["setting"]) if e["setting"] in order else len(order))
        else:  # zero-shot, then the paper's order, also for runs collected from several sweeps (e.g. over machines)
            entries.sort(key=lambda e: ([ZERO_SHOT, *METHODS].index(e["method"]) if e["method"] in [ZERO_SHOT, *METHODS]
                                        else len(METHODS) + 1))
        columns = COLUMNS[stem]
        if not any(row[PAIRED] is not None for row in rows):  # no decoder-only runs of the same seeds to pair with
            columns = [c for c in columns if c[1] not in (PAIRED, "above_reference")]
        if not any(row[VS_ZERO_SHOT] is not None for row in rows):  # no run evaluated the pretrained model
            columns = [c for c in columns if c[1] != VS_ZERO_SHOT]
        table = markdown(entries, KEYS[stem], columns)
        write_csv(rows, out / f"{stem}.csv")
        (out / f"{stem}.md").write_text(table)
        plot = {"comparison": plot_comparison, "ablation": plot_ablation}.get(stem)
        if plot:
            plot(entries, out / f"{stem}.png")
        outputs = ("csv", "md", "png") if plot else ("csv", "md")
        print(f"\n{stem} ({len(rows)} runs, {out / stem}.{'/.'.join(outputs)})\n{table}", flush=True)
        written += [out / f"{stem}.{ext}" for ext in outputs]
    if not written:
        raise UserError(f"no run folders under {out}/runs or {out}/ablation; pass the OUT folder that compare.py wrote")
    return written

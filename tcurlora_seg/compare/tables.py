"""The outputs of a comparison folder: comparison / ablation / attribution CSVs and Markdown tables, with their figures."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from tcurlora_seg.adapters.backbones import BACKBONES
from tcurlora_seg.compare import stats
from tcurlora_seg.compare.collect import (
    _read_json, aggregate, case_values, pair_with_reference, pair_with_zero_shot, partners, select, shots_key, sweep_rows,
    zero_shot_rows,
)
from tcurlora_seg.compare.constants import (
    COLUMNS, FIELDS, KEYS, ORDER, PAIRED, REFERENCE, SWEEPS, UNCERTAINTY, VS_ZERO_SHOT, ZERO_SHOT, attribution,
)
from tcurlora_seg.compare.figures import plot_ablation, plot_comparison, plot_tuning
from tcurlora_seg.compare.shots import several_shots, shots_report
from tcurlora_seg.compare.tuning import tuning_markdown
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
        cells = ["–" if entry[k] is None else str(entry[k]) for k in keys] + [cell(entry[m], *fmt) if fmt else entry.get(m, "–") for _, m, *fmt in columns]
        lines.append("| " + " | ".join([*cells, str(entry["n"])]) + " |")
    return "\n".join(lines) + "\n"


def uncertainty(entry: dict, reference: Sequence[dict]) -> None:
    """Set the entry's CI and p cells of each paired Δ (``UNCERTAINTY``): ``compare.stats`` over the per-case Dice of
    its runs and of the runs they pair with (same seed, same case); "–" without per-case files or pairs. An interval
    that excludes 0 is in bold: the only differences the tables call real."""
    mine = case_values(entry["runs"])
    shots = {shots_key(r) for r in entry["runs"]}
    for ci, p, method in UNCERTAINTY.values():
        entry[ci] = entry[p] = "–"
        if all(r["method"] == method for r in entry["runs"]):  # itself
            continue
        # the partner runs of the same training cases (a shots sweep's k); zero-shot trained on none
        theirs = [r for r in partners(reference, method) if method == ZERO_SHOT or shots_key(r) in shots]
        result = stats.paired_difference(mine, case_values(theirs))
        if result is not None:
            interval = f"[{result.low:+.2f}, {result.high:+.2f}]"
            entry[ci] = f"**{interval}**" if result.real else interval
            entry[p] = f"{'<0.001' if result.p < 0.001 else f'{result.p:.3f}'} (n={result.n_cases})"


def notes(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """What the table's numbers are, below it: the statistics and the definitions of Dice and HD95."""
    shown = {c[1] for c in columns}
    lines = []
    if shown & {ci for ci, _, _ in UNCERTAINTY.values()}:
        lines.append(f"Δ Dice: paired by seed, mean ± std over seeds. 95 % CI: paired bootstrap over test cases × seeds "
                     f"(the same case and seed for both; {stats.RESAMPLES:,} resamples, generator seed {stats.RNG_SEED}, "
                     f"percentile interval); **bold**: the interval excludes 0, the only differences called real here. "
                     f"Wilcoxon p: two-sided signed-rank test over the cases' differences (each averaged over the seeds; "
                     f"zero differences take part in the ranking, then their ranks are dropped: Pratt), n = cases.")
    volumes = sorted({float(r["min_component_mm3"]) for r in rows if r.get("min_component_mm3") not in (None, "")})
    protocol = " / ".join("no component removal" if v == 0 else f"components < {v:g} mm³ removed" for v in volumes)
    hd95 = ("HD95 mm: MONAI compute_hausdorff_distance, the 95th percentile of each directed surface distance, the "
            "larger of the two, in mm from the label header's spacing; an empty prediction or reference scores the "
            "image diagonal, both empty 0 (engine/metrics.py). \"all components\": the argmax as predicted")
    if "hd95_cc1000" in shown:
        hd95 += ("; \"components < 1 cm³ removed\": the same prediction after removing its connected components "
                 "below 1000 mm³ (the paper's post-processing)")
    lines += [f"Dice %: mean over test cases of each run's evaluation ({protocol or 'its protocol'}).", hd95 + "."]
    return "\n" + "\n\n".join(lines)


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
                text = tuning_markdown(rows, chosen, tuning.get("adapter_lrs", ()), tuning.get("lrs") or ())
                (out / "tuning.md").write_text(text)
                written.append(out / "tuning.md")
                print(f"\n{text}", flush=True)
        collected[stem] = rows
        reference = collected["comparison"] if "comparison" in collected else ()
        pair_with_reference(rows, reference)  # the ablation pairs with the comparison's runs
        pair_with_zero_shot(rows, reference)
        keys = KEYS[stem]
        if stem == "comparison" and several_shots(rows):  # a shots sweep: one entry per k and method
            keys = ["shots", *keys]
        entries = aggregate([r for r in rows if r["selected"]], keys)
        for entry in entries:
            uncertainty(entry, reference)
        if stem == "ablation":  # grouped by tensor setting, ranks ascending, whatever order the sub-sweeps ran in
            entries.sort(key=lambda e: (e["groups"] or "", int(e["rank"])))
        elif stem == "attribution":  # from decoder-only up to full
            settings = [setting for backbone in BACKBONES for setting in attribution(backbone).values()]
            order = [ZERO_SHOT, REFERENCE, *("+".join([m, *extra]) for m, extra in settings), "full"]
            entries.sort(key=lambda e: order.index(e["setting"]) if e["setting"] in order else len(order))
        else:  # zero-shot and scratch, then the paper's order, also for runs collected from several sweeps
            entries.sort(key=lambda e: (shots_key(e) or 0, ORDER.index(e["method"]) if e["method"] in ORDER else len(ORDER)))
        columns = COLUMNS[stem]
        if not any(row[PAIRED] is not None for row in rows):  # no decoder-only runs of the same seeds to pair with
            columns = [c for c in columns if c[1] not in (PAIRED, "above_reference", *UNCERTAINTY[PAIRED][:2])]
        if not any(row[VS_ZERO_SHOT] is not None for row in rows):  # no run evaluated the pretrained model
            columns = [c for c in columns if c[1] not in (VS_ZERO_SHOT, *UNCERTAINTY[VS_ZERO_SHOT][:2])]
        for key in [k for ci, p, _ in UNCERTAINTY.values() for k in (ci, p)]:  # no per-case files (older runs)
            if all(entry[key] == "–" for entry in entries):
                columns = [c for c in columns if c[1] != key]
        if not any(row.get("hd95_cc1000") is not None for row in rows):  # evaluated before both definitions were
            columns = [c for c in columns if c[1] != "hd95_cc1000"]
        table = markdown(entries, keys, columns) + notes([r for r in rows if r["selected"]], columns) + "\n"
        write_csv(rows, out / f"{stem}.csv")
        (out / f"{stem}.md").write_text(table)
        plot = {"comparison": plot_comparison, "ablation": plot_ablation}.get(stem)
        if plot:
            plot(entries, out / f"{stem}.png")
        outputs = ("csv", "md", "png") if plot else ("csv", "md")
        print(f"\n{stem} ({len(rows)} runs, {out / stem}.{'/.'.join(outputs)})\n{table}", flush=True)
        written += [out / f"{stem}.{ext}" for ext in outputs]
        if stem == "comparison" and several_shots(rows):
            written += shots_report([r for r in rows if r["selected"]], out)
    if not written:
        raise UserError(f"no run folders under {out}/runs or {out}/ablation; pass the OUT folder that compare.py wrote")
    return written

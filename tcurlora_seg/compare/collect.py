"""Run folders to rows: one row per run (config, test metrics, validation Dice, costs), pairing by seed with
decoder-only and the zero-shot model, mean ± std per setting, the lr chosen on validation.

A row is a dict of ``constants.FIELDS`` (what comparison.csv holds) plus keys the report uses and the CSV leaves out
(``zero_shot_*``); a new column is a new key in both, nothing else reads the rows by position.
HD95 under two definitions (``engine.evaluate.COMPONENT_VARIANTS``): ``hd95`` with every predicted component,
``hd95_cc1000`` after removing components < 1000 mm³ (the paper's); ``dice`` is the run's own evaluation protocol
(``min_component_mm3``), ``dice_cc1000`` the Dice after the removal.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from tcurlora_seg.compare.constants import FIELDS, METRICS, PAIRED, REFERENCE, VS_ZERO_SHOT, ZERO_SHOT
from tcurlora_seg.engine.metrics import case_means
from tcurlora_seg.errors import UserError


# what a zero-shot row takes from the run that evaluated the source model (eval_pretrained/)
ZERO_SHOT_SCORES = ["dice", "hd95", "dice_cc1000", "hd95_cc1000", "min_component_mm3", "metrics_csv"]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _scores(eval_dir: Path) -> dict:
    """The test metrics of an evaluation folder (``eval/`` or ``eval_pretrained/``) under both HD95 definitions, and
    where its per-case values are; None where the evaluation did not record them (e.g. from before the variants)."""
    from tcurlora_seg.engine.evaluate import COMPONENT_VARIANTS, scores_at

    summary = _read_json(eval_dir / "summary.json")
    plain = scores_at(summary, COMPONENT_VARIANTS["cc0"]) or ({}, None)
    paper = scores_at(summary, COMPONENT_VARIANTS["cc1000"]) or ({}, None)
    protocol = (summary.get("evaluation") or {}).get("min_component_mm3")
    return {"dice": summary.get("foreground_mean", {}).get("Dice"), "hd95": plain[0].get("HD95"),
            "dice_cc1000": paper[0].get("Dice"), "hd95_cc1000": paper[0].get("HD95"),
            "min_component_mm3": (protocol or 0.0) if summary else None,
            "metrics_csv": str(eval_dir / "metrics.csv") if (eval_dir / "metrics.csv").is_file() else None}


def collect_run(run_dir: Path) -> dict:
    """One row of comparison.csv from a run folder; missing files leave their fields empty (None)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    peft = cfg["peft"]
    scores, before = _scores(run_dir / "eval"), _scores(run_dir / "eval_pretrained")
    stats = _read_json(run_dir / "train_stats.json")
    optim = cfg.get("optim") or {}
    best = run_dir / "checkpoints" / "best.pt"
    if scores["dice"] is None:
        print(f"warning: {run_dir} has no eval/summary.json (unfinished, or trained with trainer.evaluate=false: "
              f"make eval RUN={run_dir})", file=sys.stderr)
    return {
        "method": peft["name"],
        "setting": "+".join([peft["name"], *(peft.get("train_extra") or [])]),
        "rank": peft.get("rank"),
        "groups": "+".join(peft["groups"]) if peft.get("groups") else None,
        "shots": shots_of(run_dir, cfg),
        "seed": cfg["seed"],
        "lr": _float(optim.get("lr")),
        # decoder-only has no tensors of its own: its adapter lr means nothing and is left empty
        "adapter_lr": None if peft["name"] == REFERENCE else _float(optim.get("lr") if optim.get("adapter_lr") is None
                                                                    else optim.get("adapter_lr")),
        "val_dice": stats.get("best_val_dice"),
        "selected": True,
        **scores,
        **{f"zero_shot_{key}": value for key, value in before.items()},
        "vit_change_pct": vit_change_of(run_dir) if best.is_file() else None,
        "trainable": stats.get("trainable"),
        "adapter_mb": best.stat().st_size / 2**20 if best.is_file() else None,
        "step_time_s": stats.get("step_time_s"),
        "peak_memory_mb": stats.get("peak_memory_mb"),
        "run_dir": str(run_dir),
    }


def shots_of(run_dir: Path, cfg: dict) -> int | None:
    """How many training cases the run trained on: its split.json's (what the trainer wrote), else the config's
    ``data.split.shots``; None when neither says."""
    split = _read_json(run_dir / "split.json")
    if isinstance(split.get("train"), list):
        return len(split["train"])
    shots = ((cfg.get("data") or {}).get("split") or {}).get("shots")
    return None if shots is None else int(shots)


def shots_key(row: dict) -> int | None:
    """A row's ``shots`` as an int (CSV rows hold strings), None when empty: runs pair within the same k."""
    value = row.get("shots")
    return None if value in (None, "") else int(float(value))


def vit_change_of(run_dir: Path) -> float | None:
    """``run.vit_change`` of the run's best checkpoint, cached in ``eval/vit_change.json`` (it rebuilds two models).

    None, with a warning, when the run cannot be rebuilt here (e.g. its source model is not on this machine)."""
    from tcurlora_seg.engine.run import vit_change

    best, cache = run_dir / "checkpoints" / "best.pt", run_dir / "eval" / "vit_change.json"
    stamp = best.stat().st_mtime_ns
    found = _read_json(cache)
    if found.get("best_mtime_ns") == stamp:
        return found["vit_change_pct"]
    try:
        value = vit_change(run_dir)
    except UserError as err:
        print(f"warning: {run_dir}: no ViT change ({err})", file=sys.stderr)
        return None
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps({"vit_change_pct": value, "best_mtime_ns": stamp}) + "\n")
    return value


def run_folders(sweep_dir: Path) -> list[Path]:
    """The run folders under a sweep folder (its sub-sweeps too), in job order (Hydra's .hydra/config.yaml is not one)."""
    runs = [p.parent for p in sweep_dir.glob("**/config.yaml") if p.parent.name != ".hydra"]
    job = lambda p: int(p.name.split("_")[0]) if p.name.split("_")[0].isdigit() else 0  # noqa: E731
    return sorted(runs, key=lambda p: (str(p.parent), job(p), p.name))


def _values(rows: Sequence[dict], metric: str) -> list[float]:
    values = [row.get(metric) for row in rows]
    return [float(v) for v in values if v not in (None, "") and not math.isnan(float(v))]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1, as over seeds); NaN where undefined."""
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(rows: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """One entry per distinct ``keys`` value (first-seen order): the keys, ``n`` evaluated runs (an unfinished run
    has no Dice and does not count), (mean, std) per metric and its ``runs`` (the rows)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return [{**dict(zip(keys, key)), "n": len(_values(members, "dice")), **{m: mean_std(_values(members, m)) for m in METRICS},
             "above_reference": above(_values(members, PAIRED)), "lr_cell": _lrs(members, "lr"),
             "adapter_lr_cell": _lrs(members, "adapter_lr"), "runs": members}
            for key, members in groups.items()]


def above(deltas: Sequence[float]) -> str:
    """"k/n": at how many of the n paired seeds the method beat decoder-only; "–" without pairs."""
    return f"{sum(d > 0 for d in deltas)}/{len(deltas)}" if deltas else "–"


def partners(reference: Sequence[dict], method: str) -> list[dict]:
    """The runs of ``method`` that others pair with: the selected ones (with ``--lrs``, decoder-only also ran the
    decoder lrs that validation did not choose)."""
    return [r for r in reference if r["method"] == method and r.get("selected", True)]


def case_values(rows: Sequence[dict]) -> dict[tuple[str, str], float]:
    """{(seed, case id): foreground-mean Dice of that case} over the rows' per-case files (``metrics_csv``); the
    protocol's Dice, the one the tables' Dice % is the mean of. Rows without the file add nothing."""
    return {(str(row["seed"]), case): value for row in rows if row.get("metrics_csv")
            for case, value in case_means(row["metrics_csv"]).items()}


def pair_with_reference(rows: Sequence[dict], reference: Sequence[dict]) -> None:
    """Set each row's ``PAIRED``: its Dice minus the Dice of the ``REFERENCE`` run of the same seed in ``reference``.

    None where either Dice is missing, for seeds that decoder-only did not run, and for decoder-only itself (0 by
    definition, and its own spread is the one the others are paired against). In a shots sweep the pair also shares k."""
    dice = {(str(r["seed"]), shots_key(r)): float(r["dice"]) for r in partners(reference, REFERENCE)
            if r.get("dice") not in (None, "")}
    for row in rows:  # the same seed and the same training cases (a shots sweep's k)
        partner = dice.get((str(row["seed"]), shots_key(row)))
        paired = row["method"] != REFERENCE and partner is not None and row.get("dice") not in (None, "")
        row[PAIRED] = float(row["dice"]) - partner if paired else None


def zero_shot_rows(rows: Sequence[dict]) -> list[dict]:
    """One ``ZERO_SHOT`` row per seed: the pretrained model on the test split, as the runs of that seed evaluated it
    before training (``eval_pretrained/``; every run of a seed fine-tunes the same source model on the same split)."""
    found: dict[str, dict] = {}
    for row in rows:
        if row.get("zero_shot_dice") is not None and str(row["seed"]) not in found:
            found[str(row["seed"])] = {**dict.fromkeys(FIELDS), "method": ZERO_SHOT, "setting": ZERO_SHOT,
                                       "seed": row["seed"], "selected": True, "trainable": 0,
                                       **{key: row.get(f"zero_shot_{key}") for key in ZERO_SHOT_SCORES}}
    return list(found.values())


def pair_with_zero_shot(rows: Sequence[dict], reference: Sequence[dict]) -> None:
    """Set each row's ``VS_ZERO_SHOT``: its Dice minus the zero-shot Dice of the same seed (None for zero-shot)."""
    dice = {str(r["seed"]): float(r["dice"]) for r in partners(reference, ZERO_SHOT) if r.get("dice") is not None}
    for row in rows:
        partner = dice.get(str(row["seed"]))
        paired = row["method"] != ZERO_SHOT and partner is not None and row.get("dice") not in (None, "")
        row[VS_ZERO_SHOT] = float(row["dice"]) - partner if paired else None


def _float(value) -> float | None:
    return None if value in (None, "") else float(value)


def tuning_seeds(rows: Sequence[dict], key: str) -> set[str]:
    """The seeds that ran more than one value of ``key``: those the choice is made on (the others ran only the
    chosen value, for the final numbers)."""
    values = {}
    for row in rows:
        if _float(row[key]) is not None:
            values.setdefault(str(row["seed"]), set()).add(_float(row[key]))
    return {seed for seed, seen in values.items() if len(seen) > 1}


def choose(rows: Sequence[dict], key: str, grid: Sequence[float] = ()) -> float | None:
    """The value of ``key`` (``adapter_lr`` or ``lr``) whose runs have the highest mean validation Dice over the seeds
    that ran more than one value (the tuning seeds); ties go to the first value of ``grid`` (ascending if not given).
    None when the rows have fewer than two values or no validation Dice (nothing to choose)."""
    values = sorted({_float(r[key]) for r in rows if _float(r[key]) is not None},
                    key=lambda v: (grid.index(v), v) if v in grid else (len(grid), v))
    if len(values) < 2:
        return None
    tune = tuning_seeds(rows, key)
    means = []
    for value in values:
        val = [_float(r["val_dice"]) for r in rows if _float(r[key]) == value and str(r["seed"]) in tune]
        val = [v for v in val if v is not None]
        means.append(statistics.fmean(val) if val else -math.inf)
    return None if max(means) == -math.inf else values[means.index(max(means))]


def select(rows: Sequence[dict], adapter_grid: Sequence[float] = (), lr_grid: Sequence[float] = ()) -> dict[str, float]:
    """Mark ``selected`` the runs at each method's chosen lr, chosen on validation Dice only (never on test): first the
    shared decoder lr, by decoder-only's runs when they ran several; then every method's adapter lr at that decoder
    lr. Returns the chosen adapter lr per tuned method (and ``"lr"``: the chosen decoder lr, when one was chosen)."""
    chosen: dict[str, float] = {}
    lr = choose([r for r in rows if r["method"] == REFERENCE], "lr", lr_grid)
    if lr is not None:
        chosen["lr"] = lr
    for row in rows:
        # rows without a decoder lr (zero_shot, nnunet) train no decoder: the choice does not apply to them
        row["selected"] = lr is None or _float(row["lr"]) is None or _float(row["lr"]) == lr
    for method in dict.fromkeys(r["method"] for r in rows):
        members = [r for r in rows if r["method"] == method and r["selected"]]
        best = None if method == REFERENCE else choose(members, "adapter_lr", adapter_grid)
        if best is not None:
            chosen[method] = best
            for row in members:
                row["selected"] = _float(row["adapter_lr"]) == best
    return chosen


def _lrs(rows: Sequence[dict], key: str) -> str:
    values = sorted({_float(r.get(key)) for r in rows if _float(r.get(key)) is not None})
    return ", ".join(f"{v:g}" for v in values) or "–"


def sweep_rows(out: Path, folder: str, stem: str, comparison: Sequence[dict] = ()) -> list[dict]:
    """The rows of one output (``stem``) from its sweep ``folder``; the ablation also takes in the comparison's
    tCURLoRA rows (the setting it left out to not run them twice), unless it ran the same setting and seed itself."""
    rows = [collect_run(run) for run in run_folders(out / folder)]
    if stem == "ablation" and rows:
        key = lambda r: (str(r["rank"]), r["groups"], str(r["seed"]))  # noqa: E731
        have = {key(r) for r in rows}
        rows += [r for r in comparison if r["method"] == "tcurlora" and r["selected"] and key(r) not in have]
    if stem == "attribution" and rows:  # the two ends of the gap, from the comparison: decoder-only and full
        rows += [r for r in comparison if r["method"] in (REFERENCE, "full", ZERO_SHOT) and r["selected"]]
    return rows

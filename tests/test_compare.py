"""scripts/compare.py: the sweeps through the real entry point on a toy cohort, and the mean ± std aggregation."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from tcurlora_seg.compare import collect, constants, stats, tables
from tcurlora_seg.compare import sweeps as sweeping  # (tests name their sweep dicts `sweeps`)
from tests.conftest import write_official_dataset
from tests.run_helpers import load_script, terminal_sigint

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compare.py"


compare = load_script("compare")  # the entry point; its parts are in tcurlora_seg.compare


def run_compare(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def tiny_overrides(root: Path) -> list[str]:
    """The tiny UNETR from scratch on the toy cohort, one epoch of one step: the plumbing, not the numbers."""
    return [
        "data=official", f"data.root={root}", "data.roi_size=[32,32,32]", "data.batch_size=2", "data.num_workers=0",
        "data.cache=none", "model=unetr_tiny", "model.pretrained=null", "trainer.max_epochs=1", "trainer.epoch_length=2",
        "trainer.val_interval=1", "trainer.sw_batch_size=2", "trainer.progress=false", "trainer.device=cpu",
        "trainer.log_images=false",
    ]


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("compare")
    root = write_official_dataset(tmp / "toy")
    out = tmp / "out"
    result = run_compare(tmp, "--methods", "decoder_only", "tcurlora", "--seeds", "0", "--ranks", "1", "8",
                         "--groups", "attn", "all", "--groups-rank", "1", "--out", str(out), "--", *tiny_overrides(root))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def table_rows(text: str) -> list[list[str]]:
    """The body cells of a Markdown table (below the header and the rule, above the notes)."""
    body = itertools.takewhile(lambda line: line.startswith("|"), text.splitlines()[2:])
    return [[c.strip() for c in line.strip("|").split("|")] for line in body]


@pytest.mark.xdist_group("swept")  # the sweep both read runs once
def test_compare_writes_csv_table_and_plot_per_sweep(swept):
    out, result = swept
    for stem in ("comparison", "ablation"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{stem} (" in result.stdout  # the tables are printed
    rows = read_csv(out / "comparison.csv")
    assert [r["method"] for r in rows] == ["decoder_only", "tcurlora"] and list(rows[0]) == constants.FIELDS
    for row in rows:
        assert 0 <= float(row["dice"]) <= 100 and float(row["hd95"]) >= 0
        assert float(row["adapter_mb"]) > 0 and float(row["step_time_s"]) > 0 and float(row["peak_memory_mb"]) > 0
    assert int(rows[1]["trainable"]) > int(rows[0]["trainable"]) > 0  # tCURLoRA trains U on top of the decoder
    # the ViT moved under tCURLoRA (U left zero after its steps), not under decoder-only; measured once, then cached
    assert float(rows[0]["vit_change_pct"]) == 0.0 and 0 < float(rows[1]["vit_change_pct"]) < 100
    cached = json.loads((Path(rows[1]["run_dir"]) / "eval" / "vit_change.json").read_text())
    assert cached["vit_change_pct"] == pytest.approx(float(rows[1]["vit_change_pct"]))
    header = (out / "comparison.md").read_text().splitlines()[0]
    assert all(h in header for h in ["method", "trainable params (M)", "adapter MB", "Dice %", "Δ Dice vs decoder-only",
                                     "above decoder-only", "HD95 mm", "ViT change %", "s/step", "peak MB", "n seeds"])
    assert float(rows[1][constants.PAIRED]) == pytest.approx(float(rows[1]["dice"]) - float(rows[0]["dice"]))
    assert [r[0] for r in table_rows((out / "comparison.md").read_text())] == ["decoder_only", "tcurlora"]
    # the real evaluation's per-case files feed the CI and p; both HD95 definitions from one inference pass
    assert all(Path(r["metrics_csv"]).is_file() and float(r["hd95_cc1000"]) >= 0 for r in rows)
    assert "95 % CI vs decoder-only" in header and "HD95 mm, components < 1 cm³ removed" in header
    cells = dict(zip([c.strip() for c in header.strip("|").split("|")], table_rows((out / "comparison.md").read_text())[1]))
    assert cells["95 % CI vs decoder-only"].strip("*").startswith("[") and cells["Wilcoxon p vs decoder-only"].endswith("(n=2)")

    ablation = read_csv(out / "ablation.csv")
    # one factor at a time: ranks 1 and 8 with all tensors, then attention only at rank 1; rank 8 with all tensors is
    # the comparison's own tCURLoRA run (its defaults), taken in rather than run twice
    assert {(r["method"], r["rank"], r["groups"]) for r in ablation} == {
        ("tcurlora", "1", "attn+mlp_up+mlp_down"), ("tcurlora", "8", "attn+mlp_up+mlp_down"), ("tcurlora", "1", "attn")}
    shared = next(r for r in ablation if r["rank"] == "8")
    assert shared == next(r for r in rows if r["method"] == "tcurlora") and "/runs/" in shared["run_dir"]
    assert len(collect.run_folders(out / "ablation")) == 2
    table = table_rows((out / "ablation.md").read_text())
    assert [row[:2] for row in table] == [["1", "attn"], ["1", "attn+mlp_up+mlp_down"], ["8", "attn+mlp_up+mlp_down"]]

    # the attribution sweep: one frozen part at a time trained fully, beside the comparison's decoder-only
    attribution = {r["setting"]: r for r in read_csv(out / "attribution.csv")}
    assert set(attribution) == {"decoder_only", "decoder_only+encoder1+encoder2+encoder3+encoder4",
                                "decoder_only+vit.patch_embedding", "decoder_only+vit.blocks",
                                "tcurlora+encoder1+encoder2+encoder3+encoder4"}
    trainable = {k: int(r["trainable"]) for k, r in attribution.items()}
    assert trainable["decoder_only"] < trainable["decoder_only+vit.patch_embedding"] < trainable["decoder_only+vit.blocks"]
    assert trainable["decoder_only+encoder1+encoder2+encoder3+encoder4"] < trainable["tcurlora+encoder1+encoder2+encoder3+encoder4"]
    assert [r[0] for r in table_rows((out / "attribution.md").read_text())][0] == "decoder_only"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Through the real entry point: decoder-only and tCURLoRA from a tiny "pretrained" model, tCURLoRA's adapter lr
    tuned over {0, 0.05} on seed 0's validation case, both methods then run at seed 1 too."""
    import torch

    from tests.conftest import make_tiny_unetr

    tmp = tmp_path_factory.mktemp("tuned")
    root = write_official_dataset(tmp / "toy")
    source = tmp / "source.pt"
    torch.save({"model": make_tiny_unetr(seed=7).state_dict(), "config": {"seed": 7}}, source)
    out = tmp / "out"
    result = run_compare(tmp, "--methods", "decoder_only", "tcurlora", "--seeds", "0", "1", "--tune-seeds", "0",
                         "--adapter-lrs", "0", "0.05", "--no-ablation", "--out", str(out), "--", *tiny_overrides(root),
                         f"model.pretrained={source}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return out, result


def test_tuning_runs_the_grid_on_the_tuning_seeds_then_each_method_at_its_choice(tuned):
    out, result = tuned
    rows = read_csv(out / "comparison.csv")
    runs = sorted((r["method"], r["seed"], r["adapter_lr"], r["selected"]) for r in rows if r["method"] != "zero_shot")
    tune = {float(r["adapter_lr"]): float(r["val_dice"]) for r in rows if r["method"] == "tcurlora" and r["seed"] == "0"}
    best = 0.0 if tune[0.0] >= tune[0.05] else 0.05  # ties: the grid's first
    assert runs == sorted([("decoder_only", "0", "", "True"), ("decoder_only", "1", "", "True"),
                           ("tcurlora", "0", "0.0", str(best == 0.0)), ("tcurlora", "0", "0.05", str(best == 0.05)),
                           ("tcurlora", "1", str(best), "True")])
    assert f"tcurlora {best:g}" in result.stdout  # the choice is printed
    assert (out / "tuning.png").is_file() and json.loads((out / "tuning.json").read_text())["tune_seeds"] == [0]
    # the zero-shot row: the tiny source model on the test split, as every run of the seed evaluated it
    zero = {r["seed"]: float(r["dice"]) for r in rows if r["method"] == "zero_shot"}
    before = json.loads((Path(next(r for r in rows if r["seed"] == "1" and r["run_dir"])["run_dir"]) / "eval_pretrained"
                         / "summary.json").read_text())["foreground_mean"]["Dice"]
    assert set(zero) == {"0", "1"} and zero["1"] == pytest.approx(before)


def test_adapter_lr_tuning_needs_validation_cases(tmp_path):
    result = run_compare(tmp_path, "--adapter-lrs", "--experiment", "eadc", "--", "data.root=nowhere")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "data.split.val" in result.stderr


@pytest.mark.xdist_group("swept")  # the sweep both read runs once
def test_collect_only_rereads_the_runs_without_training(swept):
    out, _ = swept
    before = read_csv(out / "comparison.csv")
    (out / "comparison.csv").unlink()
    result = run_compare(out, "--collect-only", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_csv(out / "comparison.csv") == before and "tcurlora_seg.train" not in result.stdout


def test_collect_only_without_runs_is_one_line_error(tmp_path):
    result = run_compare(tmp_path, "--collect-only", str(tmp_path))
    assert result.returncode == 2 and result.stderr.strip().startswith("error:") and len(result.stderr.splitlines()) == 1


def test_failed_sweep_exits_2_and_names_collect_only(tmp_path):
    result = run_compare(tmp_path, "--methods", "decoder_only", "--out", str(tmp_path / "out"), "--",
                         "trainer.max_epoch=1")  # a typo: every job stops while Hydra composes its config
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: sweeps failed: runs, ablation/rank, ablation/groups") and "--collect-only" in last


def test_aggregate_gives_mean_and_sample_std_per_method():
    fields = ["method", "dice", "hd95", "trainable", "adapter_mb", "step_time_s", "peak_memory_mb", "vit_change_pct"]
    rows = [dict(zip(fields, values)) for values in [
        ("lora", 80.0, 3.0, 7e6, 28.0, 0.5, 900, 10.0),
        ("lora", 84.0, 5.0, 7e6, 28.0, 0.7, 1100, 12.0),
        ("tcurlora", 85.0, "", 2.7e6, 10.0, None, 800, 2.0),  # empty CSV cell and missing stat: left out of the mean
        ("tcurlora", None, None, 2.7e6, 10.0, 0.4, None, None),  # cut off before its evaluation: not one of the n seeds
    ]]
    lora, tcur = collect.aggregate(rows, ["method"])
    assert (lora["method"], lora["n"], tcur["n"]) == ("lora", 2, 1)
    assert lora["dice"] == pytest.approx((82.0, math.sqrt(8.0)))  # sample std (ddof=1) over seeds
    assert tcur["dice"][0] == 85.0 and math.isnan(tcur["dice"][1]) and math.isnan(tcur["hd95"][0])
    table = tables.markdown([lora, tcur], ["method"])
    lora_row, tcur_row = table_rows(table)
    # no decoder-only runs to pair with: the paired columns (Δ, above, CI, p) are empty, the zero-shot ones too
    # no lrs in these rows (runs from before optim.adapter_lr): "–"; no HD95 after the 1 cm³ removal: "–"
    assert lora_row == ["lora", "–", "–", "7.000", "28.00", "82.00 ± 2.83", *["–"] * 7, "4.00 ± 1.41", "–",
                        "11.00 ± 1.41", "0.600 ± 0.141", "1,000 ± 141", "2"]
    # the cut-off run still measured its step time; n counts the evaluated run only
    assert tcur_row[5:17] == ["85.00", *["–"] * 9, "2.00", "0.400"] and tcur_row[-1] == "1"


def test_ablation_groups_sweep_is_a_hydra_list_sweep():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = sweeping.ablation_overrides([1, 2], ["attn", "mlp", "all"], [0], "demo")
    parsed = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(overrides)}
    assert list(parsed["peft.groups"].sweep_iterator()) == [["attn"], ["mlp_up", "mlp_down"], ["attn", "mlp_up", "mlp_down"]]
    assert list(parsed["peft.rank"].sweep_iterator()) == [1, 2]


def test_ablation_is_one_factor_at_a_time_unless_grid():
    sweeps = sweeping.ablation_sweeps([1, 8], ["attn", "mlp", "all"], [0, 1], "demo", groups_rank=8, grid=False)
    assert list(sweeps) == ["rank", "groups"]
    assert "peft.rank=1,8" in sweeps["rank"] and "peft.groups=[attn,mlp_up,mlp_down]" in sweeps["rank"]
    # (all, 8) already ran in the rank sweep
    assert "peft.rank=8" in sweeps["groups"] and "peft.groups=[attn],[mlp_up,mlp_down]" in sweeps["groups"]
    # a groups rank outside the rank sweep needs all three settings
    assert "peft.groups=[attn],[mlp_up,mlp_down],[attn,mlp_up,mlp_down]" in sweeping.ablation_sweeps(
        [1], ["attn", "mlp", "all"], [0], "demo", groups_rank=8, grid=False)["groups"]
    grid = sweeping.ablation_sweeps([1, 8], ["attn", "all"], [0], "demo", groups_rank=8, grid=True)
    assert list(grid) == ["grid"] and "peft.rank=1,8" in grid["grid"] and "peft.groups=[attn],[attn,mlp_up,mlp_down]" in grid["grid"]


def fake_run(run: Path, method: str, dice: float, seed: int = 0, peft: dict | None = None, optim: dict | None = None,
             val: float | None = None, zero_shot: float | None = None) -> None:
    """A finished run folder with the files compare.py reads."""
    import yaml

    (run / "eval").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    config = {"seed": seed, "peft": {"name": method, **(peft or {})}, "optim": {"lr": 1e-3, "adapter_lr": None, **(optim or {})}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "eval" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": dice, "HD95": 5.0}}))
    if zero_shot is not None:
        (run / "eval_pretrained").mkdir()
        (run / "eval_pretrained" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": zero_shot, "HD95": 50.0}}))
    stats = {"trainable": 10, "step_time_s": 1.0, "peak_memory_mb": 9.0, "best_val_dice": val}
    (run / "train_stats.json").write_text(json.dumps(stats))
    (run / "checkpoints" / "best.pt").write_bytes(b"x" * 1024)


def fake_cases(run: Path, dice: Sequence[float], folder: str = "eval", protocol: float = 0.0) -> None:
    """Per-case scores as engine.evaluate writes them (cases c0, c1, ...): metrics.csv and summary.json with the
    protocol's foreground means and, as ``component_variants``, the other HD95 definition; HD95 = 100 − Dice mm with
    every component, 10 mm less after the 1 cm³ removal."""
    from tcurlora_seg.engine.metrics import write_metrics_csv

    def scored(hd95_of):
        return [{"id": f"c{i}", "metrics": {"1": {"Dice": d, "HD95": hd95_of(d), "empty": None}}} for i, d in enumerate(dice)]

    every, removed = scored(lambda d: 100.0 - d), scored(lambda d: 90.0 - d)
    mine, other, name = (every, removed, "cc1000") if protocol == 0 else (removed, every, "cc0")
    (run / folder).mkdir(exist_ok=True)
    write_metrics_csv(run / folder / "metrics.csv", mine, {name: other})
    mean = lambda cases, key: statistics.fmean(c["metrics"]["1"][key] for c in cases)  # noqa: E731
    summary = {"foreground_mean": {"Dice": mean(mine, "Dice"), "HD95": mean(mine, "HD95")},
               "evaluation": {"min_component_mm3": protocol},
               "component_variants": {name: {"min_component_mm3": 1000.0 if protocol == 0 else 0.0,
                                             "foreground_mean": {"Dice": mean(other, "Dice"), "HD95": mean(other, "HD95")}}}}
    (run / folder / "summary.json").write_text(json.dumps(summary))


def test_every_delta_gets_a_paired_bootstrap_interval_and_a_wilcoxon_p(tmp_path):
    """The CIs and p-values come from the runs' per-case Dice, paired by seed and case: a steady gain on every case
    is called real (bold) although the cases differ by 50 points; a gain that changes sign is not."""
    rng = np.random.default_rng(0)
    base = rng.uniform(40, 80, size=8)  # hard and easy cases, the same test split at every seed
    values = {}
    for seed in range(3):
        ref = base + rng.normal(0, 2, size=8)
        values[seed] = {"decoder_only": ref, "lora": ref + 3 + rng.normal(0, 0.5, size=8),
                        "tcurlora": ref + np.where(np.arange(8) % 2, 1.5, -1.5), "zero_shot": ref - 30}
        for method in ("decoder_only", "lora", "tcurlora"):
            run = tmp_path / "runs" / f"{seed}{method}"
            fake_run(run, method, 0.0, seed, zero_shot=0.0 if method == "decoder_only" else None)
            fake_cases(run, values[seed][method])
            if method == "decoder_only":  # the first run of each seed evaluates the source model
                fake_cases(run, values[seed]["zero_shot"], "eval_pretrained")
    tables.report(tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    table = {row[0]: dict(zip(header, row)) for row in table_rows(text)}

    def expected(method: str, partner: str) -> stats.PairedDifference:  # from the arrays, not from the files
        grid = lambda m: {(str(s), f"c{i}"): v for s in values for i, v in enumerate(values[s][m])}  # noqa: E731
        return stats.paired_difference(grid(method), grid(partner))

    lora, tcur = expected("lora", "decoder_only"), expected("tcurlora", "decoder_only")
    assert lora.real and not tcur.real and tcur.low < 0 < tcur.high
    assert table["lora"]["95 % CI vs decoder-only"] == f"**[{lora.low:+.2f}, {lora.high:+.2f}]**"
    assert table["tcurlora"]["95 % CI vs decoder-only"] == f"[{tcur.low:+.2f}, {tcur.high:+.2f}]"
    assert table["lora"]["Wilcoxon p vs decoder-only"] == "0.008 (n=8)"  # 8 of 8 cases above: 2 / 2^8 (exact)
    assert table["tcurlora"]["Wilcoxon p vs decoder-only"] == f"{tcur.p:.3f} (n=8)" and tcur.p > 0.5
    zero = expected("zero_shot", "decoder_only")
    assert table["zero_shot"]["95 % CI vs decoder-only"] == f"**[{zero.low:+.2f}, {zero.high:+.2f}]**" and zero.high < 0
    assert table["decoder_only"]["95 % CI vs decoder-only"] == "–" and table["zero_shot"]["95 % CI vs zero-shot"] == "–"
    assert table["decoder_only"]["95 % CI vs zero-shot"].startswith("**[+")
    # both HD95 definitions, each the mean of its own per-case values
    ref = np.mean([values[s]["decoder_only"] for s in values], axis=1)
    assert table["decoder_only"]["HD95 mm, all components"] == f"{np.mean(100 - ref):.2f} ± {np.std(100 - ref, ddof=1):.2f}"
    assert table["decoder_only"]["HD95 mm, components < 1 cm³ removed"].startswith(f"{np.mean(90 - ref):.2f} ±")
    assert "10,000 resamples" in text and "(no component removal)" in text and "larger of the two" in text
    rows = read_csv(tmp_path / "comparison.csv")
    zero_row = next(r for r in rows if r["method"] == "zero_shot")
    assert zero_row["metrics_csv"].endswith("eval_pretrained/metrics.csv") and float(zero_row["hd95_cc1000"]) > 0


def test_hd95_columns_keep_their_definitions_whatever_the_runs_protocol(tmp_path):
    """hd95 is every component, hd95_cc1000 after the 1 cm³ removal, whether the run's protocol removed (and wrote
    the other in component_variants) or not; dice is the protocol's."""
    dice = [60.0, 70.0]
    for protocol in (0.0, 1000.0):
        run = tmp_path / f"run{protocol:g}"
        fake_run(run, "lora", 0.0)
        fake_cases(run, dice, protocol=protocol)
        row = collect.collect_run(run)
        assert (row["hd95"], row["hd95_cc1000"], row["min_component_mm3"]) == (35.0, 25.0, protocol)
        assert row["dice"] == row["dice_cc1000"] == 65.0 and row["metrics_csv"] == str(run / "eval" / "metrics.csv")
    old = tmp_path / "old"  # evaluated before the variants: the protocol's HD95 only
    fake_run(old, "lora", 50.0)
    assert (collect.collect_run(old)["hd95"], collect.collect_run(old)["hd95_cc1000"]) == (5.0, None)


def test_each_method_runs_at_the_lr_with_the_best_validation_dice_never_the_best_test_dice(tmp_path):
    """Selection by mean validation Dice over the tuning seeds (the seeds run at several lrs); ties go to the first
    lr of the grid; test Dice plays no part; the final seeds at the chosen lr only join the table."""
    grid = [1e-2, 1e-3]  # not ascending: the grid's order breaks ties
    (tmp_path / "tuning.json").write_text(json.dumps({"adapter_lrs": grid, "lrs": [], "tune_seeds": [0, 1]}))
    runs = [  # method, seed, adapter lr, validation Dice, test Dice
        ("lora", 0, 1e-3, 70.0, 50.0), ("lora", 1, 1e-3, 72.0, 50.0), ("lora", 0, 1e-2, 75.0, 40.0), ("lora", 1, 1e-2, 69.0, 40.0),
        ("lora", 2, 1e-2, None, 41.0),  # a final seed at the chosen lr: no say in the choice
        ("tcurlora", 0, 1e-3, 60.0, 90.0), ("tcurlora", 0, 1e-2, 60.0, 10.0),  # a tie: the grid's first, 1e-2
        ("decoder_only", 0, None, 65.0, 55.0), ("decoder_only", 1, None, 66.0, 56.0), ("decoder_only", 2, None, 64.0, 57.0),
    ]
    for i, (method, seed, lr, val, dice) in enumerate(runs):
        fake_run(tmp_path / "runs" / f"{i}_{method}", method, dice, seed, optim={"adapter_lr": lr}, val=val, zero_shot=30.0 + seed)
    tables.report(tmp_path)
    rows = read_csv(tmp_path / "comparison.csv")
    chosen = {(r["method"], r["seed"], r["adapter_lr"]) for r in rows if r["selected"] == "True"}
    assert {c for c in chosen if c[0] == "lora"} == {("lora", "0", "0.01"), ("lora", "1", "0.01"), ("lora", "2", "0.01")}
    assert {c for c in chosen if c[0] == "tcurlora"} == {("tcurlora", "0", "0.01")}
    assert collect.tuning_seeds([r for r in rows if r["method"] == "lora"], "adapter_lr") == {"0", "1"}  # not seed 2
    assert float(next(r for r in rows if r["method"] == "lora" and r["seed"] == "0" and r["adapter_lr"] == "0.001")["val_dice"]) == 70.0
    table = {row[0]: row for row in table_rows((tmp_path / "comparison.md").read_text())}
    header = [c.strip() for c in (tmp_path / "comparison.md").read_text().splitlines()[0].strip("|").split("|")]
    lora = dict(zip(header, table["lora"]))
    assert lora["adapter lr"] == "0.01" and lora["Dice %"] == "40.33 ± 0.58" and lora["n seeds"] == "3"
    assert dict(zip(header, table["decoder_only"]))["adapter lr"] == "–"
    assert (tmp_path / "tuning.png").read_bytes()[:4] == b"\x89PNG"
    # tuning.md: beside validation's choice, the test Dice at every lr of the grid (the grid's order) on the tuning
    # seeds (lora's final seed 2, test 41, is not in its 1e-2 cell), and what the choice cost on test
    section = (tmp_path / "tuning.md").read_text().split("## Adapter lr")[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    header = [c.strip() for c in section[start].strip("|").split("|")]
    test = {row[0]: dict(zip(header, row)) for row in table_rows("\n".join(section[start:]))}
    assert header[3:5] == ["test Dice % at adapter lr 0.01", "test Dice % at adapter lr 0.001"]
    assert [test["lora"][h] for h in header[1:]] == ["0.01", "0.001", "40.00 (val)", "50.00 (test)", "-10.00", "0, 1"]
    assert [test["tcurlora"][h] for h in header[1:]] == ["0.01", "0.001", "10.00 (val)", "90.00 (test)", "-80.00", "0"]
    assert "decoder_only" not in test  # no adapter lr of its own
    val = section[section.index("", start) + 1:]
    assert table_rows("\n".join(val))[0] == ["lora", "72.00 (val)", "71.00"]


def test_tuning_table_shows_the_decoder_lr_choice_and_the_adapter_grid_at_that_lr():
    from tcurlora_seg.compare.tuning import tuning_markdown

    row = lambda method, seed, lr, adapter_lr, val, dice: {  # noqa: E731
        "method": method, "seed": seed, "lr": lr, "adapter_lr": adapter_lr, "val_dice": val, "dice": dice}
    rows = [row("decoder_only", 0, 1e-3, None, 60.0, 50.0), row("decoder_only", 0, 1e-4, None, 59.0, 52.0),
            row("lora", 0, 1e-3, 1e-2, 70.0, 61.0), row("lora", 0, 1e-3, 1e-1, 65.0, 62.0),
            row("lora", 0, 1e-4, 1e-2, 99.0, 99.0)]  # at a decoder lr that was not chosen: not in the table
    text = tuning_markdown(rows, {"lr": 1e-3, "lora": 1e-2}, [1e-2, 1e-1], [1e-4, 1e-3])
    decoder, adapter = text.split("## Decoder lr")[1].split("## Adapter lr")
    assert "| decoder_only | 0.001 | 0.0001 | 52.00 (test) | 50.00 (val) | -2.00 | 0 |" in decoder
    assert "| lora | 0.01 | 0.1 | 61.00 (val) | 62.00 (test) | -1.00 | 0 |" in adapter


def test_the_zero_shot_row_is_in_every_table_and_each_method_is_paired_with_it(tmp_path):
    for seed, (zero, ref, tcur) in enumerate([(80.0, 60.0, 62.0), (81.0, 70.0, 69.0)]):
        fake_run(tmp_path / "runs" / f"{seed}_decoder_only", "decoder_only", ref, seed, zero_shot=zero)
        fake_run(tmp_path / "runs" / f"{seed}_tcurlora", "tcurlora", tcur, seed, {"rank": 8, "groups": ["attn"]}, zero_shot=zero)
    tables.report(tmp_path)
    rows = read_csv(tmp_path / "comparison.csv")
    zero = [r for r in rows if r["method"] == "zero_shot"]
    assert [(r["seed"], float(r["dice"]), float(r["hd95"])) for r in zero] == [("0", 80.0, 50.0), ("1", 81.0, 50.0)]
    tcur = {r["seed"]: float(r[constants.VS_ZERO_SHOT]) for r in rows if r["method"] == "tcurlora"}
    assert tcur == {"0": -18.0, "1": -12.0}  # below the untouched model: shown so
    header = [c.strip() for c in (tmp_path / "comparison.md").read_text().splitlines()[0].strip("|").split("|")]
    table = {row[0]: dict(zip(header, row)) for row in table_rows((tmp_path / "comparison.md").read_text())}
    assert list(table)[0] == "zero_shot" and table["zero_shot"]["Dice %"] == "80.50 ± 0.71"
    assert table["tcurlora"]["Δ Dice vs zero-shot"] == "-15.00 ± 4.24"
    assert table["zero_shot"]["Δ Dice vs decoder-only"] == "+15.50 ± 6.36"  # decoder-only is 15.5 points below it


def test_runs_from_several_sweeps_are_collected_in_the_papers_order(tmp_path):
    """Methods split over two sweeps (e.g. two machines), their folders moved under one OUT/runs."""
    for sweep, job, method, dice in (("a", 0, "tcurlora", 12.0), ("b", 0, "full", 10.0), ("b", 1, "lora", 11.0)):
        fake_run(tmp_path / "runs" / sweep / f"{job}_demo_{method}", method, dice)
    tables.report(tmp_path)
    assert [row[0] for row in table_rows((tmp_path / "comparison.md").read_text())] == ["full", "lora", "tcurlora"]
    assert {r["method"]: float(r["dice"]) for r in read_csv(tmp_path / "comparison.csv")} == {
        "full": 10.0, "lora": 11.0, "tcurlora": 12.0}


def test_dice_is_paired_with_decoder_only_of_the_same_seed(tmp_path):
    """Common random numbers: a method's Dice minus decoder-only's at the same seed, mean ± std and k/n seeds above."""
    for seed, (ref, lora, tcur) in enumerate([(60.0, 63.0, 61.0), (70.0, 69.0, 70.5), (80.0, 84.0, None)]):
        fake_run(tmp_path / "runs" / f"{seed}_decoder_only", "decoder_only", ref, seed)
        fake_run(tmp_path / "runs" / f"{seed}_lora", "lora", lora, seed)
        if tcur is not None:
            fake_run(tmp_path / "runs" / f"{seed}_tcurlora", "tcurlora", tcur, seed, {"rank": 8, "groups": ["attn"]})
    fake_run(tmp_path / "runs" / "3_tcurlora", "tcurlora", 99.0, 3, {"rank": 8, "groups": ["attn"]})  # no partner
    fake_run(tmp_path / "ablation" / "rank" / "0_tcurlora", "tcurlora", 58.0, 0, {"rank": 1, "groups": ["attn"]})
    tables.report(tmp_path)
    paired = {(r["method"], r["seed"]): r[constants.PAIRED] for r in read_csv(tmp_path / "comparison.csv")}
    assert paired[("decoder_only", "0")] == "" and paired[("tcurlora", "3")] == ""
    assert float(paired[("lora", "1")]) == -1.0 and float(paired[("tcurlora", "1")]) == 0.5
    header, _, *body = (tmp_path / "comparison.md").read_text().splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {row[0]: dict(zip(columns, row)) for row in table_rows((tmp_path / "comparison.md").read_text())}
    assert rows["lora"]["Δ Dice vs decoder-only"] == "+2.00 ± 2.65" and rows["lora"]["above decoder-only"] == "2/3"
    assert rows["tcurlora"]["Δ Dice vs decoder-only"] == "+0.75 ± 0.35" and rows["tcurlora"]["above decoder-only"] == "2/2"
    assert rows["decoder_only"]["Δ Dice vs decoder-only"] == "–" and rows["tcurlora"]["n seeds"] == "3"
    # the ablation pairs with the comparison's decoder-only runs too
    ablation = {r["rank"]: r for r in read_csv(tmp_path / "ablation.csv") if r["seed"] == "0"}
    assert float(ablation["1"][constants.PAIRED]) == -2.0 and float(ablation["8"][constants.PAIRED]) == 1.0


def test_ablation_leaves_out_and_takes_in_the_comparisons_tcurlora_runs(tmp_path):
    sweeps = sweeping.ablation_sweeps([1, 2, 4, 8, 16], ["attn", "mlp", "all"], [0], "demo", groups_rank=8, grid=False,
                                     done=[(8, "all")])
    assert "peft.rank=1,2,4,16" in sweeps["rank"] and "peft.groups=[attn],[mlp_up,mlp_down]" in sweeps["groups"]
    assert sweeping.comparison_setting("demo", []) == (8, "all")  # configs/peft/tcurlora.yaml
    assert sweeping.comparison_setting("demo", ["peft.rank=4", "hydra.job.chdir=false"]) == (4, "all")
    assert sweeping.comparison_setting("demo", ["peft.groups=[attn]"]) == (8, "attn")
    assert sweeping.comparison_setting("demo", ["trainer.max_epoch=1"]) is None  # a typo: the runs report it
    assert sweeping.comparison_setting("demo", ["peft.rank=eight"]) is None
    all3 = {"groups": ["attn", "mlp_up", "mlp_down"]}
    for seed in (0, 1):
        fake_run(tmp_path / "runs" / f"{seed}_tcurlora", "tcurlora", 50.0 + seed, seed, {"rank": 8, **all3})
        fake_run(tmp_path / "runs" / f"{seed}_lora", "lora", 40.0, seed, {"rank": 32})
    fake_run(tmp_path / "ablation" / "rank" / "0_tcurlora", "tcurlora", 30.0, 0, {"rank": 1, **all3})
    fake_run(tmp_path / "ablation" / "rank" / "1_tcurlora", "tcurlora", 99.0, 1, {"rank": 8, **all3})  # ran twice
    tables.report(tmp_path)
    rows = {(r["rank"], r["seed"]): float(r["dice"]) for r in read_csv(tmp_path / "ablation.csv")}
    assert rows == {("1", "0"): 30.0, ("8", "1"): 99.0, ("8", "0"): 50.0}  # the ablation's own run wins


def test_expand_follows_hydras_sweep_order():
    runs = sweeping.expand(["+experiment=demo", "seed=0,1", "peft=lora,tcurlora", "data.roi_size=[32,32,32]"])
    assert runs == [["+experiment=demo", f"seed={s}", f"peft={m}", "data.roi_size=[32,32,32]"]
                    for s in (0, 1) for m in ("lora", "tcurlora")]


def test_parallel_queue_is_seed_major_over_all_sweeps():
    # (the ablation's Hydra sweeps vary the seed fastest: its jobs 0 and 2 are seed 0)
    sweeps = {"runs": sweeping.comparison_overrides(["lora", "tcurlora"], [0, 1], "demo"),
              **{f"ablation/{k}": v for k, v in sweeping.ablation_sweeps([1, 8], ["attn", "all"], [0, 1], "demo", 8, False).items()}}
    queue = sweeping.job_queue(sweeps)
    assert [(name, num) for name, num, _ in queue] == [
        ("runs", 0), ("runs", 1), ("ablation/rank", 0), ("ablation/rank", 2), ("ablation/groups", 0),
        ("runs", 2), ("runs", 3), ("ablation/rank", 1), ("ablation/rank", 3), ("ablation/groups", 1)]
    assert [sweeping._value(run, "seed") for _, _, run in queue] == ["0"] * 5 + ["1"] * 5
    assert "peft.groups=[attn]" in queue[4][2] and "peft.rank=8" in queue[4][2]


def test_parallel_jobs_give_the_same_tables_as_one_sweep(tmp_path):
    """--jobs 2: single runs two at a time into the sweep's folders, one log per run, collected as usual."""
    root = write_official_dataset(tmp_path / "toy")
    out = tmp_path / "out"
    result = run_compare(tmp_path, "--jobs", "2", "--methods", "decoder_only", "tcurlora", "--seeds", "0", "1",
                         "--no-ablation", "--out", str(out), "--", *tiny_overrides(root))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = read_csv(out / "comparison.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [("decoder_only", "0"), ("decoder_only", "1"),
                                                              ("tcurlora", "0"), ("tcurlora", "1")]
    assert all(0 <= float(r["dice"]) <= 100 for r in rows)
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["0_decoder_only", "1_tcurlora", "2_decoder_only", "3_tcurlora"]
    assert len(list((out / "logs").glob("runs_*.log"))) == 4 and result.stdout.count(": done in") == 4
    assert [r[0] for r in table_rows((out / "comparison.md").read_text())] == ["decoder_only", "tcurlora"]

    # the same call again: every run finished earlier, none trains; a run stopped in its test evaluation only evaluates
    args = ["--jobs", "2", "--methods", "decoder_only", "tcurlora", "--seeds", "0", "1", "--no-ablation", "--out", str(out),
            "--", *tiny_overrides(root)]
    again = run_compare(tmp_path, *args)
    assert again.returncode == 0 and "4 runs finished earlier" in again.stdout and ": done in" not in again.stdout
    assert read_csv(out / "comparison.csv") == rows
    summaries = {p.parent.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/eval/summary.json")}
    (out / "runs" / "3_tcurlora" / "eval" / "summary.json").unlink()
    third = run_compare(tmp_path, *args)
    assert third.returncode == 0 and "3 runs finished earlier" in third.stdout and third.stdout.count(": done in") == 1
    log = (out / "logs" / "runs_3.log").read_text()
    assert "already finished" in log and "best validation Dice" not in log  # evaluated, not trained again
    assert (out / "runs" / "3_tcurlora" / "eval" / "summary.json").is_file()
    assert {p.parent.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/eval/summary.json")
            if p.parent.parent.name != "3_tcurlora"} == {k: v for k, v in summaries.items() if k != "3_tcurlora"}
    assert read_csv(out / "comparison.csv") == rows


def test_parallel_runs_evaluate_the_zero_shot_model_once_per_seed(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(sweeping.subprocess, "run", lambda command, **kw: commands.append(command)
                        or subprocess.CompletedProcess(command, 0))
    sweeps = {"runs": sweeping.comparison_overrides(["decoder_only", "lora", "tcurlora"], [0, 1], "demo")}
    sweeping.run_parallel(sweeps, [], tmp_path, jobs=2)
    skips = sorted((sweeping._value(c, "seed"), sweeping._value(c, "peft"), "trainer.evaluate_pretrained=false" in c)
                   for c in commands)
    assert skips == [("0", "decoder_only", False), ("0", "lora", True), ("0", "tcurlora", True),
                     ("1", "decoder_only", False), ("1", "lora", True), ("1", "tcurlora", True)]
    assert all("trainer.resume=auto" in c for c in commands)


def test_parallel_failed_run_names_its_sweep_and_the_others_finish(tmp_path):
    root = write_official_dataset(tmp_path / "toy")
    out = tmp_path / "out"
    # a rank wider than the tiny ViT (hidden 48) fails for tCURLoRA only
    result = run_compare(tmp_path, "--jobs", "2", "--methods", "decoder_only", "tcurlora", "--seeds", "0",
                         "--ranks", "64", "--groups", "all", "--no-attribution", "--out", str(out), "--", *tiny_overrides(root))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: sweeps failed: ablation/rank")
    assert "FAILED (exit 2" in result.stdout
    assert [r["method"] for r in read_csv(out / "comparison.csv")] == ["decoder_only", "tcurlora"]


def test_parallel_ctrl_c_stops_the_sweep_and_starts_no_more_runs(tmp_path):
    """Ctrl-C at a terminal reaches the script and its running runs (one process group): the runs save and stop,
    no queued run starts, and the script names --collect-only."""
    root = write_official_dataset(tmp_path / "toy")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--jobs", "2", "--methods", "decoder_only", "tcurlora", "--seeds", "0", "1", "2",
         "--no-ablation", "--out", str(out), "--", *tiny_overrides(root), "trainer.max_epochs=60",
         "trainer.val_interval=1000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=terminal_sigint)
    deadline = time.time() + 300
    while len(list((out / "runs").glob("*/checkpoints/last.pt"))) < 2:  # the first run alone, then two at a time
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("stopped by Ctrl-C") and "--collect-only" in stderr
    assert len(list((out / "runs").iterdir())) == 3  # of 6 runs: the first and the two running; none started after


def test_no_comparison_runs_only_the_ablation(tmp_path, monkeypatch):
    seen = {}

    def fake_parallel(sweeps, extra, out, jobs):
        seen.update(sweeps)
        return []

    monkeypatch.setattr(sweeping, "run_parallel", fake_parallel)
    compare.main(["--no-comparison", "--jobs", "2", "--seeds", "0", "--out", str(tmp_path)])
    assert list(seen) == ["ablation/rank", "ablation/groups", *(f"attribution/{name}" for name in constants.ATTRIBUTION)]
    assert all("peft=tcurlora" in overrides for name, overrides in seen.items() if name.startswith("ablation/"))
    assert "peft.train_extra=[encoder1,encoder2,encoder3,encoder4]" in seen["attribution/tcurlora+skip_encoders"]


def test_attribution_trains_the_parts_of_the_experiments_backbone():
    unetr, swin = (sweeping.attribution_sweeps([0], experiment) for experiment in ("demo", "demo_swin"))
    assert set(unetr) == set(swin) == set(constants.ATTRIBUTION)
    assert "peft.train_extra=[vit.blocks]" in unetr["decoder_only+vit_blocks"]
    assert "peft.train_extra=[encoder1,encoder2,encoder3,encoder4,encoder10]" in swin["decoder_only+skip_encoders"]
    assert "peft.train_extra=[swinViT.patch_embed]" in swin["decoder_only+patch_embedding"]
    blocks = swin["decoder_only+vit_blocks"][2]
    assert blocks == "peft.train_extra=[" + ",".join(f"swinViT.layers{i}.0.blocks" for i in range(1, 5)) + "]"


def test_nothing_to_run_is_one_line_error(tmp_path):
    result = run_compare(tmp_path, "--no-comparison", "--no-ablation", "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.startswith("error: --no-comparison with --no-ablation")
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "out").exists()


def test_parallel_first_run_gets_every_core_then_the_runs_share_them(tmp_path, monkeypatch):
    threads = []

    def fake_run(command, env, stdout, stderr):
        threads.append(env["OMP_NUM_THREADS"])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweeping.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(sweeping.subprocess, "run", fake_run)
    sweeps = {"runs": sweeping.comparison_overrides(["decoder_only", "tcurlora"], [0, 1], "demo")}
    assert sweeping.run_parallel(sweeps, [], tmp_path, jobs=4) == []
    assert threads == ["8", "2", "2", "2"]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins for every run
    threads.clear()
    sweeping.run_parallel(sweeps, [], tmp_path, jobs=4)
    assert threads == ["3"] * 4


def test_rows_that_train_no_decoder_stay_selected_when_the_decoder_lr_is_chosen():
    """--lrs chooses decoder-only's lr on validation; zero_shot and nnunet rows have no decoder lr and must stay in
    the tables (they were dropped as 'not at the chosen lr')."""
    rows = [{"method": "decoder_only", "seed": "0", "lr": lr, "adapter_lr": "", "val_dice": val}
            for lr, val in (("0.001", "60.0"), ("0.01", "70.0"))]
    rows += [{"method": m, "seed": "0", "lr": "", "adapter_lr": "", "val_dice": ""} for m in ("zero_shot", "nnunet")]
    chosen = collect.select(rows, lr_grid=[1e-3, 1e-2])
    assert chosen["lr"] == 1e-2
    assert {(r["method"], r["lr"]) for r in rows if r["selected"]} == {("decoder_only", "0.01"), ("zero_shot", ""),
                                                                      ("nnunet", "")}

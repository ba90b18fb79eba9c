"""Issue 29's shots sweep: data.split.shots, the demo's growing training pool, compare.py --shots end to end."""

from __future__ import annotations

import json

import pytest
import torch

from tcurlora_seg.compare import constants
from tcurlora_seg.data import demo
from tcurlora_seg.data.splits import take_shots
from tcurlora_seg.errors import UserError
from tests.conftest import make_tiny_unetr, write_official_dataset
from tests.test_compare import read_csv, run_compare, tiny_overrides


def test_shots_keeps_the_first_k_training_cases_and_every_val_and_test_case():
    cases = {"train": ["c", "a", "b"], "val": ["v"], "test": ["t1", "t2"]}
    assert take_shots(cases, {"shots": 2}) == {"train": ["c", "a"], "val": ["v"], "test": ["t1", "t2"]}
    assert take_shots(cases, {"shots": None}) == cases
    with pytest.raises(UserError, match="data.split.shots=4: the split has only 3"):
        take_shots(cases, {"shots": 4})
    with pytest.raises(UserError, match="data.split.shots=0"):
        take_shots(cases, {"shots": 0})


@pytest.mark.slow  # builds a small demo task twice with the real generator (~30 s)
def test_growing_the_demo_pool_adds_cases_and_changes_none(tmp_path, monkeypatch):
    # a small task (2 train, 1 val, 1 test) keeps the test short; the generator is the real one
    monkeypatch.setitem(demo.DEMO_TASKS, "necrosis", (5, 2, 1, 1))
    root = demo.build_demo(tmp_path / "demo", tasks=["necrosis"])
    (root / "source_unetr.pt").write_bytes(b"cached source model")  # must survive the growth untouched
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != demo.MANIFEST}
    listed = demo.build_pool(root, "necrosis", 3)
    assert listed.read_text().split() == ["sub1", "sub2", "sub5"]  # the task's own train cases, then one after test
    demo.build_pool(root, "necrosis", 4)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != demo.MANIFEST}
    changed = {str(k) for k in before if k.name != demo.POOL_LIST and after[k] != before[k]}
    assert not changed  # val, test, train.txt, the first pool cases and the source model: as they were
    assert listed.read_text().split() == ["sub1", "sub2", "sub5", "sub6"] == demo.pool_ids("necrosis", 4)
    assert (root / "necrosis" / "train.txt").read_text().split() == ["sub1", "sub2"]  # default runs: unchanged
    assert json.loads((root / demo.MANIFEST).read_text())["tasks"]["necrosis"]["pool"] == 4
    # a smaller pool asked later keeps the larger one (its first cases are the same)
    demo.build_pool(root, "necrosis", 2)
    assert listed.read_text().split() == demo.pool_ids("necrosis", 4)
    # the per-subject seeding: a fresh cache with a pool of 4 from the start has the same files
    other = demo.build_demo(tmp_path / "other", tasks=["necrosis"])
    demo.build_pool(other, "necrosis", 4)
    for sid in ["sub4", "sub6"]:  # the test case and the last pool case
        assert (other / "necrosis" / sid / f"{sid}_img.nii.gz").read_bytes() == (root / "necrosis" / sid / f"{sid}_img.nii.gz").read_bytes()


@pytest.mark.slow  # four tiny training runs through compare.py (~2 min on a shared CPU)
def test_shots_sweep_labels_runs_by_k_and_writes_the_table_and_figure(tmp_path):
    root = write_official_dataset(tmp_path / "toy")
    source = tmp_path / "source.pt"
    torch.save({"model": make_tiny_unetr(seed=7).state_dict(), "config": {"seed": 7}}, source)
    out = tmp_path / "out"
    # scratch at a fixed lr (--method-lrs), decoder-only at its default
    result = run_compare(tmp_path, "--methods", "decoder_only", "scratch", "--seeds", "0", "--shots", "1", "3",
                         "--method-lrs", "scratch=0.005", "--jobs", "2", "--out", str(out), "--",
                         *tiny_overrides(root), f"model.pretrained={source}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = read_csv(out / "comparison.csv")
    assert list(rows[0]) == constants.FIELDS
    assert {(r["method"], r["adapter_lr"]) for r in rows if r["method"] != "zero_shot"} == {
        ("scratch", "0.005"), ("decoder_only", "")}
    assert sorted((r["method"], r["shots"]) for r in rows) == [
        ("decoder_only", "1"), ("decoder_only", "3"), ("scratch", "1"), ("scratch", "3"), ("zero_shot", "")]
    for row in rows[1:]:  # labelled by k in the folder too; the same val and test cases at every k
        split = json.loads((tmp_path / row["run_dir"] / "split.json").read_text())
        assert f"shots_0{row['shots']}" in row["run_dir"]
        assert [c["id"] for c in split["train"]] == ["sub1", "sub2", "sub3"][: int(row["shots"])]
        assert ([c["id"] for c in split["val"]], [c["id"] for c in split["test"]]) == (["sub4"], ["sub5", "sub6"])
    # decoder-only pairs with scratch within each k; zero-shot is the level of every k
    text = (out / "shots.md").read_text()
    assert "| method | k = 1 | k = 3 |" in text and "Where transfer beats training from scratch" in text
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "k =" not in line][:3] == \
        ["zero_shot", "scratch", "decoder_only"]
    assert "- decoder_only:" in text and "- zero_shot:" in text
    assert (out / "shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the comparison table has one row per k and method
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].startswith("| shots | method |")


@pytest.mark.parametrize("args, message", [
    (["--method-lrs", "decoder_only=1e-3"], "--method-lrs decoder_only: it trains no adapter"),
    (["--methods", "full", "--method-lrs", "lora=1e-3"], "--method-lrs lora: not among --methods full"),
    (["--method-lrs", "full=1e-3", "--adapter-lrs"], "give one or the other"),
    (["--method-lrs", "full:1e-3"], "'full:1e-3': give METHOD=LR"),
])
def test_fixed_method_lrs_refuse_what_they_cannot_mean(tmp_path, args, message):
    result = run_compare(tmp_path, *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out" / "runs").exists()  # refused before any run


def _cell(values: dict[tuple[str, str], float]) -> dict:
    dice = [sum(v for (s, _), v in values.items() if s == seed) / 5 for seed in ("0", "1")]
    return {"dice": (sum(dice) / 2, 0.0), "n": 2, "cases": values}


def test_the_winner_at_each_k_is_real_only_when_its_lead_over_the_runner_up_excludes_zero():
    from tcurlora_seg.compare.shots import winner_lines, winners

    cases = [(seed, f"c{i}") for seed in ("0", "1") for i in range(5)]
    base = {key: 40.0 + 5 * i for i, key in enumerate(cases)}
    steady = {key: v + 3.0 for key, v in base.items()}  # +3 on every case: a real lead
    mixed = {key: v + (2.0 if i % 2 else -1.5) for i, (key, v) in enumerate(base.items())}  # changes sign: noise
    table = {"zero_shot": {1: _cell({k: 10.0 for k in cases}), 5: _cell({k: 10.0 for k in cases})},
             "scratch": {1: _cell(base), 5: _cell(base)},
             "full": {1: _cell(steady), 5: _cell(mixed)},
             "tcurlora": {5: _cell(base)}}
    result = winners([1, 5], table)
    assert (result[1][0], result[1][1]) == ("full", "scratch") and result[1][2].real
    assert result[5][0] == "full" and result[5][1] in ("scratch", "tcurlora") and not result[5][2].real
    lines = winner_lines([1, 5], table)
    assert lines[0].startswith("- k = 1: **full**") and "a real lead" in lines[0]
    assert lines[1].startswith("- k = 5: **full**") and "not distinguishable" in lines[1]

from __future__ import annotations

from pathlib import Path

import pytest

from data_helpers import compose_data, make_official
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.data.splits import seeded_split, write_split
from tcurlora_seg.errors import UserError

IDS = [f"sub{i}" for i in range(1, 148)]


def test_seeded_split_is_deterministic_disjoint_and_complete() -> None:
    cfg = {"seed": 3, "train": 0.1, "val": 5, "test": None}
    a = seeded_split(IDS, cfg)
    assert a == seeded_split(list(reversed(IDS)), cfg)  # input order does not matter
    assert a != seeded_split(IDS, {**cfg, "seed": 4})
    assert len(a["train"]) == 15  # 10 % of 147, rounded
    assert len(a["val"]) == 5 and len(a["test"]) == 127
    everything = a["train"] + a["val"] + a["test"]
    assert len(set(everything)) == len(everything) == len(IDS)


def test_seeded_split_honours_exclusions_and_paper_counts() -> None:
    excluded = ["sub8", "sub35", "sub65", "sub85", "sub134"]
    ids = [f"sub{i}" for i in range(1, 136)]
    out = seeded_split(ids, {"seed": 0, "train": 5, "val": 0, "test": None, "exclude": excluded})
    assert len(out["train"]) == 5 and len(out["test"]) == 125
    assert not set(excluded) & set(sum(out.values(), []))


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"train": 100, "val": 100, "test": None}, "only 147"),
        ({"train": None, "val": 1, "test": None}, "only one"),
        ({"train": 1.5, "val": 0, "test": None}, "fraction"),
        ({"train": -1, "val": 0, "test": None}, "count"),
    ],
)
def test_bad_split_configs_are_user_errors(cfg: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        seeded_split(IDS, cfg)


def test_written_split_repeats_the_run(tmp_path: Path) -> None:
    root = make_official(tmp_path / "ds", 9)
    cfg = compose_data("official", [f"data.root={root}", "data.split.train=4", "data.split.val=2", "data.split.seed=7"])
    cases = load_cases(cfg)
    path = write_split(cases, tmp_path / "run")
    assert path == tmp_path / "run" / "split.json"
    again = load_cases(compose_data("official", [f"data.root={root}", f"data.split.file={path}", "data.split.seed=99"]))
    assert again == cases
    with pytest.raises(UserError, match="data.split.file"):
        load_cases({**cfg, "split": {"file": str(tmp_path / "missing.json")}})

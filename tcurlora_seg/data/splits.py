"""Train / val / test splits: from list files, from a saved split.json, or seeded by counts or fractions.

The split actually used is written as ``split.json`` into the run folder (``write_split``); pointing
``data.split.file`` at that file repeats the run on exactly the same cases.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tcurlora_seg.errors import UserError

__all__ = ["SPLITS", "read_id_list", "seeded_split", "read_split_file", "write_split", "take_shots"]

SPLITS = ("train", "val", "test")


def read_id_list(path: Path) -> list[str]:
    """Case ids from a list file (official format: one subject folder per line; the id is its last component)."""
    ids = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ids.append(line.rstrip("/").split("/")[-1])
    return ids


def _count(value: Any, n: int, key: str) -> int | None:
    """A count (int) or a fraction (float in (0, 1]) of n, rounded to the nearest case; None means 'the rest'."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UserError(f"data.split.{key}={value!r}: use a case count (int >= 0), a fraction (0 < float <= 1) or null for the rest")
    if isinstance(value, float):
        if value > 1:
            raise UserError(f"data.split.{key}={value}: a fraction must be <= 1; write a count as an integer")
        return int(round(value * n))
    return int(value)


def seeded_split(ids: Sequence[str], split_cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """Shuffle ``ids`` (sorted first, so the file system order does not matter) with ``split.seed`` and cut them.

    ``split.train`` / ``val`` / ``test`` are counts or fractions; at most one of them may be null (it takes the
    rest). ``split.exclude`` ids are dropped before the split.
    """
    exclude = set(split_cfg.get("exclude") or [])
    pool = sorted(i for i in ids if i not in exclude)
    n = len(pool)
    counts = {s: _count(split_cfg.get(s), n, s) for s in SPLITS}
    rest = [s for s in SPLITS if counts[s] is None]
    if len(rest) > 1:
        raise UserError(f"data.split: only one of train/val/test may be null (the rest); got {', '.join(rest)} null")
    fixed = sum(c for c in counts.values() if c is not None)
    if fixed > n:
        raise UserError(f"data.split: train+val+test = {fixed} cases but only {n} are available after exclusions; lower the counts")
    if rest:
        counts[rest[0]] = n - fixed
    order = np.random.default_rng(int(split_cfg.get("seed", 0))).permutation(n)
    shuffled = [pool[i] for i in order]
    out, start = {}, 0
    for s in SPLITS:
        out[s] = shuffled[start : start + counts[s]]
        start += counts[s]
    return out


def read_split_file(path: Path) -> dict[str, list[str]]:
    """Ids per split from a split.json written by ``write_split`` (items may be ids or case dicts)."""
    if not path.is_file():
        raise UserError(f"data.split.file={path}: no such file; give the split.json of an earlier run or null")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"data.split.file={path}: not valid JSON ({err.msg}); give the split.json of an earlier run") from err
    return {s: [item["id"] if isinstance(item, dict) else str(item) for item in raw.get(s, [])] for s in SPLITS}


def write_split(cases: Mapping[str, Sequence[Mapping[str, Any]]], run_dir: str | Path) -> Path:
    """Write the cases used by a run to ``run_dir/split.json`` (ids and paths) so the run can be audited and repeated."""
    path = Path(run_dir) / "split.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {s: [dict(c) for c in cases.get(s, [])] for s in SPLITS}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def take_shots(cases: Mapping[str, Sequence[Any]], split_cfg: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The first ``split.shots`` training cases of ``cases`` (null: all); validation and test as they are.

    The training list's own order decides: a list file's, or the seeded shuffle of ``seeded_split``, so k cases are
    a fixed seeded subset of k + 1 and every k of a shots sweep is scored on the same validation and test cases.
    """
    shots = split_cfg.get("shots")
    if shots is None:
        return {s: list(cases.get(s, [])) for s in SPLITS}
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise UserError(f"data.split.shots={shots!r}: give the number of training cases to keep (an int >= 1) or null for all")
    if shots > len(cases["train"]):
        raise UserError(f"data.split.shots={shots}: the split has only {len(cases['train'])} training cases; lower it "
                        "(the demo: raise its pool, data.demo.train={shots})".replace("{shots}", str(shots)))
    return {**{s: list(cases.get(s, [])) for s in SPLITS}, "train": list(cases["train"][:shots])}

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_helpers import compose_data
from tcurlora_seg.data.datasets import build_dataset, build_loader
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.errors import UserError


@pytest.mark.parametrize("cache", ["none", "memory", "disk"])
def test_cache_modes_give_the_same_volumes(official_root: Path, tmp_path: Path, cache: str) -> None:
    cfg = compose_data("official", [f"data.root={official_root}", f"data.cache={cache}", f"data.cache_dir={tmp_path / 'pc'}"])
    cases = load_cases(cfg)
    plain = build_dataset({**cfg, "cache": "none"}, cases["test"], "test")[0]
    item = build_dataset(cfg, cases["test"], "test")[0]
    assert torch.equal(item["image"], plain["image"]) and torch.equal(item["label"], plain["label"])
    assert torch.equal(item["image"].affine, plain["image"].affine)  # metadata survives the cache
    if cache == "disk":
        assert list((tmp_path / "pc" / "test").glob("*.pt"))


def test_loader_batches_training_crops_and_whole_validation_volumes(official_root: Path) -> None:
    cfg = compose_data("official", [f"data.root={official_root}", "data.roi_size=[4,4,4]", "data.batch_size=2", "data.num_workers=0"])
    cases = load_cases(cfg)
    train = next(iter(build_loader(cfg, build_dataset(cfg, cases["train"], "train"), "train")))
    assert tuple(train["image"].shape) == (2, 1, 4, 4, 4) == tuple(train["label"].shape)
    val = next(iter(build_loader(cfg, build_dataset(cfg, cases["val"], "val"), "val")))
    assert tuple(val["image"].shape) == (1, 1, 6, 7, 5) and val["id"] == ["sub3"]


def test_unknown_cache_mode_is_a_user_error(official_root: Path) -> None:
    cfg = compose_data("official", [f"data.root={official_root}", "data.cache=ram"])
    with pytest.raises(UserError, match="data.cache"):
        build_dataset(cfg, load_cases(cfg)["val"], "val")

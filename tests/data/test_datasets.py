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


def test_training_stream_ignores_random_numbers_the_model_draws(official_root: Path) -> None:
    """Common random numbers: the case order and crops of a seed do not depend on draws from the global generator
    between batches (peft's LoHa and LoKr draw one per layer per step); without the loader's own generator they do."""
    cfg = compose_data("official", [f"data.root={official_root}", "data.roi_size=[4,4,4]", "data.batch_size=1",
                                    "data.num_workers=0"])
    cases = load_cases(cfg)

    def stream(draws: int, seed: int | None) -> tuple[list, list]:
        torch.manual_seed(0)
        loader = build_loader(cfg, build_dataset(cfg, cases["train"], "train"), "train", seed=seed)
        ids, crops = [], []
        for _ in range(8):  # epochs
            for batch in loader:
                ids += batch["id"]
                crops.append(batch["image"].clone())
                torch.rand(draws)  # a method drawing random numbers in its forward pass
        return ids, crops

    ids, crops = stream(0, seed=7)
    ids_drawn, crops_drawn = stream(3, seed=7)
    assert ids == ids_drawn and all(torch.equal(a, b) for a, b in zip(crops, crops_drawn))
    assert len(set(ids[::2])) == 2  # the order does change between epochs
    assert stream(3, seed=None)[0] != stream(0, seed=None)[0]  # the global generator's stream would have shifted

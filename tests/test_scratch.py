"""peft=scratch: the backbone trained from its seeded random init, through the real entry point (issue 29)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tcurlora_seg.engine.evaluate import evaluate_run
from tcurlora_seg.engine.run import build_model, restore_model
from tests.conftest import make_tiny_unetr
from tests.test_train import only_run, tiny_run, train


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny scratch run given a "pretrained" model file (which it must ignore), evaluated after training."""
    from tests.conftest import write_official_dataset

    tmp = tmp_path_factory.mktemp("scratch")
    root = write_official_dataset(tmp / "toy")
    source = tmp / "source.pt"
    torch.save({"model": make_tiny_unetr(seed=7).state_dict(), "config": {"seed": 7}}, source)
    overrides = [o for o in tiny_run(root) if not o.startswith("peft.rank=")]  # scratch has no rank
    result = train(tmp, *overrides, "peft=scratch", f"model.pretrained={source}", "seed=3", "trainer.evaluate=true",
                   "trainer.evaluate_pretrained=true")
    assert result.returncode == 0, result.stderr[-2000:]
    return only_run(tmp), source


@pytest.mark.slow  # one tiny training run (~60 s on a shared CPU)
def test_scratch_run_does_not_load_the_pretrained_file(scratch_run):
    run, source = scratch_run
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.peft.name == "scratch" and cfg.model.pretrained is None  # the saved config says so
    # no zero-shot model: the random init is no transfer level
    assert not (run / "checkpoints" / "pretrained.pt").exists() and not (run / "eval_pretrained").exists()
    pretrained = torch.load(source, weights_only=True)["model"]
    start, report = build_model(cfg)
    assert report is None
    weights = {k: v for k, v in start.state_dict().items() if v.dtype.is_floating_point and v.numel() > 1 and v.std() > 0}
    assert weights.keys() <= pretrained.keys()  # the file would have fit: ignoring it was the run's choice
    assert not [k for k, v in weights.items() if torch.equal(v, pretrained[k])]
    # the start is the seeded random init: the same for the run's seed every time, another for another seed
    other = OmegaConf.merge(cfg, {"seed": 4})
    assert all(torch.equal(v, build_model(cfg)[0].state_dict()[k]) for k, v in weights.items())
    assert not any(torch.equal(v, build_model(other)[0].state_dict()[k]) for k, v in weights.items())
    # every parameter trained, from that start
    tuned, _, _ = restore_model(run, "best")
    assert all(p.requires_grad for p in tuned.parameters())
    assert any(not torch.equal(v, tuned.state_dict()[k]) for k, v in weights.items())


@pytest.mark.slow  # one tiny training run (~60 s on a shared CPU)
def test_scratch_run_restored_for_evaluation_matches_the_trained_one(scratch_run, tmp_path):
    run, _ = scratch_run
    after_training = json.loads((run / "eval" / "summary.json").read_text())
    again = evaluate_run(run, checkpoint="best", out_dir=tmp_path / "again", save_predictions=False, device="cpu",
                         progress=False, figures=False)
    assert again["foreground_mean"]["Dice"] == pytest.approx(after_training["foreground_mean"]["Dice"], abs=1e-6)
    # rebuilt twice, the same weights (the unloaded base is seeded, so the adapter's base fingerprint matches)
    first, second = restore_model(run, "adapter")[0].state_dict(), restore_model(run, "best")[0].state_dict()
    assert all(torch.equal(v, second[k]) for k, v in first.items())

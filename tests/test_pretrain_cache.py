"""The demo's cached source model is keyed by the generator version and the model config (ensure_pretrained)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tcurlora_seg.engine import pretrain
from tcurlora_seg.data import demo
from tcurlora_seg.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def demo_cfg(cache: Path, *extra: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=["+experiment=demo", f"data.root={cache / 'necrosis'}",
                                           f"data.pretrained={cache / 'source_unetr.pt'}", *extra])


def write_source(path: Path, model: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "config": {"model": model}}, path)


@pytest.fixture
def pretraining(monkeypatch, tmp_path):
    """Stands in for the pretraining subprocess: records its command and writes into tmp_path/demo a source model of
    the architecture the command asks for (``forced`` keys override it, as a pretraining that ignores them would)."""
    calls, forced = [], {}

    def run(command, env=None):
        calls.append(command)
        cfg = demo_cfg(tmp_path / "demo")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        for arg in command:
            if arg.startswith("model."):
                key, value = arg[len("model."):].split("=", 1)
                model[key] = json.loads(value) if value[:1] in "[tf0123456789" else value
        write_source(Path(cfg.model.pretrained), {**model, **forced})
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(pretrain.subprocess, "run", run)
    return calls, forced


def test_an_older_generator_versions_cache_is_rebuilt_and_its_source_model_retrained(tmp_path, pretraining):
    calls, _ = pretraining
    cache = tmp_path / "demo"
    cache.mkdir()
    (cache / "demo.json").write_text(json.dumps({"version": demo.DEMO_VERSION - 1, "seed": 0, "tasks": {}}))
    cfg = demo_cfg(cache)
    write_source(cache / "source_unetr.pt", OmegaConf.to_container(cfg.model, resolve=True))  # fits, but stale data
    pretrain.ensure_pretrained(cfg)
    assert len(calls) == 1 and "+experiment=demo_source" in calls[0]
    assert demo.demo_is_built(cache, tasks=["necrosis"]) and (cache / "source_unetr.pt").is_file()
    pretrain.ensure_pretrained(cfg)  # now current: reused
    assert len(calls) == 1


def test_a_source_model_of_another_architecture_is_pretrained_again_for_this_one(tmp_path, pretraining, monkeypatch):
    calls, _ = pretraining
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: None)
    cache = tmp_path / "demo"
    cfg = demo_cfg(cache, "model.feature_size=16")
    write_source(cache / "source_unetr.pt", {**OmegaConf.to_container(cfg.model, resolve=True), "feature_size": 8})
    pretrain.ensure_pretrained(cfg)
    assert len(calls) == 1 and "model.feature_size=16" in calls[0] and "data.roi_size=[48, 48, 48]" in calls[0]
    assert torch.load(cache / "source_unetr.pt", weights_only=True)["config"]["model"]["feature_size"] == 16


def test_a_source_model_that_still_does_not_fit_after_pretraining_is_one_error(tmp_path, pretraining, monkeypatch):
    calls, forced = pretraining
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: None)
    forced["hidden_size"] = 192  # the pretraining experiment ignores what it was asked for
    with pytest.raises(UserError, match="model.hidden_size: 192 vs 384"):
        pretrain.ensure_pretrained(demo_cfg(tmp_path / "demo"))
    assert len(calls) == 1


def test_a_model_that_cannot_build_fails_before_any_pretraining(tmp_path, pretraining, monkeypatch):
    calls, _ = pretraining
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: None)
    cfg = demo_cfg(tmp_path / "demo", "model=swin_unetr_demo", "data.roi_size=[48,48,48]",
                   f"data.pretrained={tmp_path / 'demo' / 'source_swin_unetr.pt'}", "data.pretrain_experiment=demo_swin_source")
    with pytest.raises(UserError, match=r"data.roi_size: \[48, 48, 48\] must be a multiple of 32"):
        pretrain.ensure_pretrained(cfg)
    assert not calls


def test_a_unetr_source_model_is_not_taken_for_a_swin_run(tmp_path):
    """The cache compares backbones first: a UNETR file where a Swin source model is expected is pretrained again."""
    source = tmp_path / "demo" / "source_swin_unetr.pt"
    cfg = demo_cfg(tmp_path / "demo", "model=swin_unetr_demo", "data.roi_size=[64,64,64]", f"data.pretrained={source}",
                   "data.pretrain_experiment=demo_swin_source")
    write_source(source, OmegaConf.to_container(demo_cfg(tmp_path / "demo").model, resolve=True))  # a UNETR's config
    assert pretrain._source_mismatch(source, cfg) == ["model.backbone: 'unetr' vs 'swin_unetr'"]

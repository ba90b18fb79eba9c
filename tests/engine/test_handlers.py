import json
import math
import sys
import time

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from tcurlora_seg.adapters import apply_adapter
from tcurlora_seg.engine.handlers import FiniteLoss, RunCheckpoints, TrainStats, overlay, spacing_of
from tcurlora_seg.errors import UserError
from tests.conftest import make_tiny_unetr


def engine_with_losses(losses):
    engine = Engine(lambda e, batch: [{"loss": torch.tensor(losses[e.state.iteration - 1])}])
    return engine


def test_non_finite_loss_stops_with_epoch_and_iteration(tmp_path):
    engine = engine_with_losses([0.5, 0.4, math.nan])
    FiniteLoss(tmp_path).attach(engine)
    with pytest.raises(UserError, match=r"loss became nan at epoch 1, iteration 3"):
        engine.run([0, 1, 2, 3], max_epochs=1)


def test_checkpoints_keep_last_k_epochs_and_last_with_optimizer(tmp_path):
    model = apply_adapter(make_tiny_unetr(), "tcurlora", rank=1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=12)
    engine = engine_with_losses([0.1] * 12)
    RunCheckpoints(tmp_path, model, optimizer, scheduler, {"seed": 0}, interval=2, keep_last=3, evaluator=None).attach(engine)
    engine.run([0, 1], max_epochs=6)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch_0004.pt", "epoch_0005.pt", "epoch_0006.pt", "last.pt"]
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (last["epoch"], last["iteration"]) == (6, 12) and {"optimizer", "scheduler"} <= last.keys()
    assert "optimizer" not in torch.load(tmp_path / "checkpoints" / "epoch_0005.pt", weights_only=True)


def test_ctrl_c_saves_last_whole_epoch_and_reraises(tmp_path):
    model = apply_adapter(make_tiny_unetr(), "tcurlora", rank=1)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=20)

    def step(engine, batch):
        if engine.state.iteration == 5:  # in the middle of epoch 3 (2 iterations per epoch)
            raise KeyboardInterrupt
        return [{"loss": torch.tensor(0.1)}]

    engine = Engine(step)
    RunCheckpoints(tmp_path, model, optimizer, scheduler, {}, interval=100, keep_last=0, evaluator=None).attach(engine)
    with pytest.raises(KeyboardInterrupt):
        engine.run([0, 1], max_epochs=10)
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (last["epoch"], last["iteration"]) == (2, 4)


def test_spacing_from_affine_and_overlay_shape():
    from monai.data import MetaTensor

    label = MetaTensor(torch.zeros(1, 4, 5, 6), affine=torch.diag(torch.tensor([0.8, 1.3, 2.5, 1.0])))
    assert spacing_of(label) == pytest.approx((0.8, 1.3, 2.5))
    image = np.random.rand(4, 5, 6)
    mask = np.zeros((4, 5, 6))
    mask[1:3, 1:3, 4] = 1
    panel = overlay(image, mask, mask)
    assert panel.shape == (4, 15, 3)
    assert panel[1, 5 + 1, 1] > panel[1, 10 + 1, 1]  # label panel tinted green, prediction panel red


def status_mb(field: str) -> float:
    return int(open("/proc/self/status").read().split(f"{field}:")[1].split()[0]) / 2**10


def test_train_stats_time_steps_without_validation_and_peak_memory_of_this_training(tmp_path):
    big = bytearray(400 * 2**20)  # an earlier job of the same process (Hydra multirun) touched 400 MB more
    big[::4096] = b"x" * len(big[::4096])
    del big
    before = status_mb("VmHWM") if sys.platform == "linux" else 0.0
    engine = Engine(lambda e, batch: time.sleep(0.01))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: time.sleep(0.2))  # validation: not a step
    TrainStats(tmp_path / "train_stats.json", trainable=123, device=torch.device("cpu")).attach(engine)
    engine.run([0, 1, 2], max_epochs=2)
    stats = json.loads((tmp_path / "train_stats.json").read_text())
    assert stats["trainable"] == 123 and stats["timed_steps"] == 5  # 6 steps, the first one is warm-up
    assert 0.01 <= stats["step_time_s"] < 0.1
    if sys.platform == "linux":  # the high-water mark was reset when training started
        assert 0 < stats["peak_memory_mb"] < status_mb("VmRSS") + 50 < before - 300

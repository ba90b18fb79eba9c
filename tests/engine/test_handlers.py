import json
import math
import sys
import time
from pathlib import Path

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


def nan_trainer(bad: set[int], where: str, mode: str, max_skips: int = 10, steps: int = 6):
    """A MONAI SupervisedTrainer on a linear model whose loss ("loss") or gradients ("grad") are NaN at ``bad`` steps."""
    from monai.engines import SupervisedTrainer

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    step = iter(range(1, steps + 1))

    def loss_function(pred, target):
        loss = ((pred - target) ** 2).mean()
        if next(step) in bad:
            if where == "loss":
                return loss * math.nan
            pred.register_hook(lambda grad: grad * math.nan)  # the loss stays finite, the gradients do not
        return loss

    data = [{"image": torch.randn(2, 3), "label": torch.randn(2, 1)} for _ in range(steps)]
    optimizer = torch.optim.Adam(net.parameters(), lr=0.1)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=optimizer, loss_function=loss_function)
    FiniteLoss(Path("ckpt"), mode, max_skips).attach(trainer)
    weights = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.append(net.weight.detach().clone()))
    return trainer, optimizer, weights


@pytest.mark.parametrize("where, what", [("loss", "loss became nan"), ("grad", "gradients became NaN/Inf")])
def test_non_finite_loss_or_gradient_stops_before_the_step(where, what):
    trainer, _, weights = nan_trainer({3}, where, "stop")
    with pytest.raises(UserError, match=f"{what} at epoch 1, iteration 3;.*start again \\(no checkpoint yet\\).*trainer.nonfinite=skip"):
        trainer.run()
    assert len(weights) == 2 and all(p.isfinite().all() for p in trainer.network.parameters())


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_skip_mode_skips_the_step_with_a_warning_and_goes_on(where, caplog):
    trainer, optimizer, weights = nan_trainer({2, 4}, where, "skip", max_skips=2)
    trainer.run()
    assert len(weights) == 6 and all(w.isfinite().all() for w in weights)
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[2], weights[3])  # steps 2 and 4: no update
    assert not torch.equal(weights[1], weights[2])
    assert optimizer.state[trainer.network.weight]["step"] == 4  # Adam's moments saw only the 4 good steps
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert len(skipped) == 2 and "epoch 1, iteration 2" in skipped[0] and "epoch 1, iteration 4" in skipped[1]


def test_skip_mode_stops_after_max_skips_in_a_row():
    trainer, _, weights = nan_trainer({2, 3, 4, 5}, "grad", "skip", max_skips=3)
    with pytest.raises(UserError, match=r"at epoch 1, iteration 4, 3 steps in a row \(trainer.max_nonfinite_skips=3\)"):
        trainer.run()
    assert all(w.isfinite().all() for w in weights)


@pytest.mark.parametrize("mode, skips, key", [("ignore", 10, "trainer.nonfinite"), ("skip", 0, "trainer.max_nonfinite_skips")])
def test_bad_nonfinite_options_are_refused(mode, skips, key):
    with pytest.raises(UserError, match=key):
        FiniteLoss(Path("ckpt"), mode, skips)


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

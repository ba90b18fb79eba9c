"""Training: MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator`` with stock and app handlers, built from config.

``fit(cfg, run_dir)`` is the whole loop: data check, model (+ pretrained + adapter), loaders, engines, checkpoints,
TensorBoard, resume. One ``build_*`` function per object; no hand-written loop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from ignite.contrib.handlers import ProgressBar
from ignite.engine import Events
from monai.data import set_track_meta
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import LrScheduleHandler, TensorBoardStatsHandler, ValidationHandler
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceLoss
from monai.transforms import AsDiscreted
from monai.utils import set_determinism
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter

from tcurlora_seg.adapters import count_trainable, load_adapter_state_dict
from tcurlora_seg.data.check import run_check
from tcurlora_seg.data.datasets import build_dataset, build_loader
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.engine.handlers import CaseMetrics, FiniteLoss, RunCheckpoints, TensorBoardValidation, TrainStats, first_loss
from tcurlora_seg.engine.run import build_model, resolve_device, save_run_config
from tcurlora_seg.errors import UserError

__all__ = ["build_loaders", "build_evaluator", "build_trainer", "fit"]

log = logging.getLogger("tcurlora_seg")


def build_loaders(cfg: DictConfig, run_dir: Path) -> tuple[Any, Any | None]:
    """Check every case (exit code 2 on problems, split.json into the run folder), then the train / val loaders."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    cases = load_cases(data)
    if run_check(data, cases, run_dir) != 0:
        raise SystemExit(2)
    if not cases["train"]:
        raise UserError(f"data.split gives no training case for data.root={data['root']}; set data.split.train")
    train = build_loader(data, build_dataset(data, cases["train"], "train"), "train")
    val = build_loader(data, build_dataset(data, cases["val"], "val"), "val") if cases["val"] else None
    return train, val


def _amp(cfg: DictConfig) -> dict[str, Any]:
    precision = cfg.trainer.precision
    if precision not in ("fp32", "bf16"):
        raise UserError(f"trainer.precision={precision!r}: choose fp32 or bf16")
    return {"amp": precision == "bf16", "amp_kwargs": {"dtype": torch.bfloat16} if precision == "bf16" else None}


def build_evaluator(cfg: DictConfig, model: torch.nn.Module, loader: Any, device: torch.device) -> tuple[SupervisedEvaluator, CaseMetrics]:
    """Sliding-window validation on whole volumes; Dice and HD95 (mm) per case into ``state.metrics``."""
    metrics = CaseMetrics(int(cfg.data.num_classes))
    inferer = SlidingWindowInferer(roi_size=list(cfg.data.roi_size), sw_batch_size=int(cfg.trainer.sw_batch_size),
                                   overlap=float(cfg.trainer.val_overlap), mode="gaussian")
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=loader, network=model, inferer=inferer,
        postprocessing=AsDiscreted(keys="pred", argmax=True), val_handlers=[metrics], **_amp(cfg),
    )
    return evaluator, metrics


def build_trainer(cfg: DictConfig, model: torch.nn.Module, loader: Any, device: torch.device) -> tuple[SupervisedTrainer, torch.optim.Optimizer, Any]:
    """Adam + polynomial decay per iteration (paper), Dice loss on softmax over both classes (paper)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optim.optimizer)(params)
    epoch_length = int(cfg.trainer.epoch_length or len(loader))
    total = int(cfg.trainer.max_epochs) * epoch_length
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=float(cfg.optim.poly_power))
    trainer = SupervisedTrainer(
        device=device, max_epochs=int(cfg.trainer.max_epochs), epoch_length=epoch_length, train_data_loader=loader,
        network=model, optimizer=optimizer, loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        inferer=SimpleInferer(), train_handlers=[LrScheduleHandler(scheduler, epoch_level=False, print_lr=False)],
        **_amp(cfg),
    )
    return trainer, optimizer, scheduler


def fit(cfg: DictConfig, run_dir: Path, resume: dict | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue ``resume``, a last.pt payload); returns the final state numbers."""
    set_determinism(int(cfg.seed))
    set_track_meta(True)
    device = resolve_device(cfg.trainer.device)
    save_run_config(cfg, run_dir)
    train_loader, val_loader = build_loaders(cfg, run_dir)
    model, report = build_model(cfg)
    if report is not None:
        log.info(report.summary())
    if resume is not None:
        load_adapter_state_dict(model, resume["adapter"])
    model.to(device)
    log.info(f"{cfg.peft.name}: {count_trainable(model):,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters")

    trainer, optimizer, scheduler = build_trainer(cfg, model, train_loader, device)
    evaluator = metrics = None
    if val_loader is not None:
        evaluator, metrics = build_evaluator(cfg, model, val_loader, device)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoints = RunCheckpoints(run_dir, model, optimizer, scheduler, config, int(cfg.trainer.checkpoint_interval),
                                 int(cfg.trainer.keep_last_epochs), evaluator)
    checkpoints.attach(trainer)  # first: its Ctrl-C handler must run before others re-raise
    # .get: a run folder written before these keys existed still resumes
    FiniteLoss(run_dir / "checkpoints", cfg.trainer.get("nonfinite", "stop"), cfg.trainer.get("max_nonfinite_skips", 10)).attach(trainer)
    TrainStats(run_dir / "train_stats.json", count_trainable(model), device).attach(trainer)
    if evaluator is not None:
        interval = int(cfg.trainer.val_interval)
        ValidationHandler(validator=evaluator, interval=interval, epoch_level=True).attach(trainer)
        if int(cfg.trainer.max_epochs) % interval:  # always validate the final model
            trainer.add_event_handler(Events.COMPLETED, lambda engine: evaluator.run(engine.state.epoch))
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    TensorBoardStatsHandler(summary_writer=writer, tag_name="train/loss", output_transform=first_loss,
                            epoch_log=False).attach(trainer)
    if evaluator is not None:
        TensorBoardValidation(writer, metrics, trainer, optimizer, bool(cfg.trainer.log_images)).attach(evaluator)
    if cfg.trainer.progress:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": first_loss(out)})
    if resume is None and cfg.trainer.evaluate_pretrained and cfg.model.get("pretrained"):
        checkpoints.save_pretrained()
    if resume is not None:
        checkpoints.restore(trainer, resume)
        log.info(f"resuming at epoch {trainer.state.epoch + 1} of {cfg.trainer.max_epochs}")
    try:
        trainer.run()
    finally:
        writer.close()
    return {"epoch": trainer.state.epoch, "best_dice": checkpoints.best, "model": model}

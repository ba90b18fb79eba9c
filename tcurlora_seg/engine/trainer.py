"""Training: MONAI ``SupervisedTrainer`` / ``SupervisedEvaluator`` with stock and app handlers, built from config.

``fit(cfg, run_dir)`` is the whole loop: data check, model (+ pretrained + adapter), loaders, engines, checkpoints,
TensorBoard, resume. One ``build_*`` function per object; no hand-written loop. Under torchrun the same loop runs in
every process (``engine.distributed``): DistributedDataParallel, a DistributedSampler per split, rank 0 writes.
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

from tcurlora_seg.adapters import count_trainable, load_adapter_state_dict, trainable_groups
from tcurlora_seg.data.check import run_check
from tcurlora_seg.data.datasets import build_dataset, build_loader
from tcurlora_seg.data.demo import with_pool
from tcurlora_seg.data.layouts import load_cases
from tcurlora_seg.data.splits import take_shots
from tcurlora_seg.engine import distributed
from tcurlora_seg.engine.distributed import Dist
from tcurlora_seg.engine.handlers import (CaseMetrics, FiniteLoss, GlobalLoss, RunCheckpoints, TensorBoardValidation,
                                          TrainStats, first_loss)
from tcurlora_seg.engine.run import build_model, is_scratch, resolve_device, save_run_config
from tcurlora_seg.errors import UserError

__all__ = ["Autocast", "with_precision", "build_loaders", "build_evaluator", "build_trainer", "fit"]

log = logging.getLogger("tcurlora_seg")


def _samplers(cfg: DictConfig, ctx: Dist, train: Any, val: Any | None) -> tuple[Any, Any]:
    """Per-rank shares: training cases shuffled per epoch (MONAI's workflow calls set_epoch), validation cases
    split without repeats (their metrics are gathered, so a repeated case would count twice); with fewer validation
    cases than ranks every rank validates all of them instead."""
    if not ctx.enabled:
        return None, None
    from monai.data import DistributedSampler

    train_sampler = DistributedSampler(train, shuffle=True, num_replicas=ctx.world_size, rank=ctx.rank, seed=int(cfg.seed))
    val_sampler = None
    if val is not None and len(val) >= ctx.world_size:
        val_sampler = DistributedSampler(val, shuffle=False, even_divisible=False, num_replicas=ctx.world_size, rank=ctx.rank)
    return train_sampler, val_sampler


def build_loaders(cfg: DictConfig, run_dir: Path, ctx: Dist = Dist()) -> tuple[Any, Any | None]:
    """Check every case (exit code 2 on problems, split.json into the run folder), then the train / val loaders."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data = distributed.on_main(ctx, lambda: with_pool(data))  # data.demo.train: the demo's pool, built once
    cases = take_shots(load_cases(data), data.get("split") or {})  # data.split.shots: its first k train
    if distributed.on_main(ctx, lambda: run_check(data, cases, run_dir)) != 0:  # one report, from rank 0
        raise SystemExit(2)
    if not cases["train"]:
        raise UserError(f"data.split gives no training case for data.root={data['root']}; set data.split.train")
    train = build_dataset(data, cases["train"], "train")
    val = build_dataset(data, cases["val"], "val") if cases["val"] else None
    train_sampler, val_sampler = _samplers(cfg, ctx, train, val)
    train_loader = build_loader(data, train, "train", sampler=train_sampler, seed=int(cfg.seed) + ctx.rank)
    val_loader = build_loader(data, val, "val", sampler=val_sampler) if val is not None else None
    return train_loader, val_loader


class Autocast(torch.nn.Module):
    """``module``'s forward under ``torch.autocast(device_type, dtype)``, its output back in fp32 for the loss.

    bf16 mixed precision that works on CPUs and GPUs alike; MONAI's ``amp`` switch autocasts "cuda" only (a silent
    fp32 run on a CPU) and adds a GradScaler that bf16, with fp32's exponent range, does not need. Parameters stay
    fp32 (adapters compute their factors, e.g. tCURLoRA's C * U * R, in fp32 from fp32 U); matmuls and convolutions
    run in bf16; the backward pass runs outside the autocast region, as PyTorch recommends.
    """

    def __init__(self, module: torch.nn.Module, device_type: str, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(*args, **kwargs)
        return out.float()


def with_precision(cfg: DictConfig, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``trainer.precision``: fp32 (``model`` itself) or bf16 (``Autocast`` around it)."""
    precision = cfg.trainer.precision
    if precision not in ("fp32", "bf16"):
        raise UserError(f"trainer.precision={precision!r}: choose fp32 or bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"trainer.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp32")
    return Autocast(model, device.type) if precision == "bf16" else model


def build_evaluator(cfg: DictConfig, model: torch.nn.Module, loader: Any, device: torch.device,
                    ctx: Dist = Dist()) -> tuple[SupervisedEvaluator, CaseMetrics]:
    """Sliding-window validation on whole volumes; Dice and HD95 (mm) per case into ``state.metrics``.

    ``model`` is the plain module, not its DDP wrapper: each rank validates its own cases, with no collective inside
    a forward (ranks may hold different numbers of cases).
    """
    sharded = ctx.enabled and isinstance(getattr(loader, "sampler", None), torch.utils.data.DistributedSampler)
    metrics = CaseMetrics(int(cfg.data.num_classes), ctx if sharded else Dist())
    # windows run on the model's device; trainer.val_stitch_on_cpu gathers the whole-volume output in host memory
    # (evaluation and prediction always do), for volumes whose logits would not fit next to the model on the GPU
    stitch = torch.device("cpu") if cfg.trainer.get("val_stitch_on_cpu", False) else None
    inferer = SlidingWindowInferer(roi_size=list(cfg.data.roi_size), sw_batch_size=int(cfg.trainer.sw_batch_size),
                                   overlap=float(cfg.trainer.val_overlap), mode="gaussian", sw_device=device,
                                   device=stitch)
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=loader, network=with_precision(cfg, model, device), inferer=inferer,
        postprocessing=AsDiscreted(keys="pred", argmax=True), val_handlers=[metrics],
    )
    return evaluator, metrics


def group_settings(cfg_optim: DictConfig) -> dict[str, dict[str, float]]:
    """lr and weight decay of the two optimizer groups: ``head`` (decoder2..5, out) takes ``optim.lr`` /
    ``optim.weight_decay``; ``adapter`` (the method's own tensors) ``optim.adapter_lr`` / ``optim.adapter_weight_decay``,
    which fall back to the former only when null (the paper: one lr for everything)."""
    settings = {}
    for group, prefix in (("head", ""), ("adapter", "adapter_")):
        values = {}
        for key in ("lr", "weight_decay"):
            value = cfg_optim.get(prefix + key)
            value = cfg_optim.get(key) if value is None else value
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise UserError(f"optim.{prefix}{key}={value!r}: use a number >= 0" + (" (or null: optim.lr's)" if prefix else ""))
            values[key] = float(value)
        settings[group] = values
    return settings


def param_groups(cfg_optim: DictConfig, model: torch.nn.Module) -> list[dict]:
    """Two optimizer parameter groups, head first, then the method's own tensors (``trainable_groups``); a group may
    be empty (decoder-only has no adapter tensors), so that every method's optimizer state has the same layout."""
    adapter, head = trainable_groups(model)
    settings = group_settings(cfg_optim)
    return [{"params": head, "name": "head", **settings["head"]}, {"params": adapter, "name": "adapter", **settings["adapter"]}]


def warn_coupled_decay(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> None:
    """Warn when LoHa trains under Adam's coupled (L2) weight decay: its adapter then dies.

    LoHa's ΔW = (W1a W1b) ⊙ (W2a W2b) starts at zero through W2b = 0, so W1's factors get no loss gradient at first;
    their only gradient is the decay term wd·p, which Adam normalises into a full step of size lr towards zero,
    however small wd is. Measured on the demo (192 steps, wd 1e-5): the factors end near 1e-5, ΔW = 0 and the ViT
    change is 0.00 % at every lr from 1e-3 to 1e-1; with optim.adapter_weight_decay=0 at 1e-2 it is 247 %.
    AdamW (decoupled decay) and SGD do not normalise the decay term."""
    adapter = next((g for g in optimizer.param_groups if g.get("name") == "adapter"), None)
    coupled = isinstance(optimizer, torch.optim.Adam) and not optimizer.defaults.get("decoupled_weight_decay", False)
    if cfg.peft.name == "loha" and coupled and adapter and adapter["params"] and adapter["weight_decay"] > 0:
        log.warning(f"loha under Adam with weight decay {adapter['weight_decay']:g} on its factors: Adam turns the decay "
                    "into full-size steps towards zero before LoHa's second factor grows, and the adapter ends at "
                    "ΔW = 0 (measured on the demo); set optim.adapter_weight_decay=0 (or use AdamW)")


def build_trainer(cfg: DictConfig, model: torch.nn.Module, loader: Any, device: torch.device) -> tuple[SupervisedTrainer, torch.optim.Optimizer, Any]:
    """Adam + polynomial decay per iteration (paper), Dice loss on softmax over both classes (paper).

    ``model`` may be a DDP wrapper; ``trainer.precision`` and ``trainer.compile`` (torch.compile, through MONAI)
    wrap it further.
    """
    optimizer = instantiate(cfg.optim.optimizer)(param_groups(cfg.optim, model))
    warn_coupled_decay(cfg, optimizer)
    epoch_length = int(cfg.trainer.epoch_length or len(loader))
    total = int(cfg.trainer.max_epochs) * epoch_length
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=float(cfg.optim.poly_power))
    trainer = SupervisedTrainer(
        device=device, max_epochs=int(cfg.trainer.max_epochs), epoch_length=epoch_length, train_data_loader=loader,
        network=with_precision(cfg, model, device), optimizer=optimizer,
        loss_function=DiceLoss(to_onehot_y=True, softmax=True), inferer=SimpleInferer(),
        train_handlers=[LrScheduleHandler(scheduler, epoch_level=False, print_lr=False)],
        compile=bool(cfg.trainer.get("compile", False)),
    )
    return trainer, optimizer, scheduler


def fit(cfg: DictConfig, run_dir: Path, resume: dict | None = None, ctx: Dist = Dist(),
        device: torch.device | None = None) -> dict:
    """Train ``cfg`` into ``run_dir`` (or continue ``resume``, a last.pt payload); returns the final state numbers.

    ``ctx``: this process's place under torchrun (``distributed.init``); every rank calls ``fit``, rank 0 writes.
    """
    set_determinism(int(cfg.seed) + ctx.rank)  # the model is seeded in build_model; ranks draw different crops
    set_track_meta(True)
    device = device if device is not None else resolve_device(cfg.trainer.device)
    main = ctx.is_main
    if main:
        save_run_config(cfg, run_dir)
    train_loader, val_loader = build_loaders(cfg, run_dir, ctx)
    model, report = build_model(cfg)
    if report is not None and main:
        log.info(report.summary())
    if resume is not None:
        load_adapter_state_dict(model, resume["adapter"])
    # Common random numbers: building the model drew from the global generators as much as its method needs (LoRA's
    # random A, none for tCURLoRA), so reseed them. The training loader draws from a generator of its own
    # (build_loader), so every method of a seed sees the same case order, crops and flips; the ViT's dropout masks
    # are the same too unless the method draws random numbers in its forward pass (peft's LoHa and LoKr do).
    set_determinism(int(cfg.seed) + ctx.rank)
    model.to(device)
    lrs = group_settings(cfg.optim)
    if main:
        log.info(f"{cfg.peft.name}: {count_trainable(model):,} trainable of "
                 f"{sum(p.numel() for p in model.parameters()):,} parameters; lr {lrs['head']['lr']:g} (decoder), "
                 f"{lrs['adapter']['lr']:g} ({cfg.peft.name}'s own tensors)"
                 + (f"; {ctx.world_size} processes x batch {cfg.data.batch_size}" if ctx.enabled else ""))

    trainer, optimizer, scheduler = build_trainer(cfg, distributed.wrap(ctx, model, device), train_loader, device)
    evaluator = metrics = None
    if val_loader is not None:
        evaluator, metrics = build_evaluator(cfg, model, val_loader, device, ctx)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoints = RunCheckpoints(run_dir, model, optimizer, scheduler, config, int(cfg.trainer.checkpoint_interval),
                                 int(cfg.trainer.keep_last_epochs), evaluator)
    if main:
        checkpoints.attach(trainer)  # first: its Ctrl-C handler must run before others re-raise
    GlobalLoss(ctx).attach(trainer)  # before every reader of the logged loss: all ranks log the same value
    # gradients are checked after DDP's all-reduce, so every rank stops or skips at the same step;
    # .get: a run folder written before these keys existed still resumes
    FiniteLoss(run_dir / "checkpoints", cfg.trainer.get("nonfinite", "stop"),
               cfg.trainer.get("max_nonfinite_skips", 10)).attach(trainer)
    if main:
        TrainStats(run_dir / "train_stats.json", count_trainable(model), device, ctx.world_size,
                   lrs, sum(p.numel() for p in trainable_groups(model)[0]),
                   lambda: checkpoints.best).attach(trainer)
    if evaluator is not None:
        interval = int(cfg.trainer.val_interval)
        ValidationHandler(validator=evaluator, interval=interval, epoch_level=True).attach(trainer)
        if int(cfg.trainer.max_epochs) % interval:  # always validate the final model
            trainer.add_event_handler(Events.COMPLETED, lambda engine: evaluator.run(engine.state.epoch))
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard")) if main else None
    if writer is not None:
        TensorBoardStatsHandler(summary_writer=writer, tag_name="train/loss", output_transform=first_loss,
                                epoch_log=False).attach(trainer)
        if evaluator is not None:
            TensorBoardValidation(writer, metrics, trainer, optimizer, bool(cfg.trainer.log_images)).attach(evaluator)
    if cfg.trainer.progress and main:
        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": first_loss(out)})
    # (from scratch there is no pretrained model: its random init is no zero-shot level)
    if resume is None and cfg.trainer.evaluate_pretrained and cfg.model.get("pretrained") and not is_scratch(cfg) and main:
        checkpoints.save_pretrained()
    if resume is not None:
        checkpoints.restore(trainer, resume)
        if main:
            log.info(f"resuming at epoch {trainer.state.epoch + 1} of {cfg.trainer.max_epochs}")
    try:
        trainer.run()
    finally:
        if writer is not None:
            writer.close()
    return {"epoch": trainer.state.epoch, "best_dice": checkpoints.best, "model": model}

"""Ignite/MONAI event handlers that MONAI does not ship in the form this app needs.

- ``CaseMetrics``: per-case Dice (%) and HD95 (mm, with the label's spacing and the empty-mask policy of
  ``engine.metrics``) on the evaluator, aggregated per validation round; keeps the first case for image logging.
- ``RunCheckpoints``: atomic adapter-only checkpoints (last / best / last K epochs), and one on Ctrl-C.
- ``GlobalLoss``: under torchrun, the iteration's loss averaged over ranks (what is logged, and what stops a run).
- ``FiniteLoss``: at a NaN/Inf loss or gradient, stop or skip the optimizer step, naming epoch and iteration.
- ``TensorBoardValidation``: val/dice, val/hd95, lr and an image | label | prediction mid-slice in TensorBoard.
- ``TrainStats``: ``train_stats.json`` (trainable parameters, time per training step, peak memory) for comparisons.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents

from tcurlora_seg.adapters import adapter_state_dict
from tcurlora_seg.adapters.files import write_adapter
from tcurlora_seg.engine import distributed
from tcurlora_seg.engine.distributed import Dist
from tcurlora_seg.engine.metrics import case_metrics, summarize
from tcurlora_seg.engine.run import ADAPTER_DIR, FORMAT, base_model_config, epoch_checkpoints
from tcurlora_seg.errors import UserError
from tcurlora_seg.models.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("tcurlora_seg")

__all__ = ["CaseMetrics", "RunCheckpoints", "GlobalLoss", "FiniteLoss", "TensorBoardValidation", "TrainStats", "spacing_of", "first_loss", "overlay"]


def spacing_of(tensor: Any) -> tuple[float, ...]:
    """Voxel spacing (mm) of a MetaTensor, from its affine; 1 mm when it carries none."""
    affine = getattr(tensor, "affine", None)
    if affine is None:
        return (1.0, 1.0, 1.0)
    affine = torch.as_tensor(affine, dtype=torch.float64)
    return tuple(float(v) for v in torch.linalg.vector_norm(affine[:3, :3], dim=0))


class CaseMetrics:
    """Dice and HD95 of every validation case; ``engine.state.metrics`` gets ``dice`` and ``hd95`` (foreground means).

    With a distributed ``ctx`` each rank sees its share of the cases; the per-case results of all ranks are gathered
    before the means, so every rank gets the metrics of the whole validation split.
    """

    def __init__(self, num_classes: int, ctx: Dist = Dist()) -> None:
        self.num_classes, self.ctx = num_classes, ctx
        self.cases: list[dict] = []
        self.first: dict[str, np.ndarray] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._aggregate)

    def _reset(self, engine: Engine) -> None:
        self.cases, self.first = [], None

    def _update(self, engine: Engine) -> None:
        for item in engine.state.output:  # decollated: one dict per case
            pred = item["pred"].detach().cpu()  # (1, D, H, W) class indices (AsDiscrete argmax)
            label = item["label"].detach().cpu()
            self.cases.append(case_metrics(pred[0].numpy(), label[0].numpy(), spacing_of(label), self.num_classes,
                                           case_id=str(len(self.cases))))
            if self.first is None:
                self.first = {"image": item["image"].detach().cpu()[0].numpy(), "label": label[0].numpy(), "pred": pred[0].numpy()}

    def _aggregate(self, engine: Engine) -> None:
        cases = [case for share in distributed.all_gather(self.ctx, self.cases) for case in share]
        if not cases:
            return
        fg = summarize(cases)["foreground_mean"]
        engine.state.metrics["dice"] = float(fg["Dice"])
        engine.state.metrics["hd95"] = float(fg["HD95"])


class GlobalLoss:
    """Under torchrun, each rank's iteration loss becomes the mean over ranks (its gradient already is, by DDP).

    Attached before every reader of the loss: TensorBoard then shows the loss of the global batch (the same curve
    as one process with the whole batch), and a NaN on one rank stops all of them at the same iteration.
    """

    def __init__(self, ctx: Dist) -> None:
        self.ctx = ctx

    def attach(self, engine: Engine) -> None:
        if self.ctx.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        items = output if isinstance(output, list) else [output]
        loss = distributed.mean(self.ctx, torch.as_tensor(items[0]["loss"]).detach().float())
        for item in items:
            item["loss"] = loss


class FiniteLoss:
    """Non-finite loss or gradients: stop (``trainer.nonfinite=stop``) or skip that optimizer step (``skip``).

    Checked on MONAI's ``BACKWARD_COMPLETED``, between ``backward()`` and ``optimizer.step()``: the one point where a
    step can still be skipped without writing our own iteration (an optimizer step pre-hook cannot cancel the step,
    and after ITERATION_COMPLETED the weights are already NaN). Skipping sets every gradient to None, which torch
    optimizers read as "no update": Adam's moments and step counts stay as they were (bf16 runs through
    ``trainer.Autocast`` without a GradScaler, so no scaler skips steps on its own). ``skip`` stops after
    ``max_skips`` skipped steps in a row. Engines without an optimizer (tests)
    get the loss check at ITERATION_COMPLETED. On stop the last checkpoint on disk is the last good state.
    """

    def __init__(self, checkpoints: Path, mode: str = "stop", max_skips: int = 10) -> None:
        if mode not in ("stop", "skip"):
            raise UserError(f"trainer.nonfinite={mode!r}: choose stop (end the run) or skip (skip that optimizer step)")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1:
            raise UserError(f"trainer.max_nonfinite_skips={max_skips!r}: expected a positive int")
        self.checkpoints, self.mode, self.max_skips = checkpoints, mode, max_skips
        self.skipped = 0  # consecutive skipped steps

    def attach(self, engine: Engine) -> None:
        event = IterationEvents.BACKWARD_COMPLETED if getattr(engine, "optimizer", None) is not None else Events.ITERATION_COMPLETED
        engine.add_event_handler(event, self)

    def _non_finite(self, engine: Engine) -> str | None:
        loss = first_loss(engine.state.output)
        if not math.isfinite(loss):
            return f"loss became {loss}"
        if getattr(engine, "optimizer", None) is None:
            return None
        grads = [p.grad.detach().abs().amax() for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not bool(torch.stack(grads).isfinite().all()):  # amax keeps NaN and Inf: one sync per step
            return "gradients became NaN/Inf"
        return None

    @staticmethod
    def _skip_step(engine: Engine) -> None:
        for group in engine.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimizers leave parameters without a gradient alone

    def __call__(self, engine: Engine) -> None:
        what = self._non_finite(engine)
        if what is None:
            self.skipped = 0
            return
        where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
        fix = "lower optim.lr or use trainer.precision=fp32, then " + (
            f"resume (last good checkpoint in {self.checkpoints})" if (self.checkpoints / "last.pt").is_file() else "start again (no checkpoint yet)")
        if self.mode == "stop":
            raise UserError(f"{what} at {where}; {fix} (or trainer.nonfinite=skip)")
        self.skipped += 1
        if self.skipped >= self.max_skips:
            raise UserError(f"{what} at {where}, {self.skipped} steps in a row (trainer.max_nonfinite_skips={self.max_skips}); {fix}")
        self._skip_step(engine)
        log.warning(f"{what} at {where}: optimizer step skipped ({self.skipped} in a row, stop at trainer.max_nonfinite_skips={self.max_skips})")


class RunCheckpoints:
    """Checkpoints of a run folder (layout in ``engine.run``), written atomically, adapter-only except last.pt.

    ``last.pt`` (with optimizer, scheduler and engine counters) every ``interval`` epochs, at the end and on Ctrl-C;
    ``best.pt`` when the evaluator's Dice improves; ``epoch_NNNN.pt`` for the last ``keep_last`` epochs.
    """

    def __init__(self, run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 config: dict, interval: int, keep_last: int, evaluator: Engine | None) -> None:
        self.folder = run_dir / "checkpoints"
        self.model, self.optimizer, self.scheduler, self.config = model, optimizer, scheduler, config
        self.interval, self.keep_last, self.evaluator = max(1, interval), keep_last, evaluator
        self.best: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._validated, engine)

    def payload(self, engine: Engine, full: bool) -> dict:
        # Counters of the last completed epoch: a run stopped mid-epoch resumes at the next whole epoch (the
        # weights keep the extra steps), so the epoch/iteration bookkeeping of the engine stays consistent.
        epoch = engine.state.iteration // engine.state.epoch_length
        payload = {"format": FORMAT, "epoch": epoch, "iteration": epoch * engine.state.epoch_length,
                   "metric": self.best, "config": self.config, "adapter": adapter_state_dict(self.model)}
        if full:
            payload.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
        return payload

    def save_pretrained(self) -> Path:
        """``pretrained.pt``: the model before any step (zero U = the source model), to measure what fine-tuning gained."""
        return save_checkpoint(self.folder / "pretrained.pt", {"format": FORMAT, "epoch": 0, "iteration": 0, "metric": None,
                                                              "config": self.config, "adapter": adapter_state_dict(self.model)})

    def save(self, engine: Engine, name: str, full: bool = False) -> Path:
        return save_checkpoint(self.folder / f"{name}.pt", self.payload(engine, full))

    def _epoch_completed(self, engine: Engine) -> None:
        epoch, max_epochs = engine.state.epoch, engine.state.max_epochs
        if epoch > max_epochs - self.keep_last:
            self.save(engine, f"epoch_{epoch:04d}")
            for old in epoch_checkpoints(self.folder.parent)[: -self.keep_last]:
                old.unlink()
        if epoch % self.interval == 0 and epoch < max_epochs:
            self.save(engine, "last", full=True)

    def _validated(self, evaluator: Engine, trainer: Engine) -> None:
        dice, hd95 = evaluator.state.metrics.get("dice"), evaluator.state.metrics.get("hd95")
        if dice is None:
            return
        if self.best is None or dice > self.best:
            self.best = float(dice)
            self.save(trainer, "best")
        log.info(f"epoch {trainer.state.epoch}: validation Dice {dice:.2f} %, HD95 {hd95:.2f} mm (best Dice {self.best:.2f} %)")

    def _completed(self, engine: Engine) -> None:
        self.save(engine, "last", full=True)
        if not (self.folder / "best.pt").is_file():  # no validation split: the final state is the one to use
            self.save(engine, "best")
        self.save_adapter_folder()

    def save_adapter_folder(self) -> Path:
        """``adapter/``: the best checkpoint's adapter as peft users know it (JSON + safetensors, no pickle)."""
        best = load_checkpoint(self.folder / "best.pt")
        return write_adapter(best["adapter"], self.folder.parent / ADAPTER_DIR, base_model_config=base_model_config(self.config))

    def _exception(self, engine: Engine, error: BaseException) -> None:
        if isinstance(error, KeyboardInterrupt):  # Ctrl-C: keep the work; a NaN or a crash must not overwrite it
            path = self.save(engine, "last", full=True)
            log.info(f"interrupted in epoch {engine.state.epoch}, iteration {engine.state.iteration}; saved {path}")
        raise error

    def restore(self, engine: Engine, payload: dict) -> None:
        """Continue a run from ``last.pt``: optimizer, scheduler and engine counters (the adapter is loaded by the caller)."""
        for stale in self.folder.glob(".*.pt.*.tmp"):  # half-written files of a run killed mid-save (SIGKILL, power loss)
            stale.unlink(missing_ok=True)
        self.optimizer.load_state_dict(two_groups(payload["optimizer"], self.optimizer, self.model))
        self.scheduler.load_state_dict(payload["scheduler"])
        self.best = payload.get("metric")
        engine.state.epoch = int(payload["epoch"])
        engine.state.iteration = int(payload["iteration"])


def two_groups(state: dict, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict:
    """An optimizer state of a run started before the two parameter groups (one group, the trainable parameters in
    model order, one lr for all) in this optimizer's layout (head group, then adapter group): each parameter keeps its
    moments and both groups the saved hyperparameters (the old run had one lr for both); any other state as it is."""
    if len(state["param_groups"]) != 1 or len(optimizer.param_groups) != 2:
        return state
    base = getattr(model, "module", model)
    old = [id(p) for p in base.parameters() if p.requires_grad]  # the single group's order
    new = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    if len(old) != len(new):
        return state  # not the same parameters: let load_state_dict say so
    group = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    groups, start = [], 0
    for current in optimizer.param_groups:
        groups.append({**group, "name": current.get("name"), "params": list(range(start, start + len(current["params"])))})
        start += len(current["params"])
    moments = {new[old[i]]: value for i, value in state["state"].items()}
    return {"state": moments, "param_groups": groups}


class TensorBoardValidation:
    """val/dice, val/hd95 per validation round, train/lr (the head's) and train/adapter_lr (the method's own tensors)
    per iteration, and a mid-slice overlay of the first case."""

    def __init__(self, writer: Any, metrics: CaseMetrics, trainer: Engine, optimizer: torch.optim.Optimizer,
                 log_images: bool) -> None:
        self.writer, self.metrics, self.trainer, self.optimizer, self.log_images = writer, metrics, trainer, optimizer, log_images

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._validation)
        self.trainer.add_event_handler(Events.ITERATION_COMPLETED, self._lr)

    def _lr(self, trainer: Engine) -> None:
        for tag, group in zip(("train/lr", "train/adapter_lr"), self.optimizer.param_groups):
            self.writer.add_scalar(tag, group["lr"], trainer.state.iteration)

    def _validation(self, evaluator: Engine) -> None:
        epoch = self.trainer.state.epoch
        for name in ("dice", "hd95"):
            if name in evaluator.state.metrics:
                self.writer.add_scalar(f"val/{name}", evaluator.state.metrics[name], epoch)
        if self.log_images and self.metrics.first is not None:
            self.writer.add_image("val/image_label_prediction", overlay(**self.metrics.first), epoch, dataformats="HWC")
        self.writer.flush()


class TrainStats:
    """``train_stats.json`` at the end of training: what ``scripts/compare.py`` reports besides Dice and HD95.

    ``step_time_s`` is the mean time from ITERATION_STARTED to ITERATION_COMPLETED (forward, backward, optimizer step;
    no data loading, no validation), the first step left out as warm-up when there are others. ``peak_memory_mb``:
    ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the peak RSS (which includes data and Python), counted
    from the start of training where Linux lets a process reset its high-water mark (a Hydra multirun runs every
    job in one process), else the process's max RSS. A resumed run counts only the steps of its own process.
    """

    def __init__(self, path: Path, trainable: int, device: torch.device, world_size: int = 1,
                 groups: dict[str, dict[str, float]] | None = None, adapter_trainable: int | None = None,
                 best_metric: Callable[[], float | None] = lambda: None) -> None:
        self.path, self.trainable, self.device, self.world_size = path, trainable, device, world_size
        self.adapter_trainable = adapter_trainable  # of ``trainable``: the method's own tensors (the adapter group)
        self.best_metric = best_metric  # the best validation Dice so far (what compare.py tunes the lr on)
        self.groups = groups or {}  # the optimizer groups' starting lr and weight decay (trainer.group_settings)
        self.steps: list[float] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _sync(self) -> None:
        if self.device.type == "cuda":  # kernels run asynchronously: wait for them, or the clock measures the launch
            torch.cuda.synchronize(self.device)

    def _started(self, engine: Engine) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS, so earlier jobs of a multirun do not count
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def _iteration_started(self, engine: Engine) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        self._sync()
        self.steps.append(time.perf_counter() - self._start)

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            status = Path("/proc/self/status").read_text()
            return int(status.split("VmHWM:")[1].split()[0]) / 2**10  # kB
        except (OSError, IndexError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB

    def _completed(self, engine: Engine) -> None:
        timed = self.steps[1:] or self.steps
        stats = {
            "trainable": self.trainable,
            "adapter_trainable": self.adapter_trainable,
            "best_val_dice": self.best_metric(),
            **{f"{prefix}{key}": value for group, prefix in (("head", ""), ("adapter", "adapter_"))
               for key, value in self.groups.get(group, {}).items()},
            "step_time_s": float(np.mean(timed)) if timed else None,
            "timed_steps": len(timed),
            "peak_memory_mb": self.peak_memory_mb(),
            "device": str(self.device),
            "processes": self.world_size,  # step time and memory are rank 0's; the global batch is this many times larger
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats, indent=2) + "\n")
        os.replace(tmp, self.path)


def overlay(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Three panels of the slice with most label (axis 2): image | label in green | prediction in red, (H, 3W, 3)."""
    z = int(np.argmax((label > 0).sum(axis=(0, 1)))) if label.any() else label.shape[2] // 2
    img = image[:, :, z].astype(np.float32)
    img = (img - img.min()) / (np.ptp(img) + 1e-8)
    gray = np.repeat(img[..., None], 3, axis=-1)

    def tint(mask: np.ndarray, channel: int) -> np.ndarray:
        out = gray.copy()
        out[mask > 0] = 0.5 * out[mask > 0]
        out[mask > 0, channel] += 0.5
        return out

    return np.concatenate([gray, tint(label[:, :, z], 1), tint(pred[:, :, z], 0)], axis=1)


def first_loss(output: Any) -> float:
    """The loss of a SupervisedTrainer iteration output (decollated list or dict)."""
    loss = output[0]["loss"] if isinstance(output, list) else output["loss"]
    return float(loss.detach() if isinstance(loss, torch.Tensor) else loss)  # before the step it still needs grad

"""Fine-tune a pretrained UNETR with tCURLoRA (or a rival) and evaluate it.

    python -m tcurlora_seg.train                                  # the embedded demo, offline, CPU, minutes
    python -m tcurlora_seg.train +experiment=brats data.root=PATH # the paper's source pretraining
    python -m tcurlora_seg.train +experiment=eadc data.root=PATH model.pretrained=PATH/source_unetr.pt
    python -m tcurlora_seg.train peft.rank=16 optim.lr=5e-4 trainer.max_epochs=200 data.roi_size=[64,64,64]
    python -m tcurlora_seg.train -m peft.rank=4,8,16 seed=0,1,2   # Hydra multirun sweep
    python -m tcurlora_seg.train trainer.resume=true [trainer.run_dir=outputs/...]   # continue the latest run
    python -m tcurlora_seg.train hydra.run.dir=runs/a trainer.resume=auto           # continue runs/a if it has started
    torchrun --nproc_per_node=4 -m tcurlora_seg.train +experiment=brats ...         # data-parallel (4 GPUs)
    tensorboard --logdir outputs

Each run writes a folder under outputs/ (layout in ``tcurlora_seg.engine.run``); errors a user can fix print one
line and exit with code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from tcurlora_seg.cli import one_line_errors, run_entry

log = logging.getLogger("tcurlora_seg")


def run(cfg: DictConfig) -> None:
    from tcurlora_seg.engine import distributed
    from tcurlora_seg.engine.evaluate import check_eval_protocol
    from tcurlora_seg.engine.run import scratch_config

    scratch_config(cfg)  # before anything reads model.pretrained: a scratch run saves and rebuilds it as null
    if cfg.trainer.evaluate:
        check_eval_protocol(cfg)
    ctx, device = distributed.init(cfg.trainer.device)
    try:
        trained = _train(cfg, ctx, device)
        distributed.barrier(ctx)  # all ranks are done with collectives before the group goes
    finally:
        distributed.shutdown()
    if trained is not None and ctx.is_main:  # export and test evaluation: rank 0 alone, on the finished model
        _finish(*trained)


def _train(cfg: DictConfig, ctx, device) -> tuple[DictConfig, Path, dict] | None:
    """Every rank: the run folder, resume or pretraining, then ``fit``; None when the run had already finished (result
    None when only its test evaluation is missing)."""
    from tcurlora_seg.engine import distributed
    from tcurlora_seg.engine.pretrain import ensure_pretrained
    from tcurlora_seg.engine.resume import check_resume_overrides, follow_main, resume_target
    from tcurlora_seg.engine.run import checkpoint_path, load_run_config
    from tcurlora_seg.engine.trainer import fit
    from tcurlora_seg.models.checkpoint import load_checkpoint

    own_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = distributed.broadcast(ctx, own_dir)  # rank 0's folder: the clocks of the ranks may name theirs apart
    if not ctx.is_main:
        follow_main(own_dir, run_dir)
    resume = None
    target = distributed.on_main(ctx, lambda: resume_target(cfg, run_dir))
    if target is not None:
        run_dir = target
        resume = load_checkpoint(checkpoint_path(run_dir, "last"))
        given, cfg = cfg, load_run_config(run_dir)  # the run continues with the config it started with
        check_resume_overrides(given, cfg, run_dir)
        if resume["epoch"] >= cfg.trainer.max_epochs:
            log.info(f"{run_dir} already finished its {cfg.trainer.max_epochs} epochs")
            if cfg.trainer.evaluate and not (run_dir / "eval" / "summary.json").is_file():
                return cfg, run_dir, None  # stopped during its test evaluation: that alone is left to do
            return None
    else:
        distributed.on_main(ctx, lambda: ensure_pretrained(cfg))  # the demo's source model: pretrained once
    try:
        result = fit(cfg, run_dir, resume, ctx, device)
    except KeyboardInterrupt:
        if ctx.is_main and (run_dir / "checkpoints" / "last.pt").is_file():
            print(f"stopped by Ctrl-C; continue with: python -m tcurlora_seg.train trainer.resume=true "
                  f"trainer.run_dir={run_dir}", file=sys.stderr)
        elif ctx.is_main:  # stopped before the first training step: there is nothing to continue
            print("stopped by Ctrl-C before training began; nothing to resume, start the run again", file=sys.stderr)
        sys.exit(130)
    return cfg, run_dir, result


def _finish(cfg: DictConfig, run_dir: Path, result: dict | None) -> None:
    """Rank 0 after training (``result`` None: it finished earlier): export the merged model, evaluate the test
    split, say where everything is."""
    from tcurlora_seg.engine.evaluate import evaluate_after_training
    from tcurlora_seg.engine.run import export_merged

    if result is not None and cfg.get("export_model"):
        export_merged(result["model"], cfg, cfg.export_model)
    if result is not None:
        best = result["best_dice"]
        log.info(f"finished epoch {result['epoch']} in {run_dir}"
                 + (f"; best validation Dice {best:.2f} %" if best is not None else ""))
    if cfg.trainer.evaluate:
        evaluate_after_training(cfg, run_dir)
    print(f"run folder: {run_dir}\n  tensorboard --logdir {run_dir / 'tensorboard'}\n  make eval RUN={run_dir}")


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from tcurlora_seg.engine.resume import removed_on_user_error

    with removed_on_user_error(Path(HydraConfig.get().runtime.output_dir)):
        run(cfg)


if __name__ == "__main__":
    run_entry(main)

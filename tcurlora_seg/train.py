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

import contextlib
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.cli import ERRORS, one_line_errors, run_entry
from tcurlora_seg.errors import UserError

log = logging.getLogger("tcurlora_seg")


def _resume_target(cfg: DictConfig, new_dir: Path) -> Path | None:
    """The run folder to continue, or None for a new run in ``new_dir`` (Hydra's folder for this call).

    ``trainer.resume``: true continues ``trainer.run_dir`` (default: ``new_dir`` when it holds a run, e.g. a fixed
    ``hydra.run.dir``, else the latest run under outputs/); auto continues
    ``trainer.run_dir`` (default: ``new_dir``, e.g. a requeued SLURM job's own folder) when it holds checkpoints/last.pt
    and else starts a new run; false starts a new run and refuses a folder that already holds one.
    """
    from tcurlora_seg.engine.run import latest_run

    mode = cfg.trainer.resume
    if mode not in (True, False, "auto"):
        raise UserError(f"trainer.resume={mode!r}: choose true, false or auto")
    last = Path("checkpoints") / "last.pt"
    if mode is False:
        if (new_dir / last).is_file():  # a fixed hydra.run.dir / sweep dir: never overwrite a run's checkpoints
            raise UserError(f"{new_dir} already holds a training run ({last}); continue it with trainer.resume=true "
                            f"trainer.run_dir={new_dir}, or choose another hydra.run.dir")
        return None
    if mode == "auto":
        target = Path(cfg.trainer.run_dir) if cfg.trainer.run_dir else new_dir
        if not (target / last).is_file():
            return None
    elif cfg.trainer.run_dir:
        target = Path(cfg.trainer.run_dir)
    else:  # a fixed hydra.run.dir that holds a run is the one to continue, else the latest under outputs/
        target = new_dir if (new_dir / last).is_file() else latest_run("outputs")
    if target.resolve() != new_dir.resolve() and not (new_dir / "config.yaml").exists():
        shutil.rmtree(new_dir, ignore_errors=True)  # Hydra's fresh folder for this call: the run continues elsewhere
    return target


# What a resumed run may change: where it runs and how it reports, not what it trains.
# (trainer.evaluate_pretrained acts when a run starts: a resumed run has its pretrained.pt, or not, already)
RESUME_FREE = {"trainer.resume", "trainer.run_dir", "trainer.device", "trainer.progress", "data.num_workers",
               "trainer.evaluate_pretrained"}
_ABSENT = object()


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def check_resume_overrides(given: DictConfig, run_cfg: DictConfig, run_dir: Path) -> None:
    """Refuse command-line overrides that a resumed run would ignore (it continues with the config it started with).

    An override equal to the run's own value passes: a requeued SLURM job repeats its sweep's overrides.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    conflicts = []
    for override in OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task)):
        key = override.key_or_group
        if key.split(".")[0] == "hydra" or key in RESUME_FREE:
            continue
        new, old = (_plain(OmegaConf.select(c, key, default=_ABSENT)) for c in (given, run_cfg))
        if new is not _ABSENT and new != old:
            conflicts.append(f"{override.input_line} (the run has {'nothing' if old is _ABSENT else old})")
    if conflicts:
        raise UserError(f"trainer.resume continues {run_dir} with the config it started with, so {'; '.join(conflicts)} "
                        f"would be ignored: drop them, or start a new run with them")


def export(model, cfg: DictConfig, path: str) -> Path:
    """The merged model as a plain UNETR checkpoint (usable as model.pretrained of a later run)."""
    from tcurlora_seg.adapters import merged_state_dict
    from tcurlora_seg.models.checkpoint import save_checkpoint

    config = OmegaConf.to_container(cfg, resolve=True)
    out = save_checkpoint(Path(path), {"model": merged_state_dict(model), "config": config})
    log.info(f"exported the merged model to {out}")
    return out


def check_eval_protocol(cfg: DictConfig) -> tuple[int, float]:
    """``trainer.eval_average_last`` and ``trainer.eval_min_component_mm3``, checked before training rather than after
    it (an average over more epochs than training keeps would only fail at the end). Runs from before these keys: 1, 0."""
    trainer = cfg.trainer
    k, min_mm3 = trainer.get("eval_average_last", 1), trainer.get("eval_min_component_mm3", 0)
    keep = trainer.get("keep_last_epochs", 0)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"trainer.eval_average_last={k!r}: use 1 (the best checkpoint) or K > 1 (the last K epochs; paper: 4)")
    if k > 1 and k > keep:
        raise UserError(f"trainer.eval_average_last={k} needs the last {k} epochs, but trainer.keep_last_epochs={keep} "
                        f"keeps fewer: raise trainer.keep_last_epochs to {k} or lower trainer.eval_average_last")
    if isinstance(min_mm3, bool) or not isinstance(min_mm3, (int, float)) or not 0 <= min_mm3 < float("inf"):
        raise UserError(f"trainer.eval_min_component_mm3={min_mm3!r}: use 0 (keep every component) or a volume in mm³ "
                        "(paper: 1000)")
    return k, float(min_mm3)


def evaluate(cfg: DictConfig, run_dir: Path) -> None:
    """The test split with the best checkpoint (and, when kept, the model before fine-tuning, for comparison), by the
    protocol of `make eval` with ``trainer.eval_average_last`` and ``trainer.eval_min_component_mm3``."""
    from tcurlora_seg.engine.evaluate import evaluate_run

    average_last, min_mm3 = check_eval_protocol(cfg)
    before = None
    if (run_dir / "checkpoints" / "pretrained.pt").is_file():
        log.info("evaluating the model before fine-tuning (zero adapter = the pretrained source model)")
        before = evaluate_run(run_dir, checkpoint="pretrained", min_component_mm3=min_mm3, out_dir=run_dir / "eval_pretrained",
                              save_predictions=False, progress=bool(cfg.trainer.progress))
    after = evaluate_run(run_dir, average_last=average_last, min_component_mm3=min_mm3, progress=bool(cfg.trainer.progress))
    if before is not None:
        print(before_after_table(before, after))


def before_after_table(before: dict, after: dict) -> str:
    """The test split's foreground-mean Dice and HD95 before fine-tuning (zero-shot), after, and the change."""
    rows = [f"{'test (foreground mean)':<24}{'before (zero-shot)':>20}{'after':>10}{'change':>10}"]
    for key, unit in (("Dice", "%"), ("HD95", "mm")):
        b, a = before["foreground_mean"][key], after["foreground_mean"][key]
        rows.append(f"{key + ' ' + unit:<24}{b:>20.2f}{a:>10.2f}{a - b:>+10.2f}")
    return "\n".join(rows)


def _follow_main(own_dir: Path, main_dir: Path) -> None:
    """A rank other than 0: log warnings only, to the console, and drop the folder Hydra made for it (when its clock
    gave it another name than rank 0's), so that a torchrun run leaves one run folder."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's console and file handlers: every logger (ignite's too) ends there
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)
    if own_dir.resolve() != main_dir.resolve() and not (own_dir / "config.yaml").exists():
        shutil.rmtree(own_dir, ignore_errors=True)


def run(cfg: DictConfig) -> None:
    from tcurlora_seg.engine import distributed

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
    from tcurlora_seg.engine.run import checkpoint_path, load_run_config
    from tcurlora_seg.engine.trainer import fit
    from tcurlora_seg.models.checkpoint import load_checkpoint

    own_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir = distributed.broadcast(ctx, own_dir)  # rank 0's folder: the clocks of the ranks may name theirs apart
    if not ctx.is_main:
        _follow_main(own_dir, run_dir)
    resume = None
    target = distributed.on_main(ctx, lambda: _resume_target(cfg, run_dir))
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
    if result is not None and cfg.get("export_model"):
        export(result["model"], cfg, cfg.export_model)
    if result is not None:
        best = result["best_dice"]
        log.info(f"finished epoch {result['epoch']} in {run_dir}"
                 + (f"; best validation Dice {best:.2f} %" if best is not None else ""))
    if cfg.trainer.evaluate:
        evaluate(cfg, run_dir)
    print(f"run folder: {run_dir}\n  tensorboard --logdir {run_dir / 'tensorboard'}\n  make eval RUN={run_dir}")


@contextlib.contextmanager
def removed_on_user_error(run_dir: Path) -> Iterator[None]:
    """Remove Hydra's fresh run folder when the run stops on a user error before any checkpoint was written.

    Such a folder holds only a config and a log of a run that never trained: left behind it would be picked up by
    ``trainer.resume`` / ``make eval`` as the latest run. Only a folder that held nothing but Hydra's own files
    when the run started is fresh; an existing folder given as ``hydra.run.dir`` is never removed.
    """
    own = {".hydra", f"{HydraConfig.get().job.name}.log"}
    fresh = run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= own
    try:
        yield
    except (*ERRORS, OSError, SystemExit) as err:
        user_error = not isinstance(err, SystemExit) or err.code == 2  # the data check exits 2; Ctrl-C exits 130
        if user_error and fresh and not any((run_dir / "checkpoints").glob("*.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> None:
    with removed_on_user_error(Path(HydraConfig.get().runtime.output_dir)):
        run(cfg)


if __name__ == "__main__":
    run_entry(main)

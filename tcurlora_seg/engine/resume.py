"""A run folder across calls of the entry point: which run to continue, what a resumed run may change, and the
folders that must not be left behind (a never-trained run, a non-zero rank's own folder).

``trainer.resume``: true | false | auto (``resume_target``); a resumed run keeps the config it started with
(``check_resume_overrides``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tcurlora_seg.cli import ERRORS
from tcurlora_seg.errors import UserError

__all__ = ["RESUME_FREE", "resume_target", "check_resume_overrides", "follow_main", "removed_on_user_error"]


def resume_target(cfg: DictConfig, new_dir: Path) -> Path | None:
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


def follow_main(own_dir: Path, main_dir: Path) -> None:
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

"""What every entry point shares: Hydra with one-line errors and exit code 2 for anything the user can fix.

Hydra prints multi-line reports for a bad override; we compose the config first with the same overrides, so an
unknown key or a bad value becomes ``error: <one line>`` and exit code 2, before any work starts.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from tcurlora_seg.errors import UserError

__all__ = ["CONFIG_DIR", "one_line", "fail", "user_errors", "precheck_overrides"]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EXIT_USER = 2


def one_line(err: BaseException) -> str:
    """The message of ``err`` and of its causes, each reduced to its first line."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).strip().splitlines()
        if text and text[0] not in parts:
            parts.append(text[0])
        err = err.__cause__ or err.__context__
    return "; ".join(parts) or "unknown error"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER)


def precheck_overrides(config_name: str, argv: list[str]) -> None:
    """Compose ``config_name`` with the command line's overrides; one line and exit 2 when that fails."""
    if any(a in ("-m", "--multirun") or a.startswith("--") or a == "-c" for a in argv):
        return  # sweeps and Hydra flags: Hydra itself validates them
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [a for a in argv if not a.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        fail(f"{one_line(err)} (configs in {CONFIG_DIR.name}/{config_name}.yaml; `+key=value` adds a new key)")
    finally:
        GlobalHydra.instance().clear()


def user_errors(task: Callable[[DictConfig], None]) -> Callable[[DictConfig], None]:
    """Wrap a Hydra task function: UserError and config errors become one line and exit code 2."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except (UserError, OmegaConfBaseException) as err:
            fail(one_line(err))

    return wrapped

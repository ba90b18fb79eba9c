"""Entry-point plumbing: every user-fixable error becomes one line ``error: <message>`` on stderr and exit code 2.

Two places raise them. Inside the job (``@one_line_errors`` under ``@hydra.main``): our UserError and OmegaConf
errors such as a missing mandatory ``???`` value; exiting there also keeps Hydra from printing its "Error executing
job" banner. Before the job, while Hydra composes the config (an unknown key, a bad override, a missing config
group): Hydra prints those itself over several lines and exits with 1 unless ``HYDRA_FULL_ERROR`` is set, in which
case it re-raises; :func:`run_entry` sets it for the call and reports them, and an OSError naming a path (Hydra
cannot create the run folder, a full disk) the same way. A user who sets ``HYDRA_FULL_ERROR=1``
themselves gets Hydra's full traceback for composition errors, as Hydra documents.

    @hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
    @one_line_errors
    def main(cfg): ...

    if __name__ == "__main__":
        run_entry(main)
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from tcurlora_seg.errors import UserError

__all__ = ["ERRORS", "one_line", "one_line_errors", "run_entry"]

ERRORS = (UserError, HydraException, OmegaConfBaseException)
_ENV = "HYDRA_FULL_ERROR"


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (Hydra and OmegaConf messages span several)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or type(err).__name__


def _exit(err: BaseException) -> NoReturn:
    print(f"error: {one_line(err)}", file=sys.stderr)
    sys.exit(2)


def one_line_errors(task: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a Hydra task function: a UserError or config error exits with code 2 and one line on stderr."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except ERRORS as err:
            _exit(err)

    return wrapper


def run_entry(main: Callable[[], None]) -> None:
    """Call a ``@hydra.main`` function so that composition errors, too, are one line and exit code 2."""
    if os.environ.get(_ENV):
        main()
        return
    os.environ[_ENV] = "1"  # make Hydra raise instead of printing its multi-line report and exiting with 1
    try:
        main()
    except ERRORS as err:
        _exit(err)
    except OSError as err:
        if err.filename is None:  # not about a path the user gave: a bug, keep the traceback
            raise
        # e.g. Hydra cannot create hydra.run.dir (read-only parent, a file in the way), or a disk that filled up
        _exit(UserError(f"{err.filename}: {err.strerror}; check the path, its permissions and the free disk space"))
    finally:
        os.environ.pop(_ENV, None)

"""A run survives what happens to machines: SIGKILL at any moment, a full disk, an unwritable folder.

The end-to-end tests run ``python -m tcurlora_seg.train`` as a subprocess on the toy cohort with the tiny UNETR.
NaN/Inf steps are unit-tested with the handler (tests/engine/test_handlers.py); a checkpoint carrying pickled
objects is refused in tests/models/test_unetr.py.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tcurlora_seg.errors import UserError
from tcurlora_seg import atomic as atomic_module
from tcurlora_seg.models import checkpoint as checkpoint_module
from tcurlora_seg.models.checkpoint import save_checkpoint
from tests.test_train import REPO, tiny_run, train

EPOCHS = 30  # enough that three kills at random moments never meet the end of the run


def start(cwd: Path, *args: str, file_size_limit: int | None = None) -> subprocess.Popen:
    """The entry point as a background process; ``file_size_limit`` (bytes) makes larger writes fail like a full disk."""

    def limit() -> None:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "tcurlora_seg.train", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit if file_size_limit else None)


def temp_files(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob(".*.tmp"))


def wait_for_new_last(process: subprocess.Popen, last: Path, since: float, timeout: float = 300) -> None:
    """Until this process has written last.pt at least once (mtime after ``since``)."""
    deadline = time.time() + timeout
    while not (last.is_file() and last.stat().st_mtime > since):
        if process.poll() is not None:
            pytest.fail(f"the run ended before it was killed: {process.communicate()[1][-2000:]}")
        assert time.time() < deadline
        time.sleep(0.05)


def kill_mid_write(process: subprocess.Popen, run: Path, timeout: float = 60) -> bool:
    """SIGKILL as soon as a checkpoint's temporary file appears; True when that happened, False on timeout (killed then)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if temp_files(run):
            process.kill()
            return True
        time.sleep(0.001)
    process.kill()
    return False


def killed_run(tmp: Path, root: Path) -> Path:
    """A run SIGKILLed after it wrote its first last.pt: what a crashed machine leaves."""
    run = tmp / "run"
    process = start(tmp, *tiny_run(root, f"trainer.max_epochs={EPOCHS}", "trainer.val_interval=100"), f"hydra.run.dir={run}")
    wait_for_new_last(process, run / "checkpoints" / "last.pt", since=0.0)
    process.kill()
    process.communicate()
    return run


def test_sigkill_at_any_moment_leaves_a_loadable_last_and_resume_finishes(tmp_path, official_dataset):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    first = [*tiny_run(official_dataset, f"trainer.max_epochs={EPOCHS}", "trainer.val_interval=100"), f"hydra.run.dir={run}"]
    resume = ["trainer.resume=true", f"trainer.run_dir={run}"]
    rng = random.Random(0)
    mid_write = False
    for attempt in range(3):
        since = last.stat().st_mtime if last.is_file() else 0.0
        process = start(tmp_path, *(resume if attempt else first))
        wait_for_new_last(process, last, since)
        if attempt == 0:  # once while a checkpoint is being written ...
            mid_write = kill_mid_write(process, run)
        else:  # ... then anywhere
            time.sleep(rng.uniform(0.0, 1.0))
            process.kill()
        process.communicate()
        assert process.returncode == -signal.SIGKILL
        state = torch.load(last, weights_only=True)  # whole: the old file or the new one, never a mix
        assert 1 <= state["epoch"] < EPOCHS and state["iteration"] == 2 * state["epoch"]
    assert mid_write, "no checkpoint write was caught in progress"

    stopped = torch.load(last, weights_only=True)["epoch"]
    result = train(tmp_path, *resume)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming at epoch {stopped + 1} of {EPOCHS}" in result.stdout + result.stderr
    final = torch.load(last, weights_only=True)
    assert (final["epoch"], final["iteration"]) == (EPOCHS, 2 * EPOCHS)
    assert temp_files(run) == []  # what the kills left half-written was cleared on resume
    assert not list((tmp_path / "outputs").glob("**/config.yaml"))  # the resume calls left no run folders of their own


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    from tests.conftest import write_official_dataset

    tmp = tmp_path_factory.mktemp("crashed")
    return killed_run(tmp, write_official_dataset(tmp / "toy"))


@pytest.mark.xdist_group("crashed")  # both cases copy one killed run
@pytest.mark.parametrize("blocker", ["disk full", "read-only"])
def test_resume_into_a_full_or_read_only_folder_exits_2_and_keeps_last(tmp_path, crashed, blocker):
    if blocker == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the disk-full case covers the failed write")
    run = tmp_path / "run"
    shutil.copytree(crashed, run)
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    limit = None
    if blocker == "disk full":
        limit = 2**20  # logs, config and TensorBoard stay under 1 MB, a checkpoint of the tiny model does not
    else:
        (run / "checkpoints").chmod(0o555)
    try:
        process = start(tmp_path, "trainer.resume=true", f"trainer.run_dir={run}", file_size_limit=limit)
        _, stderr = process.communicate(timeout=600)
    finally:
        (run / "checkpoints").chmod(0o755)
    lines = stderr.strip().splitlines()
    assert process.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr and lines[-1].startswith("error: checkpoint "), stderr[-3000:]
    assert str(run / "checkpoints") in lines[-1] and "cannot write" in lines[-1], lines[-1]
    assert last.read_bytes() == before and temp_files(run) == []


@pytest.mark.parametrize("how", ["a file in the way", "read-only parent"])
def test_unwritable_output_folder_exits_2_with_one_line(tmp_path, official_dataset, how):
    parent = tmp_path / "parent"
    if how == "a file in the way":
        parent.write_text("not a folder\n")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent.mkdir()
        parent.chmod(0o555)
    try:
        result = train(tmp_path, *tiny_run(official_dataset), f"hydra.run.dir={parent / 'run'}")
    finally:
        if parent.is_dir():
            parent.chmod(0o755)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1 and lines[0].startswith("error:"), result.stderr[-3000:]
    assert str(parent / "run") in lines[0]
    assert not (parent / "run").exists()


def failing_save(error: BaseException):
    """torch.save that writes part of the file, then fails as a full disk does."""

    def save(obj, f):
        f.write(b"partial bytes")
        raise error

    return save


def torch_wrapped(error: OSError) -> RuntimeError:
    """torch.save turns a failed write into a RuntimeError whose context is the OSError."""
    try:
        raise error
    except OSError:
        try:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
        except RuntimeError as wrapped:
            return wrapped


@pytest.mark.parametrize("raised", ["OSError", "RuntimeError from torch"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, raised):
    path = save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"epoch": 1, "weights": torch.ones(3)})
    before = path.read_bytes()
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save(full if raised == "OSError" else torch_wrapped(full)))
    with pytest.raises(UserError) as caught:
        save_checkpoint(path, {"epoch": 2, "weights": torch.zeros(3)})
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "no space left" in message and "disk full" in message and "previous file is unchanged" in message
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary file left


def test_unwritable_checkpoint_folder_is_a_user_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path))

    monkeypatch.setattr(atomic_module.tempfile, "mkstemp", refuse)  # atomic_write makes every temporary file
    with pytest.raises(UserError, match=f"{tmp_path / 'best.pt'}: cannot write it .*not writable.*nothing was written"):
        save_checkpoint(tmp_path / "best.pt", {"epoch": 1})

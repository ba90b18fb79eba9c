"""``trainer.resume`` true | false | auto on a fixed run folder (hydra.run.dir, a sweep's job folder, a requeued
SLURM job): a finished or started run is continued or refused, never overwritten."""

from __future__ import annotations

from pathlib import Path

from tests.test_train import tiny_run, train


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "checkpoints").iterdir())}


def test_fixed_run_folder_is_refused_continued_or_started(tmp_path, official_dataset):
    run = tmp_path / "runs" / "a"
    args = tiny_run(official_dataset, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    first = train(tmp_path, *args, "trainer.resume=auto")  # nothing there yet: auto starts a new run
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(run)
    assert "last.pt" in before

    again = train(tmp_path, *args)  # resume=false into a folder holding a run
    assert again.returncode == 2
    error = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and str(run) in error[0] and "trainer.resume=true" in error[0], again.stderr[-2000:]
    assert snapshot(run) == before  # nothing overwritten

    auto = train(tmp_path, *args, "trainer.resume=auto")  # auto finds last.pt of its own folder: already finished
    assert auto.returncode == 0, auto.stderr[-2000:]
    assert "already finished its 1 epochs" in auto.stderr + auto.stdout
    assert snapshot(run) == before

    # resume=true with that folder as hydra.run.dir continues it, although outputs/ holds no run at all
    assert not (tmp_path / "outputs").exists()
    true = train(tmp_path, *args, "trainer.resume=true")
    assert true.returncode == 0 and "already finished its 1 epochs" in true.stderr + true.stdout, true.stderr[-2000:]
    assert snapshot(run) == before


def test_unknown_resume_mode_is_one_line(tmp_path, official_dataset):
    result = train(tmp_path, *tiny_run(official_dataset, "trainer.resume=maybe", f"hydra.run.dir={tmp_path / 'r'}"))
    assert result.returncode == 2 and "trainer.resume='maybe'" in result.stderr.strip().splitlines()[-1]


def test_resume_refuses_overrides_it_would_ignore(tmp_path, official_dataset):
    """A resumed run keeps the config it started with: a changed hyperparameter is an error, not silently dropped;
    the overrides the run started with (a requeued sweep job repeats them) and runtime keys pass."""
    run = tmp_path / "run"
    args = tiny_run(official_dataset, "trainer.max_epochs=1", f"hydra.run.dir={run}")
    assert train(tmp_path, *args).returncode == 0
    before = snapshot(run)

    changed = train(tmp_path, *args, "trainer.resume=true", f"trainer.run_dir={run}", "optim.lr=0.5",
                    "trainer.max_epochs=3")
    assert changed.returncode == 2
    error = changed.stderr.strip().splitlines()
    assert len([line for line in error if line.startswith("error:")]) == 1, changed.stderr[-2000:]
    assert "optim.lr=0.5 (the run has 0.001)" in error[-1] and "trainer.max_epochs=3 (the run has 1)" in error[-1]
    assert snapshot(run) == before

    same = train(tmp_path, *args, "trainer.resume=true", f"trainer.run_dir={run}", "trainer.progress=true")
    assert same.returncode == 0 and "already finished its 1 epochs" in same.stderr + same.stdout, same.stderr[-2000:]

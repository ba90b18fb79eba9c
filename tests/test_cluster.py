"""The SLURM launcher config (hydra-submitit-launcher) and the SLURM -> torch.distributed variables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tcurlora_seg.engine import distributed

REPO = Path(__file__).resolve().parents[1]


def test_slurm_launcher_composes_with_overrides(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # --cfg hydra prints the composed Hydra config (launcher included) without running or submitting anything
    result = subprocess.run(
        [sys.executable, "-m", "tcurlora_seg.train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
         "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4", "--cfg", "hydra"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["partition"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == ("gpu", 4, 4)
    assert launcher["max_num_timeout"] > 0 and launcher["submitit_folder"].endswith(".submitit/%j")


def test_multi_task_slurm_job_exports_torch_distributed_variables(monkeypatch):
    pytest.importorskip("submitit")
    # submitit writes os.environ itself: give it a copy, or WORLD_SIZE=4 would reach every later test's subprocess
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
             "SLURM_LOCALID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SUBMITIT_FOLDER": "unused"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    distributed._from_slurm()
    assert (os.environ["WORLD_SIZE"], os.environ["RANK"], os.environ["LOCAL_RANK"]) == ("4", "3", "1")
    assert os.environ["MASTER_ADDR"] == "gpu07" and int(os.environ["MASTER_PORT"]) > 0


def test_single_task_or_torchrun_is_left_alone(monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed._from_slurm()
    assert "WORLD_SIZE" not in os.environ
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun inside an allocation: its variables win
    distributed._from_slurm()
    assert os.environ["WORLD_SIZE"] == "2"

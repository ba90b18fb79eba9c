"""End to end through the real entry point (a subprocess, as a user runs it) on a toy cohort and a tiny UNETR."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tcurlora_seg.engine.run import restore_model
from tests.run_helpers import scalars, terminal_sigint

REPO = Path(__file__).resolve().parents[1]


def tiny_run(root: Path, *extra: str) -> list[str]:
    return [
        "data=official", f"data.root={root}", "data.roi_size=[32,32,32]", "data.batch_size=2", "data.num_workers=0",
        "data.cache=none", "model=unetr_tiny", "model.pretrained=null", "peft.rank=2", "trainer.max_epochs=2",
        "trainer.epoch_length=2", "trainer.val_interval=1", "trainer.sw_batch_size=2", "trainer.progress=false",
        "trainer.evaluate=false", "trainer.device=cpu", "trainer.checkpoint_interval=1", *extra,
    ]


def train(cwd: Path, *args: str, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "tcurlora_seg.train", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=terminal_sigint)  # Ctrl-C as at a terminal
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def only_run(cwd: Path) -> Path:
    runs = [p.parent for p in (cwd / "outputs").glob("**/config.yaml") if p.parent.name != ".hydra"]
    assert len(runs) == 1, runs
    return runs[0]


def test_training_writes_a_complete_run_folder_and_evaluates(tmp_path, official_dataset):
    from tests.conftest import make_tiny_unetr

    source = tmp_path / "source.pt"  # a "pretrained" tiny model in our checkpoint format
    torch.save({"model": make_tiny_unetr(seed=7).state_dict(), "config": {"seed": 7}}, source)
    result = train(tmp_path, *tiny_run(official_dataset, f"model.pretrained={source}", "trainer.evaluate=true",
                                       "trainer.evaluate_pretrained=true", "trainer.eval_average_last=2",
                                       "trainer.eval_min_component_mm3=1"))
    assert result.returncode == 0, result.stderr[-2000:]
    run = only_run(tmp_path)
    for folder, average_last in (("eval", 2), ("eval_pretrained", 1)):
        summary = json.loads((run / folder / "summary.json").read_text())
        assert summary["evaluation"]["n_cases"] == 2 and 0 <= summary["foreground_mean"]["Dice"] <= 100
        # the protocol of trainer.eval_*: softmax of the last 2 epochs, components under 1 mm³ removed, before and after
        assert (summary["evaluation"]["average_last"], summary["evaluation"]["min_component_mm3"]) == (average_last, 1.0)
    assert len(list((run / "eval" / "predictions").glob("*.nii.gz"))) == 2
    table = result.stdout[result.stdout.index("before (zero-shot)"):].splitlines()  # before | after | change
    before, after = (json.loads((run / f / "summary.json").read_text())["foreground_mean"] for f in ("eval_pretrained", "eval"))
    for line, key in zip(table[1:3], ("Dice", "HD95")):
        numbers = [float(v) for v in line.split()[-3:]]
        assert line.startswith(key) and numbers[:2] == [round(before[key], 2), round(after[key], 2)]
        assert numbers[2] == pytest.approx(after[key] - before[key], abs=0.011)
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert {"last.pt", "best.pt", "epoch_0001.pt", "epoch_0002.pt"} <= names
    assert (run / "split.json").is_file() and list((run / "tensorboard").glob("events.*"))
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and last["iteration"] == 4 and "optimizer" in last
    assert 0.0 <= last["metric"] <= 100.0  # validation Dice (%) of the best epoch
    assert set(last["adapter"]["state_dict"]) >= {"tcur_groups.attn.tcur_U", "decoder2.transp_conv.conv.weight"}
    # the run rebuilds into the trained model: U moved away from zero
    model, cfg, _ = restore_model(run, "last")
    assert cfg.peft.rank == 2 and model.tcur_groups["attn"].tcur_U.abs().sum() > 0
    check_adapter_folder(run, tmp_path)


def check_adapter_folder(run: Path, tmp_path: Path) -> None:
    """adapter/ (JSON + safetensors) is best.pt's adapter: checkpoint=adapter rebuilds the same model, and
    model.pretrained=RUN/adapter starts a new run from the merged fine-tuned model."""
    from tcurlora_seg.adapters import merged_state_dict
    from tcurlora_seg.errors import UserError
    from tcurlora_seg.models import build_unetr, load_pretrained

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["method"] == "tcurlora" and config["base_model_config"]["img_size"] == [32, 32, 32]
    best, _, _ = restore_model(run, "best")
    from_folder, _, payload = restore_model(run, "adapter")
    assert payload["adapter_folder"] == str(run / "adapter")
    expected = merged_state_dict(best)
    assert all(torch.equal(t, expected[k]) for k, t in merged_state_dict(from_folder).items())
    base = {k: v for k, v in config["base_model_config"].items() if k not in ("img_size", "seed")}
    again = build_unetr(base, img_size=[32, 32, 32])
    report = load_pretrained(again, run / "adapter")
    assert report.source_format == "adapter folder" and not report.missing
    assert all(torch.equal(t, expected[k]) for k, t in again.state_dict().items())
    with pytest.raises(UserError, match="holds no adapter_config.json"):
        restore_model(run, str(tmp_path))


def test_every_method_of_a_seed_trains_on_the_same_data_stream(tmp_path, official_dataset):
    """Common random numbers: the same case order, crops, flips and dropout masks for every method of a seed, however
    much randomness building the method used (LoRA draws its A; decoder-only and tCURLoRA draw nothing)."""
    first = {}
    for method, seed in (("decoder_only", 0), ("lora", 0), ("tcurlora", 0), ("decoder_only", 1)):
        run = tmp_path / f"{method}_{seed}"
        args = [o for o in tiny_run(official_dataset) if method != "decoder_only" or not o.startswith("peft.rank")]
        result = train(tmp_path, *args, f"peft={method}", f"seed={seed}", "trainer.max_epochs=1",
                       "trainer.epoch_length=1", f"hydra.run.dir={run}")
        assert result.returncode == 0, result.stderr[-2000:]
        first[method, seed] = scalars(run, "train/loss")[0]
    # every method starts at the base model's output (zero-effect init), so the same first batch gives the same loss
    assert first["lora", 0] == pytest.approx(first["decoder_only", 0], abs=1e-6)
    assert first["tcurlora", 0] == pytest.approx(first["decoder_only", 0], abs=1e-6)
    assert first["decoder_only", 1] != pytest.approx(first["decoder_only", 0], abs=1e-4)  # another seed: another start


def test_ctrl_c_saves_and_resume_continues_to_the_last_epoch(tmp_path, official_dataset):
    args = tiny_run(official_dataset, "trainer.max_epochs=40", "trainer.val_interval=100", "optim.adapter_lr=5e-2")
    process = train(tmp_path, *args, wait=False)
    deadline = time.time() + 300
    while not list((tmp_path / "outputs").glob("**/checkpoints/last.pt")):
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "trainer.resume=true" in stderr.splitlines()[-1]
    run = only_run(tmp_path)
    stopped = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert 1 <= stopped < 40

    resumed = train(tmp_path, "trainer.resume=true", f"trainer.run_dir={run}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming at epoch {stopped + 1} of 40" in resumed.stderr + resumed.stdout
    final = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert final["epoch"] == 40 and final["iteration"] == 80
    # both optimizer groups came through the resume: the decoder at optim.lr, tCURLoRA's U at optim.adapter_lr
    groups = final["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 5e-2] and len(groups[1]["params"]) == 3  # attn, mlp_up, mlp_down
    stats = json.loads((run / "train_stats.json").read_text())
    assert (stats["lr"], stats["adapter_lr"], stats["adapter_weight_decay"]) == (1e-3, 5e-2, 1e-5)
    # TensorBoard: both lrs per iteration, the poly schedule scaling both alike (the resumed process logs too)
    lr, adapter_lr = scalars(run, "train/lr"), scalars(run, "train/adapter_lr")
    assert len(lr) == len(adapter_lr) >= 40 and all(a == pytest.approx(50 * h, rel=1e-5) for h, a in zip(lr, adapter_lr))
    assert adapter_lr[0] < 5e-2 and adapter_lr[-1] < adapter_lr[0]
    assert stats["adapter_trainable"] == 2 * 2 * (48 + 12 + 12)  # U of rank 2 per tensor: r² · n3
    assert only_run(tmp_path) == run  # no second run folder


@pytest.mark.parametrize(
    "args, needle",
    [
        (["data=official", "data.root=does/not/exist"], "data/README.md"),
        (["trainer.max_epoch=3"], "max_epoch"),
        (["peft.rank=0", "model.pretrained=null"], "peft.rank"),
        (["trainer.eval_average_last=8", "model.pretrained=null"], "trainer.keep_last_epochs=4"),
        (["trainer.eval_min_component_mm3=-5", "model.pretrained=null"], "trainer.eval_min_component_mm3"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, needle):
    result = train(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_shape_mismatched_checkpoint_exits_2(tmp_path, official_dataset):
    from tests.conftest import make_tiny_unetr

    wrong = make_tiny_unetr(hidden_size=64, num_heads=4, mlp_dim=128)
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in wrong.state_dict().items()}, "optim_dict": {}},
               tmp_path / "wrong.pth")
    result = train(tmp_path, *tiny_run(official_dataset, f"model.pretrained={tmp_path / 'wrong.pth'}"))
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "wrong.pth" in error[0] and "hidden_size" in error[0]


def test_zero_adapter_lr_exports_the_pretrained_vit_bit_for_bit(tmp_path, official_dataset):
    """optim.adapter_lr=0: U never moves, so the merged export's ViT is the source model's, while the decoder trained."""
    from tests.conftest import make_tiny_unetr

    source = make_tiny_unetr(seed=7).state_dict()
    torch.save({"model": source, "config": {"seed": 7}}, tmp_path / "source.pt")
    result = train(tmp_path, *tiny_run(official_dataset, f"model.pretrained={tmp_path / 'source.pt'}", "optim.adapter_lr=0",
                                       f"export_model={tmp_path / 'merged.pt'}"))
    assert result.returncode == 0, result.stderr[-2000:]
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)["model"]
    vit = [k for k in source if k.startswith("vit.")]
    assert vit and all(torch.equal(merged[k], source[k]) for k in vit)
    assert not torch.equal(merged["decoder2.transp_conv.conv.weight"], source["decoder2.transp_conv.conv.weight"])


def test_swin_unetr_trains_evaluates_and_exports_like_unetr(tmp_path, official_dataset):
    """model=swin_unetr_tiny through the same entry point: a pretrained SwinUNETR, tCURLoRA per stage, evaluation,
    the adapter folder, the merged export and the MONAI Bundle's network (a plain SwinUNETR)."""
    from monai.bundle import ConfigParser
    from omegaconf import OmegaConf

    from tcurlora_seg.engine.bundle import export_bundle
    from tcurlora_seg.models import build_network, load_pretrained

    model_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "swin_unetr_tiny.yaml"))
    torch.manual_seed(7)
    source = tmp_path / "swin_source.pt"
    torch.save({"model": build_network(model_cfg).state_dict(), "config": {"model": model_cfg}}, source)
    args = [a for a in tiny_run(official_dataset) if not a.startswith(("data.roi_size", "model=", "trainer.max_epochs",
                                                                      "trainer.epoch_length", "data.batch_size"))]
    result = train(tmp_path, *args, "model=swin_unetr_tiny", "data.roi_size=[64,64,64]", f"model.pretrained={source}",
                   "trainer.max_epochs=1", "trainer.epoch_length=1", "data.batch_size=1", "trainer.evaluate=true",
                   "trainer.evaluate_pretrained=false", "peft.rank=4", f"export_model={tmp_path / 'merged.pt'}")
    assert result.returncode == 0, result.stderr[-2000:]
    run = only_run(tmp_path)
    assert json.loads((run / "eval" / "summary.json").read_text())["evaluation"]["n_cases"] == 2
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_config"]["backbone"] == "swin_unetr" and config["base_model_config"]["img_size"] == [64] * 3
    model, _, _ = restore_model(run, "adapter")
    assert {f"attn_layers{i}" for i in range(1, 5)} <= set(model.tcur_groups)
    assert model.tcur_groups["attn_layers1"].tcur_U.abs().sum() > 0  # trained
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)["model"]
    again = build_network(model_cfg)
    assert load_pretrained(again, run / "adapter").source_format == "adapter folder"
    assert all(torch.equal(t, merged[k]) for k, t in again.state_dict().items())

    bundle = export_bundle(run, tmp_path / "bundle")
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    network = parser.get_parsed_content("network_def")
    assert type(network).__name__ == "SwinUNETR"
    network.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))  # strict: the same network

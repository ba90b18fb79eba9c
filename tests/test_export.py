"""`python -m tcurlora_seg.export`: a run as a MONAI Bundle that MONAI alone runs, giving predict's masks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tcurlora_seg.engine.predict import predict
from tcurlora_seg.engine.run import load_run_config
from tests.run_helpers import REPO, make_dataset, make_run, one_thread, write_scan
from tests.test_evaluate import assert_one_line_error, run_module

_threads = pytest.fixture(scope="module", autouse=True)(one_thread)
pytestmark = pytest.mark.xdist_group("export")  # one worker builds the two runs the tests share

# the keys the bundle spec makes mandatory in metadata.json (verify_metadata checks them against a schema that it
# downloads, which an offline machine cannot)
MANDATORY = {"version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
             "description", "authors", "copyright", "network_data_format"}
DESCRIBED = {"type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data", "channel_def"}


def monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """MONAI's own CLI, in a process that cannot import tcurlora_seg: the bundle needs MONAI alone."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    code = ("import sys, runpy\n"
            "class Block:\n"  # any import of tcurlora_seg fails, however it is installed
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'tcurlora_seg': raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "sys.argv = ['monai.bundle', *sys.argv[1:]]\n"
            "runpy.run_module('monai.bundle', run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


SETTINGS = {
    "as stored": [],
    "reoriented and resampled": ["data.orientation=LPS", "data.spacing=[1.5,1.5,1.5]"],
    # MSD Task01's layout: channels in a 4-D file's 4th axis, data.modality picks one (here the second)
    "4-D files, data.modality=[1], reoriented": ["data.modality=[1]", "data.orientation=LPS"],
}


@pytest.fixture(scope="module", params=list(SETTINGS))
def run(request, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    return make_run(root / "run", make_dataset(root / "ds", {"train": [1], "test": [2]}), SETTINGS[request.param], epochs=())


def as_4d(scan: Path, channel: int, seed: int) -> None:
    """Rewrite ``scan`` as a 4-D file of 3 channels, the scan in ``channel`` and other contrasts in the rest."""
    image = nib.load(scan)
    data = np.asarray(image.dataobj)
    rng = np.random.default_rng(seed)
    others = [data[::-1] + rng.uniform(0, 1, data.shape).astype(np.float32) * (data > 0) for _ in range(2)]
    nib.save(nib.Nifti1Image(np.stack([*others[:channel], data, *others[channel:]], axis=-1), image.affine), scan)


def test_the_bundle_runs_with_monai_alone_and_gives_predicts_masks(run: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    result = run_module("tcurlora_seg.export", f"run_dir={run}", f"out={bundle}", "authors=A. Tester", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()} == {
        "configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE"}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert MANDATORY <= meta.keys() and meta["authors"] == "A. Tester"
    io = meta["network_data_format"]
    assert DESCRIBED <= io["inputs"]["image"].keys() and DESCRIBED <= io["outputs"]["pred"].keys()
    assert io["inputs"]["image"]["spatial_shape"] == [32, 32, 32] and io["outputs"]["pred"]["num_channels"] == 2
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(isinstance(t, torch.Tensor) for t in weights.values()) and not any("tcur" in k for k in weights)

    config, metadata = bundle / "configs" / "inference.json", bundle / "configs" / "metadata.json"
    verify = monai_bundle("verify_net_in_out", "network_def", "--meta_file", str(metadata), "--config_file", str(config),
                          cwd=tmp_path)
    assert verify.returncode == 0 and "verified with no error" in verify.stdout + verify.stderr, verify.stderr[-2000:]

    scans = tmp_path / "scans"
    write_scan(scans / "a", seed=5)
    write_scan(scans / "b", seed=6, shape=(30, 26, 18), affine=np.diag([1.5, 1.5, 2.0, 1.0]))
    for mask in scans.glob("*_mask.nii.gz"):
        mask.unlink()
    modality = load_run_config(run).data.get("modality")
    if modality is not None:
        for seed, scan in enumerate(sorted(scans.iterdir())):
            as_4d(scan, int(modality[0]), seed)
        assert all(nib.load(p).ndim == 4 for p in scans.iterdir())
    done = monai_bundle("run", "--config_file", str(config), "--meta_file", str(metadata), "--bundle_root", str(bundle),
                        "--input_dir", str(scans), "--output_dir", str(tmp_path / "bundle_masks"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = predict(run, scans, tmp_path / "masks", device="cpu", progress=False)
    assert sorted(p.name for p in (tmp_path / "bundle_masks").iterdir()) == sorted(p.name for p in expected)
    for path in expected:
        ours, theirs = nib.load(path), nib.load(tmp_path / "bundle_masks" / path.name)
        assert theirs.shape == ours.shape and np.allclose(theirs.affine, ours.affine)
        np.testing.assert_array_equal(np.asarray(theirs.dataobj), np.asarray(ours.dataobj))
    assert sum(np.asarray(nib.load(p).dataobj).any() for p in expected) >= 1  # not two empty masks agreeing


def test_bad_export_calls_are_one_line_errors(run: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_module("tcurlora_seg.export", f"run_dir={run}", cwd=tmp_path), "out")
    assert_one_line_error(run_module("tcurlora_seg.export", f"run_dir={tmp_path / 'nope'}", f"out={tmp_path / 'b'}",
                                     cwd=tmp_path), "run_dir=", "config.yaml")
    assert_one_line_error(run_module("tcurlora_seg.export", f"run_dir={run}", f"out={run}", cwd=tmp_path),
                          "out=", "run folder")
    assert_one_line_error(run_module("tcurlora_seg.export", f"run_dir={run}", f"out={tmp_path / 'b'}",
                                     "checkpoint=epoch_0042", cwd=tmp_path), "epoch_0042")
    assert not (tmp_path / "b").exists()


def test_a_bundle_is_a_source_model_for_the_next_fine_tuning(run: Path, tmp_path: Path, request) -> None:
    """The round trip: export a fine-tuned run, then fine-tune again from the Bundle (model.pretrained=BUNDLE): the
    rebuilt base is the bundle's network, tensor for tensor, and training from it runs."""
    from tcurlora_seg.engine.run import build_model, load_run_config
    from tests.test_train import only_run, tiny_run, train

    bundle = tmp_path / "bundle"
    assert run_module("tcurlora_seg.export", f"run_dir={run}", f"out={bundle}", cwd=tmp_path).returncode == 0
    cfg = load_run_config(run)
    cfg.model.pretrained = str(bundle)
    model, report = build_model(cfg)
    weights = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert report.source_format == "MONAI Bundle" and set(report.loaded) == set(weights)
    assert "Bundle network UNETR: the same architecture as the run's model." in report.notes
    base = model.state_dict()  # frozen ViT keys keep their names under the adapter
    assert all(torch.equal(base[k], weights[k]) for k in weights if k.startswith("vit.") and k in base)
    if request.node.callspec.params["run"] != "as stored":
        return  # one fine-tuning through the entry point is enough
    result = train(tmp_path, *tiny_run(Path(cfg.data.root), f"model.pretrained={bundle}", "trainer.max_epochs=1",
                                       "trainer.epoch_length=1", "trainer.val_interval=0"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MONAI Bundle format" in result.stdout + result.stderr
    assert (only_run(tmp_path) / "checkpoints" / "best.pt").is_file() or (only_run(tmp_path) / "checkpoints" / "last.pt").is_file()

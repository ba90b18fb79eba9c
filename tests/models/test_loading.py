"""Pretrained sources users really have: another input size, another channel count, another Swin window, a MONAI
Bundle; what is adapted is exact where it can be and written in the load report, and what cannot be is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNETR
from omegaconf import OmegaConf

from tcurlora_seg.errors import UserError
from tcurlora_seg.models import build_network, build_unetr, load_pretrained
from tcurlora_seg.models.loading import resample_grid
from tests.models.test_unetr import tiny, tiny_cfg

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def save(model: torch.nn.Module, path: Path, **config) -> Path:
    payload = {"model": model.state_dict()}
    if config:
        payload["config"] = {"model": config}
    torch.save(payload, path)
    return path


# --- input size: position embeddings over the patch grid --------------------------------------------------------------

def centres(src: int, dst: int) -> torch.Tensor:
    """Where the dst cell centres of a resampled axis fall in the source's cell coordinates (align_corners False)."""
    return (torch.arange(dst) + 0.5) * src / dst - 0.5


def test_resample_grid_reproduces_a_linear_field_axis_by_axis():
    """Trilinear resampling is exact on a linear function of the grid position; distinct slopes per axis and a
    non-cubic target catch an axis order mixed up between the flat table and the grid."""
    src, dst = (8, 8, 8), (3, 4, 3)
    slopes = torch.tensor([[1.0, -2.0], [10.0, 0.5], [100.0, 3.0]])  # (axis, channel)
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in src], indexing="ij"), -1)
    table = (grid.reshape(-1, 3) @ slopes.double()).float()  # (512, 2), row-major (d, h, w)
    out = resample_grid(table, src, dst)
    new = torch.stack(torch.meshgrid(*[centres(s, d) for s, d in zip(src, dst)], indexing="ij"), -1)
    torch.testing.assert_close(out, (new.reshape(-1, 3) @ slopes).float(), rtol=1e-5, atol=1e-4)
    assert resample_grid(table, src, src) is table


def test_a_128_cubed_vit_b_loads_into_the_msd_hippocampus_size_with_resampled_position_embeddings(tmp_path):
    """The issue's case at the real ViT-B shape: the BraTS source (128³: 8x8x8 patches of 768) into
    +experiment=msd_hippocampus (roi 48x64x48: 3x4x3 patches)."""
    paper = OmegaConf.load(CONFIGS / "unetr.yaml")
    torch.manual_seed(0)
    source = build_unetr(paper)
    path = save(source, tmp_path / "source_unetr.pt", img_size=[128, 128, 128])
    target = build_unetr(OmegaConf.merge(paper, {"img_size": [48, 64, 48]}), img_size=[48, 64, 48])
    report = load_pretrained(target, path)
    pos = target.state_dict()["vit.patch_embedding.position_embeddings"]
    assert pos.shape == (1, 36, 768)
    expected = resample_grid(source.state_dict()["vit.patch_embedding.position_embeddings"][0], (8, 8, 8), (3, 4, 3))
    torch.testing.assert_close(pos[0], expected)
    assert any("8x8x8 to a 3x4x3" in note for note in report.notes), report.notes
    assert "vit.blocks.11.mlp.linear2.weight" in report.loaded and not report.reinitialised
    del source, target


def test_equal_img_size_stays_bit_exact_and_notes_nothing(tmp_path):
    source = tiny()
    report = load_pretrained(target := build_unetr(tiny_cfg()), save(source, tmp_path / "same.pt"))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    assert not any("resampled" in n for n in report.notes)


def test_a_model_at_another_size_runs_the_resampled_embeddings(tmp_path):
    """A plain state dict (no recorded size) of a cubic grid: the grid is read from the number of patches."""
    path = tmp_path / "64.pt"
    torch.save(tiny(img_size=64).state_dict(), path)
    target = build_unetr(tiny_cfg(img_size=[32, 48, 32])).eval()
    report = load_pretrained(target, path)
    assert any("4x4x4 to a 2x3x2" in n for n in report.notes)
    assert target(torch.randn(1, 1, 32, 48, 32)).shape == (1, 2, 32, 48, 32)


def test_a_non_cubic_grid_without_a_recorded_size_is_one_error_line(tmp_path):
    torch.save(tiny(img_size=[32, 48, 32]).state_dict(), tmp_path / "odd.pt")
    with pytest.raises(UserError, match="no cube of patches") as info:
        load_pretrained(build_unetr(tiny_cfg()), tmp_path / "odd.pt")
    assert "odd.pt" in str(info.value) and "\n" not in str(info.value)


def test_a_non_cubic_grid_with_its_recorded_size_resamples(tmp_path):
    path = save(tiny(img_size=[32, 48, 32]), tmp_path / "odd.pt", img_size=[32, 48, 32])
    report = load_pretrained(build_unetr(tiny_cfg()), path)
    assert any("2x3x2 to a 2x2x2" in n for n in report.notes)


@pytest.mark.parametrize("overrides, needle", [
    ({"hidden_size": 96}, "hidden_size"),
    ({"mlp_dim": 192}, "mlp_dim"),
])
def test_what_cannot_be_adapted_is_refused_naming_it(tmp_path, overrides, needle):
    torch.save(tiny(**overrides).state_dict(), tmp_path / "other.pt")
    target = build_unetr(tiny_cfg())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_pretrained(target, tmp_path / "other.pt")
    assert needle in str(info.value) and "other.pt" in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_another_patch_size_is_refused_naming_it(tmp_path):
    state = tiny().state_dict()
    state["vit.patch_embedding.patch_embeddings.weight"] = torch.randn(48, 1, 8, 8, 8)  # a patch-8 ViT
    torch.save(state, tmp_path / "patch8.pt")
    with pytest.raises(UserError, match=r"patch_size=\[8, 8, 8\]"):
        load_pretrained(build_unetr(tiny_cfg()), tmp_path / "patch8.pt")


# --- input channels ---------------------------------------------------------------------------------------------------

def four_channel_source(tmp_path: Path, **overrides) -> tuple[UNETR, Path]:
    source = tiny(in_channels=4, **overrides)
    return source, save(source, tmp_path / "brats4.pt")


@pytest.mark.parametrize("proj_type", ["conv", "perceptron"])
def test_a_channel_map_reads_the_named_source_channel(tmp_path, proj_type):
    """[1] (BraTS t1ce of t1, t1ce, t2, flair): the 1-channel model on x computes what the 4-channel source computes
    on an input whose channel 1 is x and the others zero, through the patch embedding and encoder1 alike."""
    source, path = four_channel_source(tmp_path, proj_type=proj_type)
    target = build_unetr(tiny_cfg(proj_type=proj_type)).eval()
    report = load_pretrained(target, path, channels=[1])
    x = torch.randn(1, 1, 32, 32, 32)
    padded = torch.cat([torch.zeros_like(x), x, torch.zeros_like(x), torch.zeros_like(x)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(padded), rtol=1e-4, atol=1e-5)
    note = next(n for n in report.notes if n.startswith("Input channels 4 -> 1"))
    assert "source channel 1" in note and "encoder1.layer.conv1.conv.weight" in note


def test_mean_keeps_the_first_activations_on_alike_channels(tmp_path):
    """mean: the model on x equals the source on x repeated in all four channels."""
    source, path = four_channel_source(tmp_path)
    target = build_unetr(tiny_cfg()).eval()
    report = load_pretrained(target, path, channels="mean")
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x.expand(-1, 4, -1, -1, -1)), rtol=1e-4, atol=1e-5)
    assert any("mean" in n for n in report.notes)


def test_one_channel_source_into_two_channels(tmp_path):
    source = tiny()
    target = build_unetr(tiny_cfg(in_channels=2)).eval()
    load_pretrained(target, save(source, tmp_path / "t1ce.pt"), channels=[0, 0])
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():  # both channels read the one source filter: x in one, zero in the other is the source on x
        torch.testing.assert_close(target(torch.cat([x, torch.zeros_like(x)], 1)), source(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("channels, needles", [
    (None, ["model.pretrained_channels", "4 input channel", "the model 1"]),
    ([4], ["model.pretrained_channels", "index 4 out of range", "4 input channel"]),
    ([0, 1], ["model.pretrained_channels", "2 entries", "1 input"]),
    ("first", ["model.pretrained_channels", "mean"]),
])
def test_channel_problems_are_one_line_naming_the_key(tmp_path, channels, needles):
    _, path = four_channel_source(tmp_path)
    target = build_unetr(tiny_cfg())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_pretrained(target, path, channels=channels)
    message = str(info.value)
    assert all(n in message for n in needles), message
    assert "\n" not in message and "brats4.pt" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


# --- Swin UNETR: window size and channels -----------------------------------------------------------------------------

def swin(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "swin_unetr_tiny.yaml"), overrides)
    return build_network(cfg).eval()


def test_swin_window_7_source_into_a_window_4_model_resamples_every_bias_table(tmp_path):
    source = swin(window_size=7)
    path = save(source, tmp_path / "swin7.pt")
    target = swin(window_size=4)
    report = load_pretrained(target, path)
    key = "swinViT.layers1.0.blocks.0.attn.relative_position_bias_table"
    assert target.state_dict()[key].shape == (343, 3)
    torch.testing.assert_close(target.state_dict()[key], resample_grid(source.state_dict()[key], (13,) * 3, (7,) * 3))
    note = next(n for n in report.notes if "Relative-position bias" in n)
    assert "of 8 blocks" in note and "window 7x7x7 to 4x4x4" in note
    with torch.no_grad():
        assert target(torch.randn(1, 1, 64, 64, 64)).shape == (1, 2, 64, 64, 64)


def test_swin_equal_windows_stay_bit_exact(tmp_path):
    source = swin()
    target = swin()
    torch.manual_seed(5)
    for p in target.parameters():
        torch.nn.init.normal_(p)
    report = load_pretrained(target, save(source, tmp_path / "swin.pt"))
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    assert not any("resampled" in n for n in report.notes)


def test_swin_mean_channels_keep_the_first_activations(tmp_path):
    source = swin(in_channels=4)
    target = swin()
    load_pretrained(target, save(source, tmp_path / "swin4.pt"), channels="mean")
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x.expand(-1, 4, -1, -1, -1)), rtol=1e-4, atol=1e-4)


# --- MONAI Bundles ------------------------------------------------------------------------------------------------------

def write_bundle(root: Path, model: torch.nn.Module, network_def: dict, **extra) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps({**extra, "network_def": network_def}))
    torch.save(model.state_dict(), root / "models" / "model.pt")
    return root


TINY_DEF = {"_target_": "UNETR", "in_channels": 1, "out_channels": 2, "feature_size": 8, "hidden_size": 48,
            "mlp_dim": 96, "num_heads": 3, "proj_type": "conv", "dropout_rate": 0.1}


def test_a_bundle_trained_at_96_loads_with_references_resolved_and_differences_reported(tmp_path):
    """A model-zoo style bundle: network_def with @-references, img_size as one int, another class count."""
    source = tiny(img_size=64, out_channels=14)
    bundle = write_bundle(tmp_path / "zoo", source, {**TINY_DEF, "img_size": "@image_size", "out_channels": 14,
                                                      "dropout_rate": 0.0}, image_size=64)
    target = build_unetr(tiny_cfg())
    report = load_pretrained(target, bundle)
    assert report.source_format == "MONAI Bundle" and report.out_reinitialised
    note = next(n for n in report.notes if n.startswith("Bundle network UNETR"))
    assert "img_size [64, 64, 64] vs the model's [32, 32, 32] (position embeddings resampled)" in note
    assert "out_channels 14 vs the model's 2 (head re-initialised)" in note
    assert "dropout_rate 0.0 vs the model's 0.1 (holds no weights)" in note
    assert any("4x4x4 to a 2x2x2" in n for n in report.notes)
    assert torch.equal(target.state_dict()["vit.blocks.3.attn.qkv.weight"], source.state_dict()["vit.blocks.3.attn.qkv.weight"])


@pytest.mark.parametrize("network_def, needles", [
    ({**TINY_DEF, "img_size": 32, "num_heads": 6}, ["num_heads 6 vs the model's 3", "cannot be adapted"]),
    ({**TINY_DEF, "img_size": 32, "hidden_size": 96}, ["hidden_size 96 vs the model's 48"]),
    ({"_target_": "BasicUNet", "spatial_dims": 3}, ["BasicUNet", "neither UNETR nor SwinUNETR"]),
    ({"_target_": "monai.networks.nets.SwinUNETR", "in_channels": 1, "out_channels": 2}, ["set model=swin_unetr"]),
])
def test_a_bundle_that_cannot_be_adapted_is_one_error_line(tmp_path, network_def, needles):
    bundle = write_bundle(tmp_path / "b", tiny(), network_def)
    with pytest.raises(UserError) as info:
        load_pretrained(build_unetr(tiny_cfg()), bundle)
    message = str(info.value)
    assert all(n in message for n in needles) and str(bundle) in message and "\n" not in message, message


def test_a_bundle_without_weights_or_network_is_one_error_line(tmp_path):
    bundle = write_bundle(tmp_path / "b", tiny(), {**TINY_DEF, "img_size": 32})
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(UserError, match="models/model.pt"):
        load_pretrained(build_unetr(tiny_cfg()), bundle)
    (bundle / "configs" / "inference.json").write_text(json.dumps({"inferer": {}}))
    with pytest.raises(UserError, match="no network_def"):
        load_pretrained(build_unetr(tiny_cfg()), bundle)
    (bundle / "configs" / "inference.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable bundle config"):
        load_pretrained(build_unetr(tiny_cfg()), bundle)


def test_a_plain_folder_is_refused_naming_what_it_should_hold(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError, match="neither an adapter folder.*nor a MONAI Bundle"):
        load_pretrained(build_unetr(tiny_cfg()), tmp_path / "weights")


def test_a_swin_bundle_loads_into_swin_unetr(tmp_path):
    source = swin()
    bundle = write_bundle(tmp_path / "swin", source, {"_target_": "SwinUNETR", "spatial_dims": 3, "img_size": 64,
                                                       "in_channels": 1, "out_channels": 2, "feature_size": 12,
                                                       "window_size": 7, "use_checkpoint": True})
    target = swin()
    report = load_pretrained(target, bundle)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    assert report.source_format == "MONAI Bundle"
    assert "Bundle network SwinUNETR: the same architecture as the run's model." in report.notes

"""Swin UNETR from config, its constraints, and pretrained checkpoints in every layout (all built here, none downloaded)."""

from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from omegaconf import OmegaConf

from tcurlora_seg.errors import UserError
from tcurlora_seg.models import build_network, load_pretrained, save_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def tiny_cfg(**overrides):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "swin_unetr_tiny.yaml"))
    return {**cfg, **overrides}


def tiny(seed=0, **overrides) -> SwinUNETR:
    torch.manual_seed(seed)
    return build_network(tiny_cfg(**overrides)).eval()


def encoded(model, x):
    with torch.no_grad():
        return torch.cat([h.flatten() for h in model.swinViT(x, model.normalize)])


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(1, 1, 32, 32, 32)


def test_configs_build_the_usual_swin_unetr_and_a_tiny_one():
    usual = build_network(OmegaConf.load(CONFIGS / "swin_unetr.yaml"))
    assert isinstance(usual, SwinUNETR)
    assert usual.swinViT.patch_embed.proj.out_channels == 48
    assert [len(getattr(usual.swinViT, f"layers{i}")[0].blocks) for i in range(1, 5)] == [2, 2, 2, 2]
    assert usual.swinViT.layers4[0].blocks[0].attn.num_heads == 24
    assert usual.swinViT.layers1[0].blocks[0].window_size == (7, 7, 7)
    assert tiny().swinViT.layers1[0].blocks[0].attn.qkv.weight.shape == (36, 12)


@pytest.mark.parametrize("overrides, roi, match", [
    ({"feature_size": 16}, None, "model.feature_size: .*multiple of 12"),
    ({"img_size": [32, 32, 32]}, None, r"model.img_size: .*at least 64.*model.img_size=\[64, 64, 64\]"),
    ({"img_size": [64, 80, 64]}, None, "multiple of 32"),
    ({}, [96, 96, 96], r"differs from data.roi_size \[96, 96, 96\]"),
    ({"depths": [2, 2, 2]}, None, "four stages"),
    ({"num_heads": [5, 6, 12, 24]}, None, "stage 1 is 12 wide, not a multiple of 5 heads"),
    ({"hidden_size": 768}, None, "model.hidden_size: unknown key for backbone swin_unetr"),
    ({"backbone": "swin"}, None, "model.backbone: 'swin' is not one of unetr, swin_unetr"),
])
def test_bad_configs_raise_one_error_naming_the_key(overrides, roi, match):
    with pytest.raises(UserError, match=match):
        build_network(tiny_cfg(**overrides), img_size=roi)


@pytest.mark.parametrize("layout", ["plain", "module_prefix", "state_dict", "ours"])
def test_swin_unetr_state_dicts_load_exactly(tmp_path, x, layout):
    source = tiny(seed=1)
    state = source.state_dict()
    payload = {
        "plain": state,
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
        "state_dict": {"state_dict": state},
        "ours": {"model": state, "config": {"model": tiny_cfg()}},
    }[layout]
    torch.save(payload, tmp_path / "swin.pt")
    target = tiny(seed=2)
    report = load_pretrained(target, tmp_path / "swin.pt")
    assert not report.missing and not report.unexpected and not report.reinitialised
    torch.testing.assert_close(encoded(target, x), encoded(source, x), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), state.values()))


def self_supervised_checkpoint(model: SwinUNETR) -> dict:
    """MONAI's self-supervised encoder layout (model_swinvit.pt): ``module.``-prefixed transformer keys with
    ``mlp.fc1`` / ``mlp.fc2``, the pretext heads, no decoder."""
    state = {}
    for key, value in model.swinViT.state_dict().items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[f"module.{key}"] = value
    state["module.rotation_head.weight"] = torch.zeros(4, 96)
    state["module.contrastive_head.weight"] = torch.zeros(512, 96)
    state["module.convTrans3d.weight"] = torch.zeros(96, 1, 32, 32, 32)
    return {"epoch": 100, "state_dict": state}


def test_self_supervised_encoder_loads_the_transformer_and_reports_the_rest(tmp_path, x):
    source = tiny(seed=1)
    torch.save(self_supervised_checkpoint(source), tmp_path / "model_swinvit.pt")
    target = tiny(seed=2)
    encoder_before = target.encoder1.layer.conv1.conv.weight.clone()
    report = load_pretrained(target, tmp_path / "model_swinvit.pt")
    assert report.source_format == "self-supervised Swin encoder"
    torch.testing.assert_close(encoded(target, x), encoded(source, x), rtol=0, atol=0)
    assert torch.equal(target.encoder1.layer.conv1.conv.weight, encoder_before)  # initialisation kept
    assert {k.split(".")[0] for k in report.missing} == {"encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
                                                          "decoder1", "decoder2", "decoder3", "decoder4", "decoder5", "out"}
    assert {k.split(".")[0] for k in report.unexpected} == {"rotation_head", "contrastive_head", "convTrans3d"}
    assert "Self-supervised encoder layout" in report.summary()


def test_other_class_count_reinitialises_the_head_and_says_so(tmp_path):
    torch.save(tiny(seed=1, out_channels=4).state_dict(), tmp_path / "four.pt")
    report = load_pretrained(tiny(), tmp_path / "four.pt")
    assert report.out_reinitialised and "4 classes, the model 2" in report.summary()


@pytest.mark.parametrize("source, model, match", [
    ({"feature_size": 24}, {}, r"transformer/encoder tensors do not fit.*feature_size=24, depths=\[2, 2, 2, 2\]"),
    ({"depths": [2, 2, 4, 2]}, {}, r"depths=\[2, 2, 4, 2\]"),
    ({"use_v2": True}, {}, r"layers1c.*use_v2"),
])
def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, source, model, match):
    torch.save(tiny(seed=1, **source).state_dict(), tmp_path / "other.pt")
    with pytest.raises(UserError, match=match):
        load_pretrained(tiny(**model), tmp_path / "other.pt")


def test_a_checkpoint_of_the_other_patch_merging_order_is_refused(tmp_path):
    """merging and mergingv2 hold the same tensors but order the 2×2×2 neighbours differently: only our config tells."""
    path = save_checkpoint(tmp_path / "v2order.pt", {"model": tiny(downsample="mergingv2").state_dict(),
                                                     "config": {"model": tiny_cfg(downsample="mergingv2")}})
    with pytest.raises(UserError, match="model.downsample=mergingv2"):
        load_pretrained(tiny(), path)


def test_a_unetr_checkpoint_is_not_taken_for_a_swin_unetr(tmp_path):
    from tests.conftest import make_tiny_unetr

    torch.save(make_tiny_unetr().state_dict(), tmp_path / "unetr.pt")
    with pytest.raises(UserError, match="not a MONAI SwinUNETR checkpoint; it holds a UNETR.*model=unetr"):
        load_pretrained(tiny(), tmp_path / "unetr.pt")

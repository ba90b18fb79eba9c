"""UNETR construction from the real config files and pretrained loading in every accepted format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tcurlora_seg.errors import UserError
from tcurlora_seg.models import build_unetr, load_checkpoint, load_pretrained, save_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(CONFIGS / "unetr_tiny.yaml")
    return OmegaConf.merge(cfg, overrides)


def tiny(**overrides):
    torch.manual_seed(0)
    return build_unetr(tiny_cfg(**overrides)).eval()


def same_weights(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix))


def test_tiny_config_builds_the_described_unetr():
    model = tiny()
    assert model.vit.patch_embedding.position_embeddings.shape == (1, 8, 48)  # (32/16)^3 patches, hidden 48
    assert model.vit.blocks[0].mlp.linear1.weight.shape == (96, 48)
    assert model.vit.blocks[0].attn.qkv.bias is None  # qkv_bias: false
    assert model.encoder1.layer.conv1.conv.weight.shape[:2] == (8, 1)  # feature_size 8, one input channel
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2, 32, 32, 32)


def test_paper_config_matches_paper_architecture():
    cfg = OmegaConf.load(CONFIGS / "unetr.yaml")
    assert (cfg.hidden_size, cfg.mlp_dim, cfg.num_heads, cfg.feature_size) == (768, 3072, 12, 16)
    assert list(cfg.img_size) == [128] * 3 and cfg.proj_type == "conv" and cfg.qkv_bias is False
    assert cfg.dropout_rate == 0.1 and cfg.pretrained is None


def test_img_size_comes_from_roi_size_and_conflicts_are_refused():
    model = build_unetr(tiny_cfg(img_size=None), img_size=48)
    assert model.vit.patch_embedding.position_embeddings.shape[1] == 27
    with pytest.raises(UserError, match="data.roi_size"):
        build_unetr(tiny_cfg(), img_size=[64, 64, 64])
    with pytest.raises(UserError, match="multiple of"):
        build_unetr(tiny_cfg(img_size=40))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"hidden_size": 50}, "model.hidden_size"),
        ({"patch_size": 8}, "model.patch_size"),
        ({"hiden_size": 48}, "model.hiden_size"),
    ],
)
def test_bad_model_config_names_the_key(overrides, key):
    cfg = OmegaConf.merge(tiny_cfg(), OmegaConf.create(overrides))
    with pytest.raises(UserError, match=key):
        build_unetr(cfg)


def test_old_pos_embed_key_is_refused_with_the_new_name():
    cfg = OmegaConf.to_container(tiny_cfg())
    cfg["pos_embed"] = "conv"
    with pytest.raises(UserError, match="proj_type"):
        build_unetr(cfg)


def test_our_checkpoint_round_trip(tmp_path):
    source, target = tiny(img_size=16), build_unetr(tiny_cfg(img_size=16))
    payload = {"model": source.state_dict(), "config": {"model": tiny_cfg(img_size=16)}, "epoch": 3}
    path = save_checkpoint(tmp_path / "best.pt", payload)
    report = load_pretrained(target, path)
    assert same_weights(source, target)
    assert report.source_format == "tcurlora_seg"
    assert report.reinitialised == [] and not report.out_reinitialised
    # newer MONAI keys the model has: all present here, so nothing missing
    assert report.missing == [] and report.unexpected == []
    assert report.checkpoint_config["model"]["hidden_size"] == 48  # the DictConfig was stored as plain data
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(source(x), target.eval()(x))


def test_official_format_with_module_prefix_and_optimizer_loads(tmp_path):
    source, target = tiny(img_size=16), build_unetr(tiny_cfg(img_size=16))
    optimizer = torch.optim.Adam(source.parameters(), lr=1e-3)
    for p in source.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the optimizer state then holds tensors, as in the official files
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 999, "state_dict": state, "optim_dict": optimizer.state_dict()}, tmp_path / "model_last.pth")
    report = load_pretrained(target, tmp_path / "model_last.pth")
    assert report.source_format == "official"
    assert same_weights(source, target)
    assert len(report.loaded) == len(target.state_dict())


def test_old_monai_checkpoint_without_cross_attention_and_qkv_bias_loads(tmp_path):
    source = tiny(img_size=16)
    state = {k: v for k, v in source.state_dict().items() if "norm_cross_attn" not in k}
    state["vit.patch_embedding.cls_token"] = torch.zeros(1, 1, 48)  # stray key of old MONAI versions
    torch.save(state, tmp_path / "old.pt")
    target = build_unetr(tiny_cfg(img_size=16, qkv_bias=True))
    report = load_pretrained(target, tmp_path / "old.pt")
    assert report.source_format == "MONAI state_dict"
    assert report.unexpected == ["vit.patch_embedding.cls_token"]
    assert report.missing and all("norm_cross_attn" in k for k in report.missing)
    assert torch.count_nonzero(target.vit.blocks[0].attn.qkv.bias) == 0  # no bias == zero bias
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(source(x), target.eval()(x), atol=1e-6)
    assert "qkv" in report.summary()


def test_perceptron_patch_embedding_converts_exactly_to_conv(tmp_path):
    source = tiny(proj_type="perceptron")
    torch.save(source.state_dict(), tmp_path / "perceptron.pt")
    target = build_unetr(tiny_cfg()).eval()  # 32³: eight patches, so the patch layout matters
    report = load_pretrained(target, tmp_path / "perceptron.pt")
    assert any("perceptron" in n for n in report.notes)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.allclose(source(x), target(x), atol=1e-5)


def test_class_count_change_reinitialises_the_out_head(tmp_path):
    source = tiny(out_channels=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "three_classes.pt")
    target = build_unetr(tiny_cfg())
    report = load_pretrained(target, tmp_path / "three_classes.pt")
    assert report.out_reinitialised
    assert sorted(report.reinitialised) == ["out.conv.conv.bias", "out.conv.conv.weight"]
    assert same_weights(source, target, prefix="vit.") and same_weights(source, target, prefix="decoder2.")
    assert target.out.conv.conv.weight.shape[0] == 2
    assert "checkpoint has 3 classes, the model 2" in report.summary()


def test_shape_mismatched_vit_is_refused_naming_a_key(tmp_path):
    torch.save(tiny(hidden_size=96, num_heads=3, img_size=[48] * 3).state_dict(), tmp_path / "bigger.pt")
    target = build_unetr(tiny_cfg())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError) as info:
        load_pretrained(target, tmp_path / "bigger.pt")
    message = str(info.value)
    assert "vit.patch_embedding.position_embeddings" in message
    assert "hidden_size=96" in message and "img_size=48" in message  # what the checkpoint needs
    assert "\n" not in message and "bigger.pt" in message
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded


def test_non_strict_load_keeps_mismatched_vit_layers_at_initialisation(tmp_path):
    torch.save(tiny(mlp_dim=192).state_dict(), tmp_path / "wide_mlp.pt")  # another MLP width: cannot be adapted
    target = build_unetr(tiny_cfg())
    report = load_pretrained(target, tmp_path / "wide_mlp.pt", strict_vit=False)
    assert report.reinitialised and all(".mlp.linear" in k for k in report.reinitialised)
    assert "vit.blocks.0.attn.qkv.weight" in report.loaded


def test_missing_vit_block_is_refused(tmp_path):
    state = {k: v for k, v in tiny().state_dict().items() if not k.startswith("vit.blocks.11.")}
    torch.save(state, tmp_path / "eleven_blocks.pt")
    with pytest.raises(UserError, match=r"vit\.blocks\.11\..* \(missing\)"):
        load_pretrained(build_unetr(tiny_cfg()), tmp_path / "eleven_blocks.pt")


def test_unrelated_state_dict_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(UserError, match="not a MONAI UNETR"):
        load_pretrained(build_unetr(tiny_cfg()), tmp_path / "linear.pt")


class NotATensor:
    """Stands for any pickled Python object a malicious or careless checkpoint may carry."""


def test_pickle_payload_is_refused(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": tiny().state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(UserError, match="pickled.pt.*pickled Python objects"):
        load_pretrained(build_unetr(tiny_cfg()), path)


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "truncated.pt"
    torch.save({"model": tiny().state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated.pt.*not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_missing_and_non_dict_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="expected a dict"):
        load_checkpoint(tmp_path / "tensor.pt")


def test_atomic_save_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert load_checkpoint(path)["epoch"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(1000)})
    real_save = torch.save

    def partial_then_crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")  # half a zip, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", partial_then_crash)
    with pytest.raises(UserError, match="ckpt.pt: cannot write it .No space left on device.; the previous file is unchanged"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(1000)})
    monkeypatch.setattr(torch, "save", real_save)
    old = load_checkpoint(path)
    assert old["epoch"] == 1 and torch.equal(old["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_save_refuses_objects_that_weights_only_cannot_read(tmp_path):
    with pytest.raises(TypeError, match="payload.extra"):
        save_checkpoint(tmp_path / "x.pt", {"extra": NotATensor()})
    assert list(tmp_path.iterdir()) == []


def test_head_count_recorded_in_our_checkpoint_is_checked(tmp_path):
    # 48 channels split in 3 or 6 heads: same tensor shapes, different function
    payload = {"model": tiny(num_heads=6).state_dict(), "config": {"model": tiny_cfg(num_heads=6)}}
    save_checkpoint(tmp_path / "six_heads.pt", payload)
    with pytest.raises(UserError, match=r"num_heads \(checkpoint 6, model 3\)"):
        load_pretrained(build_unetr(tiny_cfg()), tmp_path / "six_heads.pt")

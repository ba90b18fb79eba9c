import io

import pytest
import torch

from tcurlora_seg.adapters import (
    adapter_layers,
    adapter_state_dict,
    apply_adapter,
    count_trainable,
    load_adapter_state_dict,
    merge_adapter,
    unmerge_adapter,
)
from tcurlora_seg.adapters.targets import group_targets, stack_group
from tcurlora_seg.adapters.tensor_cur import select_tensor_cur, tensor_cur_delta
from tests.conftest import make_tiny_unetr

L = 12  # MONAI's UNETR always has 12 blocks


def decoder_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in {"decoder2", "decoder3", "decoder4", "decoder5"})


def randomise_core(model, scale=0.05, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in model.tcur_groups.values():
            group.tcur_U.copy_(torch.randn(group.tcur_U.shape, generator=gen) * scale)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_zero_init_leaves_outputs_unchanged(tiny_unetr, volume):
    before = outputs(tiny_unetr, volume)
    apply_adapter(tiny_unetr, "tcurlora", rank=8)
    assert all(torch.count_nonzero(g.tcur_U) == 0 for g in tiny_unetr.tcur_groups.values())
    torch.testing.assert_close(outputs(tiny_unetr, volume), before, rtol=0, atol=0)


def test_gradient_reaches_core_tensor_and_step_changes_it(tiny_unetr, volume):
    apply_adapter(tiny_unetr, "tcurlora", rank=8)
    frozen = {n: p.detach().clone() for n, p in tiny_unetr.named_parameters() if not p.requires_grad}
    assert any(".vit." in f".{n}" for n in frozen)
    cores = {g: m.tcur_U.detach().clone() for g, m in tiny_unetr.tcur_groups.items()}
    before = outputs(tiny_unetr, volume)

    tiny_unetr.train()
    optimizer = torch.optim.Adam([p for p in tiny_unetr.parameters() if p.requires_grad], lr=1e-2)
    loss = tiny_unetr(volume).square().mean()
    loss.backward()
    for name, group in tiny_unetr.tcur_groups.items():
        assert group.tcur_U.grad is not None and group.tcur_U.grad.abs().sum() > 0, name
    optimizer.step()

    for name, group in tiny_unetr.tcur_groups.items():
        assert not torch.equal(group.tcur_U, cores[name]), name
    for name, param in tiny_unetr.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen weight {name} changed"
    # Same input, new U: the ViT part of the output moved (dropout is 0 in the tiny model, eval mode anyway).
    after = outputs(tiny_unetr, volume)
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("rank", [1, 8, 16])
def test_trainable_count_is_decoder_plus_cores(tiny_unetr, rank):
    decoder = decoder_params(tiny_unetr)
    apply_adapter(tiny_unetr, "tcurlora", rank=rank)
    assert count_trainable(tiny_unetr) == decoder + rank**2 * (4 * L + L + L)
    trainable = {n for n, p in tiny_unetr.named_parameters() if p.requires_grad}
    assert all(n.split(".")[0] in {"decoder2", "decoder3", "decoder4", "decoder5", "tcur_groups"} for n in trainable)


def test_train_out_and_group_options_change_what_trains(tiny_unetr):
    decoder = decoder_params(tiny_unetr)
    out = sum(p.numel() for p in tiny_unetr.out.parameters())
    apply_adapter(tiny_unetr, "tcurlora", rank=4, groups=["attn"], train_out=True)
    assert set(tiny_unetr.tcur_groups) == {"attn"}
    assert count_trainable(tiny_unetr) == decoder + out + 16 * 4 * L
    assert not any("mlp" in f".{type(m.base_layer).__name__}" for m in adapter_layers(tiny_unetr))
    assert len(adapter_layers(tiny_unetr)) == 2 * L  # qkv + out_proj per block


def test_slice_mapping_splits_fused_qkv_in_q_k_v_order(tiny_unetr):
    tensors = group_targets(tiny_unetr, "attn")
    assert list(tensors) == ["attn"]  # one stage: the tensor keeps the group's name
    targets = tensors["attn"]
    assert [t.path for t in targets[:2]] == ["vit.blocks.0.attn.qkv", "vit.blocks.0.attn.out_proj"]
    assert targets[0].slices == (0, 1, 2) and targets[1].slices == (3,) and targets[-1].slices == (4 * L - 1,)
    W = stack_group(tiny_unetr, targets)
    d = 48
    qkv = tiny_unetr.vit.blocks[5].attn.qkv.weight
    assert W.shape == (d, d, 4 * L)
    torch.testing.assert_close(W[:, :, 4 * 5 + 1], qkv[d : 2 * d].T)  # k of layer 5
    torch.testing.assert_close(W[:, :, 4 * 5 + 3], tiny_unetr.vit.blocks[5].attn.out_proj.weight.T)
    up = stack_group(tiny_unetr, group_targets(tiny_unetr, "mlp_up")["mlp_up"])
    assert up.shape == (48, 96, L)


def test_adapted_linear_equals_base_plus_direct_t_product(tiny_unetr):
    """Every wrapped linear computes x W̃_k + x (C ∗ U ∗ R)_k, with C, R, ΔW computed here from the definition."""
    pristine = {n: stack_group(tiny_unetr, group_targets(tiny_unetr, n)[n]) for n in ("attn", "mlp_up", "mlp_down")}
    apply_adapter(tiny_unetr, "tcurlora", rank=4)
    randomise_core(tiny_unetr, scale=0.3)
    x = torch.randn(2, 5, 96)
    for name, W in pristine.items():
        rows, cols = select_tensor_cur(W, 4)
        delta = tensor_cur_delta(W[:, cols], tiny_unetr.tcur_groups[name].tcur_U.detach(), W[rows])
        for target in group_targets(tiny_unetr, name)[name]:
            layer = tiny_unetr.get_submodule(target.path)
            for mode in ("factored", "materialized", "fused"):
                layer.mode = mode
                xi = x[..., : layer.base_layer.in_features]
                expected = torch.cat([xi @ (W[..., k] + delta[..., k]) for k in target.slices], dim=-1) + (
                    layer.base_layer.bias if layer.base_layer.bias is not None else 0
                )
                torch.testing.assert_close(layer(xi), expected, atol=2e-5, rtol=1e-4)


def test_forward_modes_agree_in_outputs_and_gradients(volume):
    """Every path gives the same output, the same U-gradients and the same gradients upstream (input, decoder).

    In float64: the paths sum in different orders, and in float32 this deep network's gradients differ by up to 0.5 %
    between any two of them (each as far from the float64 values as the other), too loose to catch a wrong term."""
    results = {}
    for mode in ("factored", "materialized", "fused", "auto"):
        model = make_tiny_unetr()
        apply_adapter(model, "tcurlora", rank=8, mode=mode)
        randomise_core(model)
        model.double().train()
        x = volume.double().requires_grad_(True)
        out = model(x)
        out.square().mean().backward()
        results[mode] = {
            "out": out.detach(),
            "U": torch.cat([g.tcur_U.grad.flatten() for g in model.tcur_groups.values()]),
            "x": x.grad,
            "decoder": torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n.startswith("decoder2")]),
        }
    assert results["factored"]["U"].abs().max() > 0 and results["factored"]["x"].abs().max() > 0
    for mode in ("materialized", "fused", "auto"):
        for key, value in results[mode].items():
            torch.testing.assert_close(value, results["factored"][key], atol=1e-12, rtol=1e-9, msg=f"{mode}: {key}")


def test_auto_picks_the_cheapest_path_for_the_token_count(tiny_unetr):
    """Few tokens (CPU crops): factored; many (GPU crops, batch 4; inference over many windows): fused. Rank 1 makes
    the tiny ViT's adapter width n3·r = 48 its hidden size, as n3·r = 384 < 768 in ViT-B (a wider adapter than the
    weight makes forming ΔS cheaper than any per-token path: there "materialized" wins at many tokens)."""
    apply_adapter(tiny_unetr, "tcurlora", rank=1)
    qkv = tiny_unetr.vit.blocks[0].attn.qkv
    assert qkv.path(8) == "factored" and qkv.path(100_000) == "fused"
    with torch.no_grad():
        assert qkv.path(8) == "factored" and qkv.path(100_000) == "fused"
    qkv.mode = "materialized"
    assert qkv.path(100_000) == "materialized"  # an explicit mode wins


def test_fused_path_refuses_a_trainable_base_weight(tiny_unetr, volume):
    apply_adapter(tiny_unetr, "tcurlora", rank=2, mode="fused")
    tiny_unetr.vit.blocks[0].mlp.linear1.base_layer.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen base weight"):
        tiny_unetr(volume)


def test_merge_matches_unmerged_output(tiny_unetr, volume):
    apply_adapter(tiny_unetr, "tcurlora", rank=8)
    randomise_core(tiny_unetr)
    unmerged = outputs(tiny_unetr, volume)
    merge_adapter(tiny_unetr)
    assert all(layer.merged for layer in adapter_layers(tiny_unetr))
    torch.testing.assert_close(outputs(tiny_unetr, volume), unmerged, atol=1e-4, rtol=1e-4)
    merge_adapter(tiny_unetr)  # a second merge must not add ΔW twice
    torch.testing.assert_close(outputs(tiny_unetr, volume), unmerged, atol=1e-4, rtol=1e-4)


def test_unmerge_restores_pretrained_weights(tiny_unetr):
    pretrained = {n: p.detach().clone() for n, p in tiny_unetr.named_parameters()}
    apply_adapter(tiny_unetr, "tcurlora", rank=8)
    randomise_core(tiny_unetr, scale=0.5)
    merge_adapter(tiny_unetr)
    qkv = tiny_unetr.vit.blocks[0].attn.qkv.base_layer.weight
    assert not torch.allclose(qkv, pretrained["vit.blocks.0.attn.qkv.weight"])
    unmerge_adapter(tiny_unetr)
    for name, param in tiny_unetr.named_parameters():
        original = pretrained.get(name.replace(".base_layer", ""))
        if original is not None:
            torch.testing.assert_close(param, original, atol=1e-6, rtol=1e-5)


def test_save_load_round_trip_reproduces_fine_tuned_model(volume):
    tuned = make_tiny_unetr()
    apply_adapter(tuned, "tcurlora", rank=8, orientation="official")
    randomise_core(tuned)
    with torch.no_grad():
        tuned.decoder3.transp_conv.conv.weight.mul_(1.5)  # a trained decoder weight
    expected = outputs(tuned, volume)

    buffer = io.BytesIO()
    torch.save(adapter_state_dict(tuned), buffer)
    full_size = sum(p.numel() for p in tuned.parameters())
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(saved["state_dict"]) >= {"tcur_groups.attn.tcur_U", "tcur_groups.attn.tcur_rows"}
    assert not any(".vit." in f".{n}" for n in saved["state_dict"])
    assert sum(t.numel() for t in saved["state_dict"].values()) < full_size / 2

    fresh = load_adapter_state_dict(make_tiny_unetr(), saved)  # same pretrained base, adapter not yet applied
    torch.testing.assert_close(outputs(fresh, volume), expected, rtol=0, atol=0)
    merge_adapter(fresh)
    load_adapter_state_dict(fresh, saved)  # loading into a merged model keeps it consistent
    torch.testing.assert_close(outputs(fresh, volume), expected, atol=1e-4, rtol=1e-4)


def test_load_refuses_adapter_of_another_base(tiny_unetr):
    apply_adapter(tiny_unetr, "tcurlora", rank=2)
    state = adapter_state_dict(tiny_unetr)
    with pytest.raises(ValueError, match="different base"):
        load_adapter_state_dict(make_tiny_unetr(seed=1), state)
    with pytest.raises(ValueError, match="adapter mismatch"):
        load_adapter_state_dict(apply_adapter(make_tiny_unetr(), "tcurlora", rank=4), state)
    with pytest.raises(ValueError, match="not an adapter state"):
        load_adapter_state_dict(make_tiny_unetr(), state["state_dict"])


def test_official_orientation_selects_on_the_stored_weights(tiny_unetr):
    W = stack_group(tiny_unetr, group_targets(tiny_unetr, "mlp_up")["mlp_up"])  # (48 in, 96 out, 12)
    stored_rows, stored_cols = select_tensor_cur(W.transpose(0, 1), 4)  # rows = output features
    apply_adapter(tiny_unetr, "tcurlora", rank=4, orientation="official")
    group = tiny_unetr.tcur_groups["mlp_up"]
    assert group.tcur_cols.tolist() == stored_rows.tolist()
    assert group.tcur_rows.tolist() == stored_cols.tolist()
    torch.testing.assert_close(group.tcur_C, W[:, stored_rows])


def test_works_for_other_widths(volume):
    model = make_tiny_unetr(hidden_size=64, num_heads=4, mlp_dim=128)
    apply_adapter(model, "tcurlora", rank=16)
    assert model.tcur_groups["mlp_down"].tcur_C.shape == (128, 16, L)
    model(volume).mean().backward()
    assert model.tcur_groups["mlp_down"].tcur_U.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options, match",
    [
        ({"rank": 0}, "peft.rank"),
        ({"rank": 49}, "peft.rank"),
        ({"groups": ["attn", "ffn"]}, "unknown group"),
        ({"mode": "fast"}, "peft.mode"),
        ({"orientation": "columns"}, "peft.orientation"),
        ({"alpha": 2}, "alpha"),
    ],
)
def test_bad_options_raise_value_error_naming_the_key(tiny_unetr, options, match):
    with pytest.raises(ValueError, match=match):
        apply_adapter(tiny_unetr, "tcurlora", **options)


def test_unknown_adapter_name_lists_choices(tiny_unetr):
    with pytest.raises(ValueError, match="tcurlora"):
        apply_adapter(tiny_unetr, "tcurlorra")


def test_merged_state_dict_loads_into_a_plain_unetr(tiny_unetr, volume):
    from tcurlora_seg.adapters import merged_state_dict

    apply_adapter(tiny_unetr, "tcurlora", rank=4)
    randomise_core(tiny_unetr)
    expected = outputs(tiny_unetr, volume)
    plain = make_tiny_unetr(seed=5)
    plain.load_state_dict(merged_state_dict(tiny_unetr))  # strict: same keys as a plain UNETR
    torch.testing.assert_close(outputs(plain, volume), expected, atol=1e-4, rtol=1e-4)
    assert not any(layer.merged for layer in adapter_layers(tiny_unetr))  # left unmerged as it was


@pytest.mark.parametrize("method, core", [("tcurlora", "tcur_U"), ("lora_pt", "lorapt_S")])
def test_the_transformer_called_alone_twice_backpropagates_twice(method, core):
    """The model's pre-hook clears the per-pass factors only for model(x); called on its own (model.vit(x)), the second
    pass must not reuse the first one's factors, whose graph its backward freed."""
    model = apply_adapter(make_tiny_unetr(), method)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for group in getattr(model, "tcur_groups" if method == "tcurlora" else "lorapt_groups").values():
            getattr(group, core).add_(0.05 * torch.randn(getattr(group, core).shape, generator=generator))
    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(6))
    grads = []
    for _ in range(2):
        model.zero_grad()
        out, _ = model.vit(x)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0] and any(core in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


def test_mixed_paths_in_one_pass_share_v_once_per_grad_mode(volume, monkeypatch):
    """q/k/v factored (V with autograd) and o fused (V without, inside its own node): V = U ∗ R is formed once per
    kind per forward pass, neither evicts the other, and the gradients equal the all-factored model's."""
    from tcurlora_seg.adapters.tcurlora import TensorCURGroup

    grads = {}
    for mixed in (False, True):
        model = make_tiny_unetr()
        apply_adapter(model, "tcurlora", rank=2, mode="factored")
        randomise_core(model)
        model.double().train()
        if mixed:
            for block in model.vit.blocks:
                block.attn.out_proj.mode = "fused"
        calls = []
        original = TensorCURGroup.V
        monkeypatch.setattr(TensorCURGroup, "V", lambda self: calls.append(torch.is_grad_enabled()) or original(self))
        model(volume.double()).square().mean().backward()
        monkeypatch.undo()
        grads[mixed] = torch.cat([g.tcur_U.grad.flatten() for g in model.tcur_groups.values()])
        # attention, MLP up, MLP down: once each with autograd; attention once more without, for the fused o's
        assert sorted(calls) == sorted([True] * 3 + [False] * mixed)
    torch.testing.assert_close(grads[True], grads[False], atol=1e-12, rtol=1e-9)

"""Every method of the registry on the tiny UNETR: what trains, gradients, zero effect at init, merge, save/load, counts."""

import io

import pytest
import torch

from tcurlora_seg.adapters import (
    ADAPTERS,
    adapter_layers,
    adapter_state_dict,
    apply_adapter,
    count_trainable,
    load_adapter_state_dict,
    merge_adapter,
    unmerge_adapter,
)
from tcurlora_seg.adapters.backbones import BACKBONES
from tcurlora_seg.adapters.base import VIT_LINEARS, base_fingerprint
from tcurlora_seg.adapters.tensor_cur import t_product
from tests.conftest import make_tiny_unetr

L = 12
DECODER = BACKBONES["unetr"].decoder
METHODS = sorted(ADAPTERS)
LAYERED = [m for m in METHODS if m not in ("full", "decoder_only")]
PEFT = ("lora", "dora", "pissa", "loha", "lokr")
# Methods whose update starts at exactly zero; PiSSA and LoRA-PT split W into residual + principal (float rounding).
EXACT_AT_INIT = ("full", "decoder_only", "lora", "dora", "loha", "lokr", "curlora", "tcurlora")
# Name parts of adapter tensors (peft's prefixes and ours)
ADAPTER_PREFIXES = ("lora_", "hada_", "lokr_", "cur_U", "lorapt_", "tcur_U")


def tiny(seed: int = 0):
    """The suite's tiny UNETR (hidden 48, mlp 96, 32³) with feature size 4: the conv path dominates CPU time."""
    return make_tiny_unetr(seed, feature_size=4)


@pytest.fixture
def tiny_unetr():
    return tiny()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(1, 1, 32, 32, 32)


@pytest.fixture(scope="module")
def base_output(x):
    return outputs(tiny(), x)


def outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def is_adapter_tensor(name):
    return "base_layer" not in name and any(part.startswith(ADAPTER_PREFIXES) for part in name.split("."))


def randomise_adapter(model, scale=0.05, seed=3):
    """Move every adapter tensor away from its init, as training would (decoder untouched)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and (is_adapter_tensor(name) or model.adapter_config["name"] == "full"):
                param.add_(torch.randn(param.shape, generator=gen) * scale)


# ---- trainable-parameter formulas (shared with the ViT-B numbers below) -------------------------------------------


def linear_shapes(hidden, mlp):
    """(in, out, chunks) of the adapted linears of one ViT block: qkv (fused, 3 chunks), out_proj, linear1, linear2."""
    return [(hidden, 3 * hidden, 3), (hidden, hidden, 1), (hidden, mlp, 1), (mlp, hidden, 1)]


def lokr_count(n_in, n_out, r, factor=-1):
    from peft.tuners.lokr.layer import factorization  # the split peft uses; the formula around it is ours

    a, b = factorization(n_out, factor)
    c, d = factorization(n_in, factor)
    return a * c + (b * d if r >= max(b, d) / 2 else r * (b + d))


def adapter_count(method, hidden, mlp, blocks=L):
    """Trainable adapter parameters (decoder excluded) of each method at its default options."""
    shapes = linear_shapes(hidden, mlp)
    per_block = {
        "decoder_only": 0,
        "lora": sum(32 * (i + o) for i, o, _ in shapes),
        "dora": sum(32 * (i + o) + o for i, o, _ in shapes),
        "pissa": sum(2 * (i + o) for i, o, _ in shapes),
        "loha": sum(2 * 16 * (i + o) for i, o, _ in shapes),
        "lokr": sum(lokr_count(i, o, 8) for i, o, _ in shapes),
        "curlora": sum(s * 2 * 2 for _, _, s in shapes),
    }
    if method in per_block:
        return blocks * per_block[method]
    # tensor methods: groups attn (h, h, 4L), mlp_up (h, mlp, L), mlp_down (mlp, h, L)
    groups = [(hidden, hidden, 4 * blocks), (hidden, mlp, blocks), (mlp, hidden, blocks)]
    if method == "lora_pt":
        return sum(8 * n3 * (n1 + 8 + n2) for n1, n2, n3 in groups)
    if method == "tcurlora":
        return sum(8 * 8 * n3 for _, _, n3 in groups)
    raise KeyError(method)


def decoder_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in DECODER)


# ---- behaviour ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_matches_formula(tiny_unetr, method):
    total, decoder = sum(p.numel() for p in tiny_unetr.parameters()), decoder_params(tiny_unetr)
    apply_adapter(tiny_unetr, method)
    expected = total if method == "full" else decoder + adapter_count(method, hidden=48, mlp=96)
    assert count_trainable(tiny_unetr) == expected


def test_formula_gives_the_paper_counts_for_vit_b():
    """Table 1 of the paper (DESIGN.md §2), ViT-B: hidden 768, mlp 3072, decoder 2,678,528."""
    decoder = 2_678_528
    counts = {m: decoder + adapter_count(m, 768, 3072) for m in ("lora", "pissa", "curlora", "tcurlora")}
    assert counts["lora"] == 7_397_120  # paper 7.397 M
    assert counts["curlora"] == 2_678_816  # paper 2.679 M (qkv as three matrices; 2,678,720 as one)
    assert counts["tcurlora"] == 2_683_136  # paper 2.683 M
    # paper 2.974 M; r·(in + out) per linear gives 2.973 M (2,973,440): no shape of these four linears adds the 560
    assert counts["pissa"] == 2_973_440


@pytest.mark.parametrize("method", METHODS)
def test_only_intended_parameters_train(tiny_unetr, method):
    apply_adapter(tiny_unetr, method, **({} if method == "full" else {"train_out": False}))
    for name, param in tiny_unetr.named_parameters():
        top = name.split(".")[0]
        if method == "full":
            assert param.requires_grad, name
        elif top in DECODER or (method != "decoder_only" and is_adapter_tensor(name)):
            assert param.requires_grad, f"{name} should train"
        else:
            assert not param.requires_grad, f"{name} should be frozen"
    if method in LAYERED:
        assert len(adapter_layers(tiny_unetr)) == 4 * L  # qkv, out_proj, linear1, linear2 of every block
        assert not any(p.requires_grad for n, p in tiny_unetr.named_parameters() if n.startswith(("encoder", "out.")))


@pytest.mark.parametrize("method", PEFT + ("curlora",))
def test_targets_and_train_out_options(tiny_unetr, method):
    out = sum(p.numel() for p in tiny_unetr.out.parameters())
    apply_adapter(tiny_unetr, method, targets=["attn.qkv"], train_out=True)
    layers = adapter_layers(tiny_unetr)
    assert len(layers) == L and all(layer.base_layer.out_features == 3 * 48 for layer in layers)
    assert all(p.requires_grad for p in tiny_unetr.out.parameters())
    assert count_trainable(tiny_unetr) > decoder_params(tiny_unetr) + out


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_every_trainable_tensor(x, method):
    model = tiny()
    apply_adapter(model, method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    # Two steps: a zero-initialised factor (LoRA's B, LoHa's W2b, LoKr's W1) blocks its partner's gradient in step 1.
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen {name} changed"
        elif "cross_attn" in name:  # MONAI builds cross-attention modules that a UNETR never calls
            continue
        else:
            assert not torch.equal(param, start[name]), f"{name} did not train"


@pytest.mark.parametrize("method", METHODS)
def test_zero_effect_at_init(x, base_output, method):
    model = apply_adapter(tiny(), method)
    tol = 0 if method in EXACT_AT_INIT else 1e-4
    torch.testing.assert_close(outputs(model, x), base_output, atol=tol, rtol=tol)


def test_pissa_randomised_svd_option_keeps_the_base_output(x, base_output):
    model = apply_adapter(tiny(), "pissa", svd_niter=4)
    layer = model.vit.blocks[0].mlp.linear1
    W = tiny().vit.blocks[0].mlp.linear1.weight
    # B A approximates W's top-2 part (randomised: a few % off on this flat random spectrum, closer on trained weights)
    top = torch.linalg.svdvals(W)[:2]
    torch.testing.assert_close(torch.linalg.svdvals(layer.pissa_B0 @ layer.pissa_A0)[:2], top, atol=0, rtol=0.1)
    torch.testing.assert_close(outputs(model, x), base_output, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", LAYERED)
def test_merge_matches_unmerged_output(x, method):
    model = tiny()
    apply_adapter(model, method)
    randomise_adapter(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = outputs(model, x)
    merge_adapter(model)
    assert all(layer.merged for layer in adapter_layers(model))
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    torch.testing.assert_close(outputs(model, x), unmerged, atol=1e-4, rtol=1e-4)
    merged = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
    merge_adapter(model)  # a second merge must not add the update twice
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters() if n in merged)
    unmerge_adapter(model)  # back to the weights before merging (pretrained, or PiSSA / LoRA-PT's residual)
    assert not any(layer.merged for layer in adapter_layers(model))
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ("full", "decoder_only"))
def test_merge_is_a_no_op_without_adapter_layers(tiny_unetr, method):
    apply_adapter(tiny_unetr, method)
    weights = {n: p.detach().clone() for n, p in tiny_unetr.named_parameters()}
    merge_adapter(tiny_unetr)
    unmerge_adapter(tiny_unetr)
    assert all(torch.equal(p, weights[n]) for n, p in tiny_unetr.named_parameters())


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_reproduces_fine_tuned_model(x, method):
    tuned = tiny()
    apply_adapter(tuned, method)
    randomise_adapter(tuned)
    with torch.no_grad():
        tuned.decoder3.transp_conv.conv.weight.mul_(1.5)  # a trained decoder weight
    expected = outputs(tuned, x)

    buffer = io.BytesIO()
    torch.save(adapter_state_dict(tuned), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    frozen = {n for n, p in tuned.named_parameters() if not p.requires_grad}
    assert not frozen & saved["state_dict"].keys()  # adapter-only: no frozen base weight in the file
    assert {n for n, p in tuned.named_parameters() if p.requires_grad} <= saved["state_dict"].keys()

    fresh = load_adapter_state_dict(tiny(), saved)  # the untouched pretrained base
    torch.testing.assert_close(outputs(fresh, x), expected, rtol=0, atol=0)
    merge_adapter(fresh)
    load_adapter_state_dict(fresh, saved)  # loading into a merged model keeps it consistent
    torch.testing.assert_close(outputs(fresh, x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_fingerprint_is_that_of_the_pretrained_base(tiny_unetr, method):
    """Also for PiSSA and LoRA-PT, whose frozen weights become a residual: the fingerprint names the pretrained base."""
    apply_adapter(tiny_unetr, method)
    trainable = {n.replace(".base_layer", "") for n, p in tiny_unetr.named_parameters() if p.requires_grad}
    reference = tiny()
    for name, param in reference.named_parameters():
        param.requires_grad_(name in trainable)
    assert tiny_unetr.adapter_config["base_fingerprint"] == base_fingerprint(reference)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_load_refuses_adapter_of_another_base(tiny_unetr, method):
    apply_adapter(tiny_unetr, method)
    with pytest.raises(ValueError, match="different base"):
        load_adapter_state_dict(tiny(seed=1), adapter_state_dict(tiny_unetr))


def _simulate_other_svd(model, method):
    """Give ``model`` another, equally valid split W = residual' + principal' (as another machine's SVD could)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        if method == "pissa":
            for layer in adapter_layers(model):
                delta = torch.randn(layer.pissa_A0.shape, generator=gen) * 0.05
                layer.pissa_A0.add_(delta)
                layer.lora_A["default"].weight.add_(delta)
                layer.get_base_layer().weight.sub_(layer.scaling["default"] * layer.pissa_B0 @ delta)
        else:
            for group in model.lorapt_groups.values():
                delta = torch.randn(group.lorapt_U0.shape, generator=gen) * 0.05
                moved = t_product(delta, t_product(group.lorapt_S0, group.lorapt_V0))
                group.lorapt_U0.add_(delta)
                group.lorapt_U.add_(delta)
                for layer in adapter_layers(model):
                    if layer.group is group:
                        layer.add_slices(moved[..., list(layer.slices)].permute(2, 0, 1), -1.0)


@pytest.mark.parametrize("method", ("pissa", "lora_pt"))
def test_residual_is_rebuilt_from_the_saved_initial_factors(x, method):
    tuned = tiny()
    apply_adapter(tuned, method)
    randomise_adapter(tuned)
    expected = outputs(tuned, x)
    state = adapter_state_dict(tuned)

    other = apply_adapter(tiny(), method)
    _simulate_other_svd(other, method)  # without the rebuild, loading would now give residual' + trained ≠ expected
    load_adapter_state_dict(other, state)
    torch.testing.assert_close(outputs(other, x), expected, atol=1e-5, rtol=1e-4)

    del state["state_dict"][next(n for n in state["state_dict"] if n.endswith(("pissa_A0", "lorapt_U0")))]
    with pytest.raises(ValueError, match="initial factors"):
        load_adapter_state_dict(tiny(), state)


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("lora", {"rank": 0}, "peft.rank"),
        ("loha", {"alpha": -1}, "peft.alpha"),
        ("pissa", {"targets": ["attn.q"]}, "peft.targets"),
        ("pissa", {"rank": 49}, "peft.rank"),
        ("pissa", {"svd_niter": -1}, "peft.svd_niter"),
        ("lokr", {"factor": 0}, "peft.factor"),
        ("curlora", {"selection": "random"}, "peft.selection"),
        ("curlora", {"rank": 49}, "peft.rank"),
        ("lora_pt", {"rank": 49}, "peft.rank"),
        ("lora_pt", {"groups": ["ffn"]}, "peft.groups"),
        ("decoder_only", {"train_out": "yes"}, "peft.train_out"),
        ("full", {"rank": 2}, "rank"),
        ("dora", {"dropout": 0.1}, "dropout"),
    ],
)
def test_bad_options_raise_value_error_naming_the_key(tiny_unetr, method, options, match):
    with pytest.raises(ValueError, match=match):
        apply_adapter(tiny_unetr, method, **options)


def test_curlora_selects_largest_norms_and_updates_by_c_u_r(tiny_unetr):
    W = tiny_unetr.vit.blocks[2].mlp.linear1.weight.detach().clone()  # (96, 48)
    apply_adapter(tiny_unetr, "curlora", rank=2)
    layer = tiny_unetr.vit.blocks[2].mlp.linear1
    rows, cols = layer.cur_rows[0], layer.cur_cols[0]
    assert set(rows.tolist()) == set(W.square().sum(1).topk(2).indices.tolist())
    assert set(cols.tolist()) == set(W.square().sum(0).topk(2).indices.tolist())
    randomise_adapter(tiny_unetr, scale=0.5)
    x = torch.randn(5, 48)
    delta = W[:, cols] @ layer.cur_U[0].detach() @ W[rows, :]
    torch.testing.assert_close(layer(x), x @ (W + delta).T + layer.base_layer.bias, atol=1e-5, rtol=1e-4)


def test_lora_pt_starts_from_the_principal_t_svd_part(tiny_unetr):
    from tcurlora_seg.adapters.targets import group_targets, stack_group

    W = stack_group(tiny_unetr, group_targets(tiny_unetr, "mlp_up")["mlp_up"])  # (48, 96, 12)
    apply_adapter(tiny_unetr, "lora_pt", rank=4)
    group = tiny_unetr.lorapt_groups["mlp_up"]
    principal = t_product(group.lorapt_U, t_product(group.lorapt_S, group.lorapt_V)).detach()
    # per frequency, the principal part is the best rank-4 approximation: its singular values are W's top 4
    Wf, Pf = torch.fft.rfft(W, dim=-1).permute(2, 0, 1), torch.fft.rfft(principal, dim=-1).permute(2, 0, 1)
    torch.testing.assert_close(torch.linalg.svdvals(Pf)[:, :4], torch.linalg.svdvals(Wf)[:, :4], atol=1e-4, rtol=1e-4)
    assert torch.linalg.svdvals(Pf)[:, 4:].max() < 1e-4
    residual = stack_group(tiny_unetr, group_targets(tiny_unetr, "mlp_up")["mlp_up"])
    torch.testing.assert_close(residual + principal, W, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["full", "decoder_only", "lora", "pissa", "curlora", "lora_pt", "tcurlora"])
def test_merged_state_dict_is_a_plain_unetr_with_the_same_outputs(name):
    from tcurlora_seg.adapters import merged_state_dict

    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32)
    model = apply_adapter(make_tiny_unetr(), name)
    with torch.no_grad():  # move every trainable tensor so the merge has something to fold
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model.eval()
    with torch.no_grad():
        expected = model(x)
    plain = make_tiny_unetr(seed=9).eval()
    plain.load_state_dict(merged_state_dict(model))  # strict
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-4, rtol=1e-4)

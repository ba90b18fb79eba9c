"""Exact alternatives to tCURLoRA's factored path, one linear at a time (docs/benchmark.md, "Candidates measured").

    python scripts/bench_tcur_paths.py                 # ViT-B's four linears at 64 and 512 tokens, CPU, 30 alternations
    python scripts/bench_tcur_paths.py --tokens 2048 --device cuda

Forward + backward (input gradient and the core's gradient) of x·ΔS_k for the slices of one linear, ms, median:
- factored: the package's path, x·Cflat re-indexed per slice, times V = U ∗ R (V taken as given: it is formed once
  per pass and tensor in the model);
- activation-side, circulant: G = (x·Cflat) · circ(U) (the block-circulant matrix of U, formed once per pass), then
  x·ΔS_k = roll_k(G) · Rstack with R fixed: no gradient through the (n3·r × n2) side;
- activation-side, FFT: G = (x·Cflat) ∗ U by rFFT along the stack, U's spectrum formed per call;
neither is in the package: per linear the circulant form is 10–30 % faster for qkv and the MLPs, but in the whole
model (ViT-B UNETR, 64³ and 128³, bench_adapters.py --interleave) it did not make a step measurably faster
(docs/benchmark.md).
- base: the frozen linear itself (input gradient only), for scale.
Each candidate is first checked in float64 against the factored path (outputs and both gradients).

``--group`` measures instead the one part of the backward that could wait for a whole tensor group (the issue's
"one autograd node per group"): V's gradient, sum over the group's linears of Hkᵀ · g, as one matrix product per
linear (the package) or as one product over all of a group's linears at once (their operands concatenated, the
concatenation timed too); ViT-B's three groups, ms per training step. The rest of the backward (the input gradient)
cannot wait: each layer's input gradient feeds the layer below.

``--formation`` measures the fixed cost of the fused path and of ``merge()``: every ΔS_k of a tensor, formed per
linear from the factors (the package: ``t_product_slices``, n1 · n3·r · n2 multiply-adds a slice) or once for the
whole tensor by FFT along the stack (rank r per frequency: n3 / 2 + 1 products of n1 × r × n2), and adding ΔS to the
base weights (what the fused path does twice per step), ms per formation of ViT-B's three tensors.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tcurlora_seg.adapters.tensor_cur import (  # noqa: E402
    apply_t_product_slices,
    circulant_roll,
    circulant_slices,
    t_product,
    t_product_slices,
)

# ViT-B's linears as slices of its three tensors: (n1, n2, n3, slices of the linear)
LINEARS = {"qkv": (768, 768, 48, 3), "out_proj": (768, 768, 48, 1), "mlp_up": (768, 3072, 12, 1), "mlp_down": (3072, 768, 12, 1)}


def block_circulant(U: torch.Tensor) -> torch.Tensor:
    """circ(U) (n3·r, n3·r), block (a, m) = U_{(m − a) mod n3}: H · circ(U) = H ∗ U along the stack."""
    r, _, n3 = U.shape
    m = torch.arange(n3, device=U.device)
    return U[:, :, (m[None, :] - m[:, None]) % n3].permute(2, 0, 3, 1).reshape(n3 * r, n3 * r)


def activation_side_circulant(x, Cflat, Ucirc, roll, Rstack):
    """circ(U) given, as a model would form it once per pass."""
    return circulant_slices((x @ Cflat) @ Ucirc, roll, Rstack)


def activation_side_fft(x, Cflat, U, roll, Rstack):
    n3 = roll.shape[1]
    H = (x @ Cflat).view(x.shape[0], n3, -1)
    Uf = torch.fft.rfft(U, dim=-1).permute(2, 0, 1)  # (F, r, r)
    G = torch.fft.irfft((torch.fft.rfft(H, dim=1).transpose(0, 1) @ Uf).transpose(0, 1), n=n3, dim=1)
    return circulant_slices(G.reshape(x.shape[0], -1), roll, Rstack)


def factors(n1, n2, n3, s, tokens, rank, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    C, R, U = randn(n1, rank, n3), randn(rank, n2, n3), randn(rank, rank, n3) * 0.1
    return {
        "x": randn(tokens, n1).requires_grad_(), "U": U.requires_grad_(), "R": R, "roll": circulant_roll(tuple(range(s)), n3).to(device),
        "Cflat": C.permute(0, 2, 1).reshape(n1, -1).contiguous(), "Rstack": R.permute(2, 0, 1).reshape(-1, n2).contiguous(),
    }


def check_exact() -> None:
    f = factors(10, 7, 6, 3, 5, 3, torch.float64, "cpu")
    V = t_product(f["U"], f["R"])
    ref = apply_t_product_slices(f["x"], f["Cflat"], f["roll"], V.permute(2, 0, 1).reshape(-1, V.shape[1]))
    weight = torch.randn_like(ref)
    want = torch.autograd.grad((ref * weight).sum(), (f["x"], f["U"]))
    for name, out in (("circulant", activation_side_circulant(f["x"], f["Cflat"], block_circulant(f["U"]), f["roll"], f["Rstack"])),
                      ("fft", activation_side_fft(f["x"], f["Cflat"], f["U"], f["roll"], f["Rstack"]))):
        torch.testing.assert_close(out, ref, msg=name)
        for a, b in zip(torch.autograd.grad((out * weight).sum(), (f["x"], f["U"])), want):
            torch.testing.assert_close(a, b, msg=name)


def bench(name: str, tokens: int, args: argparse.Namespace) -> dict[str, float]:
    n1, n2, n3, s = LINEARS[name]
    f = factors(n1, n2, n3, s, tokens, args.rank, torch.float32, args.device)
    x, U = f["x"], f["U"]
    V = t_product(U, f["R"]).detach()
    Vstack = V.permute(2, 0, 1).reshape(-1, n2).contiguous().requires_grad_()
    Ucirc = block_circulant(U).detach().contiguous().requires_grad_()
    W = torch.randn(s * n2, n1, device=args.device)
    paths = {
        "factored": lambda: apply_t_product_slices(x, f["Cflat"], f["roll"], Vstack),
        "activation-side, circulant": lambda: activation_side_circulant(x, f["Cflat"], Ucirc, f["roll"], f["Rstack"]),
        "activation-side, FFT": lambda: activation_side_fft(x, f["Cflat"], U, f["roll"], f["Rstack"]),
        "base": lambda: (x @ W.t()).view(tokens, s, n2),
    }
    grad = torch.randn(tokens, s, n2, device=args.device)

    def clear_grads() -> None:
        for t in (x, U, Vstack, Ucirc):
            t.grad = None

    return alternate({k: (lambda path=path: path().backward(grad)) for k, path in paths.items()}, args, clear_grads)


def alternate(calls: dict, args: argparse.Namespace, after=lambda: None) -> dict[str, float]:
    """Median ms of each call over ``args.reps`` rounds, the calls taken in turn so that drift spreads over all of
    them; ``after`` runs after each call, outside the timing."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(args.reps):
        for key, fn in calls.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[key].append((time.perf_counter() - start) * 1e3)
            after()
    return {k: statistics.median(v) for k, v in times.items()}


# ViT-B's three groups as [(number of linears, slices per linear)]: attention is 12 qkv (q, k, v) + 12 out_proj
GROUPS = {"attn": [(12, 3), (12, 1)], "mlp_up": [(12, 1)], "mlp_down": [(12, 1)]}
# each group's stacked tensor (n1, n2, n3)
TENSORS = {group: LINEARS["qkv" if group == "attn" else group][:3] for group in GROUPS}


def group_core_grads(tokens: int, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Per group: (ms per step with one Hkᵀ·g product per linear, ms with one product for the whole group)."""
    out = {}
    for group, linears in GROUPS.items():
        _, n2, n3 = TENSORS[group]
        width = n3 * args.rank
        g = torch.Generator(device="cpu").manual_seed(0)
        pairs = [(torch.randn(tokens * s, width, generator=g).to(args.device), torch.randn(tokens * s, n2, generator=g).to(args.device))
                 for count, s in linears for _ in range(count)]

        def per_linear():
            grad = torch.zeros(width, n2, device=args.device)
            for Hk, gk in pairs:
                grad.addmm_(Hk.t(), gk)
            return grad

        def batched():
            return torch.cat([Hk for Hk, _ in pairs]).t() @ torch.cat([gk for _, gk in pairs])

        torch.testing.assert_close(batched(), per_linear(), rtol=1e-4, atol=1e-3)
        times = alternate({"per linear": per_linear, "batched": batched}, args)
        out[group] = (times["per linear"], times["batched"])
    return out


def delta_by_fft(C: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Every slice of C ∗ V at once, transposed to the weights' layout: (n3, n2, n1), slice k = ΔS_kᵀ."""
    n3 = C.shape[2]
    Cf = torch.fft.rfft(C, dim=-1).permute(2, 1, 0)  # (F, r, n1)
    Vf = torch.fft.rfft(V, dim=-1).permute(2, 1, 0)  # (F, n2, r)
    return torch.fft.irfft(Vf @ Cf, n=n3, dim=0)


def formation(args: argparse.Namespace, shapes: dict | None = None) -> dict[str, dict[str, float]]:
    """Per tensor: ms to form all its ΔS_k per linear (the package) and by one FFT, and to add them to W.
    ``shapes``: {tensor: (n1, n2, n3, [(linears, slices each)])}, ViT-B's by default."""
    shapes = shapes or {group: TENSORS[group] + (linears,) for group, linears in GROUPS.items()}
    out = {}
    for group, (n1, n2, n3, linears) in shapes.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        C, U, R = (torch.randn(*shape, generator=g).to(args.device) for shape in ((n1, args.rank, n3), (args.rank, args.rank, n3), (args.rank, n2, n3)))
        V = t_product(U, R)
        Cflat, Vstack = C.permute(0, 2, 1).reshape(n1, -1).contiguous(), V.permute(2, 0, 1).reshape(-1, n2).contiguous()
        sizes = [s for count, s in linears for _ in range(count)]  # slices of each linear, in stacking order
        rolls = [circulant_roll(tuple(range(start, start + s)), n3).to(args.device)
                 for start, s in zip(itertools.accumulate(sizes, initial=0), sizes)]
        W = torch.randn(n3, n2, n1, device=args.device)

        def per_linear():  # as the fused path and merge() form them: one linear's slices at a time
            return [t_product_slices(Cflat, roll, Vstack) for roll in rolls]

        delta = delta_by_fft(C, V)
        torch.testing.assert_close(delta, torch.cat(per_linear()).transpose(1, 2), rtol=1e-4, atol=1e-4 * float(delta.abs().max()))
        out[group] = alternate({"per linear": per_linear, "FFT": lambda: delta_by_fft(C, V), "W + ΔS": lambda: W + delta}, args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--group", action="store_true", help="time V's gradient per linear vs one product per tensor group")
    parser.add_argument("--formation", action="store_true", help="time forming every ΔS_k per linear vs by one FFT per tensor")
    args = parser.parse_args()
    if args.formation:
        print("| tensor | ΔS per linear, ms | ΔS by FFT, ms | W + ΔS, ms |")
        print("|---|---:|---:|---:|")
        for group, t in formation(args).items():
            print(f"| {group} | {t['per linear']:.1f} | {t['FFT']:.1f} | {t['W + ΔS']:.1f} |")
        return
    if args.group:
        print("| tokens | group | per linear, ms/step | batched per group, ms/step | saved |")
        print("|---:|---|---:|---:|---:|")
        for tokens in args.tokens:
            for group, (each, once) in group_core_grads(tokens, args).items():
                print(f"| {tokens} | {group} | {each:.2f} | {once:.2f} | {each - once:+.2f} |")
        return
    check_exact()
    print("float64 check: every candidate equals the factored path (output, input and core gradients)")
    print("| linear | tokens | " + " | ".join(["factored", "activation-side, circulant", "activation-side, FFT", "base"]) + " |")
    print("|---|---:|---:|---:|---:|---:|")
    for tokens in args.tokens:
        for name in LINEARS:
            row = bench(name, tokens, args)
            print(f"| {name} | {tokens} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()

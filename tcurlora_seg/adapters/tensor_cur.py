"""Pure tensor math of tCURLoRA: the t-product, tensor CUR selection and a slice-wise pseudo-inverse.

Torch only (no MONAI). Third-order tensors keep their frontal slices on the last axis: A has shape (n1, n2, n3) and
A[:, :, k] is slice k. See shared/DESIGN.md §1.1–1.2 for the definitions used here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "t_product",
    "select_tensor_cur",
    "t_pinv",
    "tensor_cur_delta",
    "rfft_weights",
    "circulant_roll",
    "t_product_slices",
    "apply_t_product_slices",
    "circulant_slices",
    "core_grad_from_factors",
]


def _check_3d(name: str, A: Tensor) -> None:
    if A.dim() != 3:
        raise ValueError(f"{name} must be a 3-D tensor (n1, n2, n3) with slices on the last axis, got shape {tuple(A.shape)}")
    if A.is_complex() or not A.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {A.dtype}")


def t_product(A: Tensor, B: Tensor) -> Tensor:
    """t-product A ∗ B (Kilmer & Martin 2011): slice-wise matrix products in the Fourier domain along the last axis.

    A: (n1, n2, n3), B: (n2, n4, n3) -> (n1, n4, n3). Equals the circular convolution of slices,
    ``(A ∗ B)_k = sum_m A_m @ B_{(k - m) mod n3}``. Real in, real out: only the n3 // 2 + 1 unique frequencies are formed.
    """
    _check_3d("A", A)
    _check_3d("B", B)
    if A.shape[1] != B.shape[0] or A.shape[2] != B.shape[2]:
        raise ValueError(f"t_product needs A (n1, n2, n3) and B (n2, n4, n3), got {tuple(A.shape)} and {tuple(B.shape)}")
    n3 = A.shape[2]
    Af = torch.fft.rfft(A, dim=-1).permute(2, 0, 1)  # (F, n1, n2)
    Bf = torch.fft.rfft(B, dim=-1).permute(2, 0, 1)  # (F, n2, n4)
    # a batched matmul over frequencies: on CPU about twice as fast as the equivalent complex einsum
    return torch.fft.irfft((Af @ Bf).permute(1, 2, 0), n=n3, dim=-1)


def tensor_cur_delta(C: Tensor, U: Tensor, R: Tensor) -> Tensor:
    """ΔW = C ∗ U ∗ R (paper Eq. 2): C (n1, r, n3), U (r, r, n3), R (r, n2, n3) -> (n1, n2, n3)."""
    return t_product(C, t_product(U, R))


def rfft_weights(n3: int, device: torch.device | None = None) -> Tensor:
    """How many of the n3 DFT frequencies each rfft frequency stands for (1 for DC and Nyquist, 2 for the others).

    A real tensor's spectrum is conjugate-symmetric, so a norm summed over all n3 frequencies equals the weighted sum
    over the n3 // 2 + 1 rfft frequencies: half the memory of a full FFT of a 768 × 3072 × 12 weight tensor.
    """
    w = torch.full((n3 // 2 + 1,), 2.0, device=device)
    w[0] = 1.0
    if n3 % 2 == 0:
        w[-1] = 1.0
    return w


@torch.no_grad()
def select_tensor_cur(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Tensor CUR selection (paper §2.2): the r rows and r columns of W (n1, n2, n3) that C and R are taken from.

    Deterministic top-r, no sampling:
    column score ``alpha_j = sum_k ||fft(W)[:, j, k]||_2`` over all n3 frequencies; J = the r best columns.
    Row score ``beta_i = sum_k ||fft(W)[i, J, k]||_2`` over the selected columns only; I = the r best rows.
    Returns (rows, cols) as LongTensors of length ``rank``, each in decreasing score order.
    """
    _check_3d("W", W)
    n1, n2, n3 = W.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if rank > min(n1, n2):
        raise ValueError(f"rank {rank} is larger than the tensor's smaller dimension min({n1}, {n2}); choose rank <= {min(n1, n2)}")
    Wf = torch.fft.rfft(W.float(), dim=-1)  # (n1, n2, F)
    w = rfft_weights(n3, W.device)
    alpha = (torch.linalg.vector_norm(Wf, dim=0) * w).sum(-1)  # (n2,)
    cols = torch.topk(alpha, rank).indices
    beta = (torch.linalg.vector_norm(Wf[:, cols, :], dim=1) * w).sum(-1)  # (n1,)
    rows = torch.topk(beta, rank).indices
    return rows, cols


def t_pinv(A: Tensor) -> Tensor:
    """Slice-wise Moore–Penrose pseudo-inverse in the Fourier domain: A (n1, n2, n3) -> (n2, n1, n3).

    With it, ``C ∗ t_pinv(W[rows][:, cols]) ∗ R`` reconstructs a tensor of tubal rank <= r exactly when the selected
    rows and columns span it (DESIGN.md §1.2, step 5).
    """
    _check_3d("A", A)
    n3 = A.shape[2]
    Af = torch.fft.rfft(A, dim=-1).permute(2, 0, 1)  # (F, n1, n2)
    return torch.fft.irfft(torch.linalg.pinv(Af).permute(1, 2, 0), n=n3, dim=-1)


# Slices of A ∗ B without the FFT, for A and B given as their slices side by side (DESIGN.md §1.5):
# (A ∗ B)_k = sum_j A_{(k-j) mod n3} B_j, i.e. A's blocks re-indexed by ``roll[k, j] = (k - j) mod n3`` times B stacked.


def circulant_roll(slices: tuple[int, ...], n3: int) -> Tensor:
    """``roll[i, j] = (slices[i] - j) mod n3``: (s, n3)."""
    return (torch.tensor(slices).unsqueeze(1) - torch.arange(n3)) % n3


def t_product_slices(A_flat: Tensor, roll: Tensor, B_stack: Tensor) -> Tensor:
    """Slices k of A ∗ B: A_flat (n1, n3·r) with block j = A_j, B_stack (n3·r, n2) with block j = B_j -> (s, n1, n2)."""
    n1 = A_flat.shape[0]
    s, n3 = roll.shape
    rolled = A_flat.view(n1, n3, -1)[:, roll.flatten(), :]  # (n1, s*n3, r)
    return rolled.reshape(n1, s, -1).transpose(0, 1) @ B_stack  # (s, n1, n3*r) @ (n3*r, n2)


def apply_t_product_slices(x: Tensor, A_flat: Tensor, roll: Tensor, B_stack: Tensor) -> Tensor:
    """x · (A ∗ B)_k for the slices k of ``roll`` without forming them: x (T, n1) -> (T, s, n2).

    ``H = x · A_flat`` is computed once for all slices (q, k and v of a layer share it) and re-indexed per slice;
    cost per token n1·n3·r + s·n3·r·n2 instead of forming s full n1 × n2 matrices.
    """
    return circulant_slices(x @ A_flat, roll, B_stack)  # (T, n1) @ (n1, n3*r): H for all slices at once


def circulant_slices(H: Tensor, roll: Tensor, B_stack: Tensor) -> Tensor:
    """``sum_j H_{(k-j) mod n3} B_j`` for the slices k of ``roll``: H (T, n3·r) with block j = H_j -> (T, s, n2)."""
    tokens = H.shape[0]
    s, n3 = roll.shape
    Hk = H.view(tokens, n3, -1)[:, roll.flatten(), :]  # (T, s*n3, r)
    return Hk.reshape(tokens, s, -1) @ B_stack  # (T, s, n3*r) @ (n3*r, n2) -> (T, s, n2)


def core_grad_from_factors(P: Tensor, Q: Tensor, slices: tuple[int, ...], n3: int) -> Tensor:
    """∂L/∂U of L = sum_i <G_i, (C ∗ U ∗ R)_{k_i}> with G_i = xᵀ g_i, never forming an n1 × n2 matrix.

    P = x · Cflat (T, n3·r), block a = x C_a; Q (T, s, n3·r), block c of slice i = g_i R_cᵀ. Since
    (C ∗ U ∗ R)_k = sum_{a+b+c ≡ k} C_a U_b R_c, ∂L/∂U_b = sum_i M_i[(k_i − b) mod n3] with the circular convolution
    M_i[m] = sum_a (x C_a)ᵀ (g_i R_{m−a}). In the Fourier domain along the stack (ω = e^{−2πi/n3}) that is
    M̂_i[f] = P̂[f]ᵀ Q̂_i[f] and DFT(∂L/∂U)[f] = sum_i ω^{k_i f} conj(M̂_i[f]): r × r products per frequency instead
    of all (n3·r)² block pairs. Returns (r, r, n3).
    """
    tokens = P.shape[0]
    s = Q.shape[1]
    Pf = torch.fft.rfft(P.reshape(tokens, n3, -1), dim=1)  # (T, F, r)
    Qf = torch.fft.rfft(Q.reshape(tokens, s, n3, -1), dim=2)  # (T, s, F, r)
    Mf = torch.einsum("tfa,tsfc->sfac", Pf, Qf)  # (s, F, r, r)
    f = torch.arange(Mf.shape[1], device=P.device)
    k = torch.tensor(slices, device=P.device)
    phase = torch.polar(torch.ones((), device=P.device, dtype=P.dtype), -2 * torch.pi * torch.outer(k, f).to(P.dtype) / n3)
    Nf = (phase[:, :, None, None] * Mf.conj()).sum(0)  # (F, r, r)
    return torch.fft.irfft(Nf, n=n3, dim=0).permute(1, 2, 0)

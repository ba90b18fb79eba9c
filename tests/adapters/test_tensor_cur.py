import pytest
import torch

from tcurlora_seg.adapters.tensor_cur import select_tensor_cur, t_pinv, t_product, tensor_cur_delta



@pytest.fixture(autouse=True)
def float64():
    """Exactness checks in double precision; restored so other modules keep float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def circular_t_product(A, B):
    """The definition: (A ∗ B)_k = sum_m A_m B_{(k - m) mod n3}."""
    n3 = A.shape[2]
    out = torch.zeros(A.shape[0], B.shape[1], n3, dtype=A.dtype)
    for k in range(n3):
        for m in range(n3):
            out[:, :, k] += A[:, :, m] @ B[:, :, (k - m) % n3]
    return out


@pytest.mark.parametrize("n3", [1, 4, 5, 12])
def test_t_product_matches_circular_convolution(n3):
    A, B = torch.randn(6, 4, n3), torch.randn(4, 3, n3)
    out = t_product(A, B)
    assert out.shape == (6, 3, n3) and not out.is_complex()
    torch.testing.assert_close(out, circular_t_product(A, B))


def test_t_product_is_associative_so_delta_order_does_not_matter():
    C, U, R = torch.randn(7, 2, 6), torch.randn(2, 2, 6), torch.randn(2, 5, 6)
    torch.testing.assert_close(tensor_cur_delta(C, U, R), t_product(t_product(C, U), R))


@pytest.mark.parametrize(
    "A, B, match",
    [
        (torch.randn(3, 4), torch.randn(4, 3, 2), "3-D"),
        (torch.randn(3, 4, 2), torch.randn(5, 3, 2), "n2"),
        (torch.randn(3, 4, 2), torch.randn(4, 3, 3), "n2"),
        (torch.randn(3, 4, 2).to(torch.complex128), torch.randn(4, 3, 2), "real"),
    ],
)
def test_t_product_rejects_bad_shapes(A, B, match):
    with pytest.raises(ValueError, match=match):
        t_product(A, B)


def direct_selection(W, rank):
    """The paper's rule written out with a full FFT and explicit loops."""
    Wf = torch.fft.fft(W, dim=-1)
    n1, n2, n3 = W.shape
    alpha = torch.tensor([sum(torch.linalg.norm(Wf[:, j, k]) for k in range(n3)) for j in range(n2)])
    cols = torch.argsort(alpha, descending=True)[:rank]
    beta = torch.tensor([sum(torch.linalg.norm(Wf[i, cols, k]) for k in range(n3)) for i in range(n1)])
    rows = torch.argsort(beta, descending=True)[:rank]
    return rows, cols


@pytest.mark.parametrize("shape, rank", [((9, 7, 4), 3), ((6, 11, 5), 2), ((8, 8, 1), 8)])
def test_selection_matches_direct_rule(shape, rank):
    torch.manual_seed(0)
    W = torch.randn(*shape)
    rows, cols = select_tensor_cur(W, rank)
    ref_rows, ref_cols = direct_selection(W, rank)
    assert cols.tolist() == ref_cols.tolist()
    assert rows.tolist() == ref_rows.tolist()


def test_row_score_uses_selected_columns_only():
    # Column 0 wins the column score; row 3 is the largest row over all columns (its mass sits in the unselected
    # column 2) but the smallest inside column 0. The paper's rule scores rows on the selected columns: row 1 wins.
    W = torch.tensor([[3.0, 0, 0], [3.05, 0, 0], [2.9, 0, 0], [0.1, 0, 5.0]]).unsqueeze(-1).repeat(1, 1, 3)
    rows, cols = select_tensor_cur(W, 1)
    assert cols.tolist() == [0]
    assert rows.tolist() == [1]


def test_cur_reconstructs_low_tubal_rank_tensor():
    torch.manual_seed(0)
    r = 3
    W = t_product(torch.randn(10, r, 6), torch.randn(r, 9, 6))  # tubal rank 3
    rows, cols = select_tensor_cur(W, r)
    C, R, M = W[:, cols, :], W[rows, :, :], W[rows][:, cols, :]
    torch.testing.assert_close(t_product(t_product(C, t_pinv(M)), R), W, atol=1e-8, rtol=1e-8)


def test_reconstruction_fails_below_the_tubal_rank():
    torch.manual_seed(0)
    W = t_product(torch.randn(10, 4, 6), torch.randn(4, 9, 6))
    rows, cols = select_tensor_cur(W, 2)
    approx = t_product(t_product(W[:, cols], t_pinv(W[rows][:, cols])), W[rows])
    assert (approx - W).norm() > 1e-3 * W.norm()


def test_t_pinv_inverts_invertible_tensor():
    torch.manual_seed(0)
    A = torch.randn(4, 4, 5)
    identity = torch.zeros(4, 4, 5)
    identity[:, :, 0] = torch.eye(4)  # the t-product identity: I in slice 0, zeros elsewhere
    torch.testing.assert_close(t_product(A, t_pinv(A)), identity, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("rank", [0, -1, 5, 2.0, True])
def test_selection_rejects_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        select_tensor_cur(torch.randn(4, 6, 3), rank)


def test_slices_without_fft_match_the_t_product():
    from tcurlora_seg.adapters.tensor_cur import apply_t_product_slices, circulant_roll, t_product_slices

    A, B = torch.randn(6, 2, 5), torch.randn(2, 4, 5)
    full = t_product(A, B)  # (6, 4, 5)
    A_flat = A.permute(0, 2, 1).reshape(6, -1)  # block j = A_j
    B_stack = B.permute(2, 0, 1).reshape(-1, 4)  # block j = B_j
    slices = (3, 0, 4)
    roll = circulant_roll(slices, 5)
    expected = full.permute(2, 0, 1)[list(slices)]  # (s, 6, 4)
    torch.testing.assert_close(t_product_slices(A_flat, roll, B_stack), expected)
    x = torch.randn(7, 6)
    torch.testing.assert_close(apply_t_product_slices(x, A_flat, roll, B_stack), torch.einsum("ti,sio->tso", x, expected))


@pytest.mark.parametrize("n3", [5, 6, 12])  # odd and even stacks: the rfft's Nyquist frequency
def test_core_gradient_from_factors_equals_autograd_through_the_t_product(n3):
    """∂L/∂U for L = sum_i <x (C ∗ U ∗ R)_{k_i}, g_i> from x·C and g·Rᵀ alone (the fused path's backward)."""
    from tcurlora_seg.adapters.tensor_cur import core_grad_from_factors

    gen = torch.Generator().manual_seed(n3)
    n1, n2, r, tokens, slices = 10, 7, 3, 6, (1, 4, 0)
    C, R = torch.randn(n1, r, n3, generator=gen, dtype=torch.float64), torch.randn(r, n2, n3, generator=gen, dtype=torch.float64)
    U = torch.randn(r, r, n3, generator=gen, dtype=torch.float64).requires_grad_(True)
    x, g = torch.randn(tokens, n1, generator=gen, dtype=torch.float64), torch.randn(tokens, 3, n2, generator=gen, dtype=torch.float64)
    delta = tensor_cur_delta(C, U, R)
    sum(((x @ delta[..., k]) * g[:, i]).sum() for i, k in enumerate(slices)).backward()
    P = x @ C.permute(0, 2, 1).reshape(n1, -1)  # block a = x C_a
    Q = g @ R.permute(1, 2, 0).reshape(n2, -1)  # block c = g_i R_cᵀ
    torch.testing.assert_close(core_grad_from_factors(P, Q, slices, n3), U.grad, atol=1e-11, rtol=1e-12)

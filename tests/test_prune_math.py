"""Masks, Wanda, magnitude and SparseGPT against hand-computed values.

Rules cited from /work/shared/reference/owl-method.md, section "Pruning methods".
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import S48, W48

from owl_deploy.configs import parse_nm
from owl_deploy.errors import OwlError
from owl_deploy.prune.magnitude import magnitude_mask
from owl_deploy.prune.masks import matrix_mask, nm_mask, row_mask, row_ranks
from owl_deploy.prune.sparsegpt import sparsegpt_prune
from owl_deploy.prune.wanda import wanda_mask, wanda_scores


def _t(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def test_wanda_scores_by_hand():
    """Wanda metric |W_ij| * ||X_j||_2 (ref, Wanda), computed by hand row by row."""
    expected = torch.tensor(
        [
            [1.0, 4, 9, 16, 5, 12, 21, 32],
            [8, 14, 18, 20, 4, 6, 6, 4],
            [1, 2, 3, 4, 1, 2, 3, 4],
            [3, 0, 6, 4, 4, 4, 3, 12],
        ],
        dtype=torch.float64,
    )
    assert torch.equal(wanda_scores(W48, S48), expected)
    with pytest.raises(OwlError):
        wanda_scores(W48, S48[:4])


def test_wanda_mask_unstructured_by_hand():
    """Ref, Wanda: in every row prune the int(8 * 0.5) = 4 lowest scores; ties -> lower column first.
    Row 3 scores [3,0,6,4,4,4,3,12]: 0(c1), 3(c0), 3(c6), then the tie 4 at c3/c4/c5 -> c3."""
    expected = _t(
        [
            [1, 1, 1, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 1, 1, 1, 1],
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 1, 0, 0, 1, 0],
        ]
    )
    assert torch.equal(wanda_mask(W48, S48, 0.5), expected)


def test_wanda_mask_2_4_by_hand():
    """Ref, Wanda N:M: in each group of 4 input columns of a row, prune the 2 lowest scores.
    Row 1, second group [4,6,6,4] -> c4 and c7; row 3, [4,4,3,12] -> c6 then c4 (tie with c5)."""
    expected = _t(
        [
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 1],
            [1, 1, 0, 0, 1, 1, 0, 0],
            [1, 1, 0, 0, 1, 0, 1, 0],
        ]
    )
    assert torch.equal(wanda_mask(W48, S48, 0.5, nm=(2, 4)), expected)


def test_magnitude_mask_by_hand():
    """Ref, magnitude: smallest |W|, one threshold per matrix. The 4x8 layer at 25% loses int(32*0.25) = 8
    weights: the 0 at (3,1), then the |W| = 1 entries in row-major order (0,0), (1,7), (2,0)..(2,4);
    the 1s at (2,5)..(2,7), (3,3), (3,6) survive the tie."""
    expected = torch.zeros(4, 8, dtype=torch.bool)
    for r, c in [(3, 1), (0, 0), (1, 7), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]:
        expected[r, c] = True
    assert torch.equal(magnitude_mask(W48, 0.25), expected)


def test_matrix_mask_one_threshold_vs_row_mask():
    """Ref: magnitude uses one threshold per matrix, Wanda compares within each output row."""
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    assert torch.equal(matrix_mask(scores, 0.5), _t([[1, 1, 1, 1], [0, 0, 0, 0]]))
    assert torch.equal(row_mask(scores, 0.5), _t([[1, 1, 0, 0], [1, 1, 0, 0]]))


def test_row_mask_exact_count_per_row():
    """Ref, Wanda: each row loses exactly int(in_features * s): 10 * 0.7 -> 7, 10 * 0.25 -> 2 (truncation)."""
    scores = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    for s, k in [(0.7, 7), (0.25, 2), (0.0, 0), (1.0, 10)]:
        assert row_mask(scores, s).sum(dim=1).tolist() == [k] * 5
    assert matrix_mask(scores, 0.7).sum().item() == 35
    assert torch.equal(row_mask(torch.ones(2, 4), 0.5), _t([[1, 1, 0, 0], [1, 1, 0, 0]]))  # ties: stable
    with pytest.raises(OwlError):
        row_mask(scores, 1.5)


def test_nm_mask_exactly_n_per_group():
    """Ref, Wanda N:M: exactly n pruned in every group of m consecutive input columns."""
    scores = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    for n, m in [(2, 4), (5, 8), (1, 2), (0, 4), (4, 4)]:
        mask = nm_mask(scores, n, m)
        assert mask.view(6, 16 // m, m).sum(dim=2).eq(n).all()
    assert torch.equal(nm_mask(torch.tensor([[3.0, 1, 2, 0]]), 2, 4), _t([[0, 1, 0, 1]]))
    with pytest.raises(OwlError, match="divisible"):
        nm_mask(torch.zeros(2, 6), 2, 4)


def test_row_ranks_give_row_and_nm_masks_for_every_sparsity():
    """Sort once (tune): ranks < k is exactly row_mask / nm_mask, ties included (stable, lower column first)."""
    by_hand = torch.tensor([[3.0, 1.0, 1.0, 2.0, 0.0, 5.0, 4.0, 1.0]] * 2)
    assert row_ranks(by_hand)[0].tolist() == [5, 1, 2, 4, 0, 7, 6, 3]
    assert row_ranks(by_hand, 4)[0].tolist() == [3, 0, 1, 2, 0, 3, 2, 1]
    scores = torch.randint(0, 4, (4, 8)).double()  # many ties
    for sparsity in (0.0, 0.25, 0.5, 0.6, 0.875, 1.0):
        assert torch.equal(row_ranks(scores) < int(8 * sparsity), row_mask(scores, sparsity))
    for n in range(5):
        assert torch.equal(row_ranks(scores, 4) < n, nm_mask(scores, n, 4))
    assert row_ranks(scores).dtype == torch.int16
    with pytest.raises(OwlError, match="must divide"):
        row_ranks(scores, 3)


def test_parse_nm():
    """Ref, N:M: 'N:M' prunes N of every M; N must be in [1, M)."""
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(" 5:8 ") == (5, 8)
    for bad in ["2-4", "4:4", "0:4", "3:2", "a:b", "2:4:8", "", "-1:4", "2.5:4"]:
        with pytest.raises(OwlError):
            parse_nm(bad)


def test_masks_are_deterministic():
    """Same inputs -> identical masks (stable tie-breaking), for every mask kind."""
    scores = torch.randint(0, 3, (8, 16), generator=torch.Generator().manual_seed(2)).float()  # many ties
    assert torch.equal(row_mask(scores, 0.5), row_mask(scores.clone(), 0.5))
    assert torch.equal(matrix_mask(scores, 0.3), matrix_mask(scores.clone(), 0.3))
    assert torch.equal(nm_mask(scores, 2, 4), nm_mask(scores.clone(), 2, 4))


# --- SparseGPT -------------------------------------------------------------------------------------


def test_sparsegpt_obs_update_by_hand():
    """Ref, SparseGPT on one row, H = [[2,1],[1,2]], no damping. H^-1 = 1/3 [[2,-1],[-1,2]], upper Cholesky
    U = [[sqrt(2/3), -1/sqrt(6)], [0, sqrt(1/2)]]. W = [0.5, 1.0]: scores w^2/U_jj^2 = [0.375, 2] -> prune
    w_0; err = 0.5/U_00, w_1 -= err * U_01 = 1.0 + 0.25 = 1.25 (the OBS optimum: minimising
    d^T H d with d_0 = -0.5 gives d_1 = 0.25). Same for 1:2."""
    w = torch.tensor([[0.5, 1.0]])
    h = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert sparsegpt_prune(w, h, 0.5, percdamp=0.0) == pytest.approx(torch.tensor([[0.0, 1.25]]), abs=1e-6)
    assert sparsegpt_prune(w, h, 0.5, nm=(1, 2), percdamp=0.0) == pytest.approx(torch.tensor([[0.0, 1.25]]), abs=1e-6)


def _layer() -> tuple[torch.Tensor, torch.Tensor]:
    """256 tokens x 64 correlated input features (4 outlier features), a 32x64 float32 weight; seed 0."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 64, generator=g, dtype=torch.float64)
    mix = torch.randn(64, 64, generator=g, dtype=torch.float64) / 8
    x = z @ (0.3 * torch.eye(64, dtype=torch.float64) + mix)
    x[:, :4] *= 5
    return x, torch.randn(32, 64, generator=g)


def _out_err(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ (w.double() - w2.double()).T))


@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("blocksize", [128, 16])
def test_sparsegpt_beats_magnitude_and_wanda(nm, blocksize):
    """Ref, SparseGPT: H = 2/n X^T X; the OBS update makes ||XW^T - XW'^T|| lower than magnitude and Wanda
    at equal sparsity (50% and 2:4); exact sparsity; zeros at the mask; inputs untouched."""
    x, w = _layer()
    h = 2 / x.shape[0] * x.T @ x
    w0, h0 = w.clone(), h.clone()
    out = sparsegpt_prune(w, h, 0.5, nm=nm, blocksize=blocksize)
    assert torch.equal(w, w0) and torch.equal(h, h0)
    assert out.dtype == w.dtype and out.shape == w.shape
    zeros = out == 0
    assert zeros.sum().item() == 32 * 64 // 2
    if nm is not None:
        assert zeros.view(32, 16, 4).sum(dim=2).eq(2).all()
    mag = w.masked_fill(magnitude_mask(w, 0.5, nm), 0.0)
    wan = w.masked_fill(wanda_mask(w, (x**2).sum(0), 0.5, nm), 0.0)
    e_sgpt, e_mag, e_wan = _out_err(x, w, out), _out_err(x, w, mag), _out_err(x, w, wan)
    assert e_sgpt < 0.95 * e_wan < e_mag
    assert not torch.equal(out[~zeros], w[~zeros])  # survivors were updated, not just masked


def test_sparsegpt_per_block_count_and_determinism():
    """Ref, SparseGPT: the mask is chosen per block of columns, so with blocksize 16 every 16-column block
    of a 32-row layer keeps exactly int(512 * 0.7) = 358 zeros; identical inputs -> identical result."""
    x, w = _layer()
    h = 2 / x.shape[0] * x.T @ x
    out = sparsegpt_prune(w, h, 0.7, blocksize=16)
    assert [(out[:, i : i + 16] == 0).sum().item() for i in range(0, 64, 16)] == [358] * 4
    assert torch.equal(out, sparsegpt_prune(w, h, 0.7, blocksize=16))


def test_sparsegpt_dead_input_column():
    """Ref, SparseGPT: a dead input (H_jj == 0) gets H_jj = 1 and W[:, j] = 0, with no NaN."""
    x, w = _layer()
    x[:, 5] = 0.0
    h = 2 / x.shape[0] * x.T @ x
    out = sparsegpt_prune(w, h, 0.5)
    assert torch.isfinite(out).all()
    assert (out[:, 5] == 0).all()
    assert (out == 0).sum().item() == 1024  # the dead column's zeros count toward the target
    dense = sparsegpt_prune(w, h, 0.0)
    assert (dense[:, 5] == 0).all() and (dense == 0).sum().item() == 32


def test_sparsegpt_bad_inputs():
    """User-facing shape and setting errors are OwlError, not a torch traceback."""
    w, h = torch.randn(4, 8), torch.eye(8, dtype=torch.float64)
    with pytest.raises(OwlError):
        sparsegpt_prune(w, torch.eye(4, dtype=torch.float64), 0.5)
    with pytest.raises(OwlError):
        sparsegpt_prune(w, h, 0.5, nm=(2, 3))
    with pytest.raises(OwlError):
        sparsegpt_prune(w, h, 0.5, nm=(2, 4), blocksize=6)
    with pytest.raises(OwlError, match="positive definite"):
        sparsegpt_prune(w, -h, 0.5)


def _stable_sort_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The definition row_mask implements: the first int(cols * p) indices of each row's stable sort."""
    k = int(scores.shape[1] * sparsity)
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    mask.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :k], True)
    return mask


@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.3, 0.5, 0.7, 0.99, 1.0])
def test_row_mask_selects_exactly_what_the_stable_sort_selects(sparsity):
    """row_mask picks each row's k-th score instead of sorting the row (60 s -> seconds on a 1.5B model); the
    mask is the stable sort's, ties (zeros of an already-sparse weight, equal products) broken leftmost first."""
    gen = torch.Generator().manual_seed(0)
    continuous = torch.rand(16, 96, generator=gen, dtype=torch.float64)
    tied = torch.randint(0, 4, (16, 96), generator=gen).double()  # heavy ties
    sparse = continuous * (torch.rand(16, 96, generator=gen) < 0.4)  # many exact zeros
    with_nan = continuous.clone()
    with_nan[3, 5] = float("nan")
    for scores in (continuous, tied, sparse, with_nan):
        assert torch.equal(row_mask(scores, sparsity), _stable_sort_row_mask(scores, sparsity))

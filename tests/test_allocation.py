"""OWL allocation math against hand-computed values (rules: /work/shared/reference/owl-method.md)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from owl_deploy.allocation import (
    MAX_BLOCK_SPARSITY,
    outlier_ratio,
    owl_nm,
    owl_sparsities,
    uniform_sparsities,
    validate_owl,
)
from owl_deploy.errors import OwlError


def test_owl_sparsities_matches_formula():
    """Ref item 4: r = (D - min)/(max - min) * 2λ; density = r - mean(r) + (1 - S); sparsity = 1 - density.
    D = [1, 2, 3], S = 0.7, λ = 0.08: r = [0, 0.08, 0.16], mean 0.08 -> sparsity [0.78, 0.70, 0.62]."""
    assert owl_sparsities([1, 2, 3], 0.7, 0.08) == pytest.approx([0.78, 0.70, 0.62], abs=1e-12)


def test_owl_sparsities_non_linear_ratios():
    """Ref item 4, uneven D = [10, 0, 2.5, 7.5], S = 0.5, λ = 0.08: r = D/10 * 0.16 = [0.16, 0, 0.04, 0.12],
    mean 0.08 -> sparsity 0.5 - (r - 0.08) = [0.42, 0.58, 0.54, 0.46]."""
    assert owl_sparsities([10, 0, 2.5, 7.5], 0.5, 0.08) == pytest.approx([0.42, 0.58, 0.54, 0.46], abs=1e-12)


def test_more_outliers_less_sparsity_and_inverse_flips():
    """Ref items 4-5: more outliers -> lower sparsity; OWL-inverse gives more outliers more sparsity."""
    assert owl_sparsities([1, 2, 3], 0.7, 0.08, inverse=True) == pytest.approx([0.62, 0.70, 0.78], abs=1e-12)


def test_all_equal_ratios_give_uniform():
    """Ref item 4 edge case: max D == min D -> uniform allocation, no division by zero."""
    assert owl_sparsities([4.2, 4.2, 4.2], 0.7, 0.08) == [0.7, 0.7, 0.7]
    assert owl_sparsities([3.0], 0.5, 0.2) == [0.5]
    assert uniform_sparsities(3, 0.6) == [0.6, 0.6, 0.6]


def test_lambda_zero_is_uniform():
    """Ref item 4: the spread is 2λ, so λ = 0 is the uniform baseline."""
    assert owl_sparsities([1, 5, 2], 0.6, 0.0) == pytest.approx([0.6, 0.6, 0.6], abs=1e-15)


def test_clamp_above_keeps_mean():
    """Ref item 4 (documented clamp with re-centring): S = 0.95, λ = 0.08, D = [1, 2, 3] gives raw
    [1.03, 0.95, 0.87]; block 0 clips to 0.99 and the other two shift up by 0.02: [0.99, 0.97, 0.89]."""
    got = owl_sparsities([1, 2, 3], 0.95, 0.08)
    assert got == pytest.approx([0.99, 0.97, 0.89], abs=1e-12)
    assert abs(sum(got) / 3 - 0.95) < 1e-9


def test_clamp_below_keeps_mean():
    """Ref item 4: S = 0.1, λ = 0.3, D = [1, 2, 3]: raw [0.4, 0.1, -0.2]; common shift -0.1 with clipping
    at 0 gives [0.3, 0.0, 0.0], mean 0.1 (the reference would clamp to 0.01 and drift the mean)."""
    got = owl_sparsities([1, 2, 3], 0.1, 0.3)
    assert got == pytest.approx([0.3, 0.0, 0.0], abs=1e-12)
    assert min(got) >= 0.0
    assert abs(sum(got) / 3 - 0.1) < 1e-9


def test_mean_preserved_and_bounds_on_random_ratios():
    """Ref item 4: the unweighted mean of block sparsities equals S, also when blocks hit the bounds."""
    rng = random.Random(0)
    for _ in range(200):
        ratios = [rng.uniform(0, 20) for _ in range(rng.randint(1, 40))]
        s = rng.choice([0.05, 0.3, 0.5, 0.7, 0.9, 0.97, 0.985, 0.99])
        lam = rng.choice([0.0, 0.08, 0.2, 0.49])
        for inverse in (False, True):
            got = owl_sparsities(ratios, s, lam, inverse)
            assert len(got) == len(ratios)
            assert abs(sum(got) / len(got) - s) < 1e-9
            assert all(0.0 <= x <= MAX_BLOCK_SPARSITY for x in got)


def test_clamp_preserves_order():
    """Ref item 4: more outliers -> never more sparsity, also after clipping."""
    ratios = [0.5, 9.0, 3.0, 7.0, 1.0, 2.0]
    got = owl_sparsities(ratios, 0.96, 0.3)
    order = sorted(range(6), key=lambda i: ratios[i])
    assert all(got[a] >= got[b] for a, b in itertools.pairwise(order))
    assert got[0] == pytest.approx(0.99) and got[1] < 0.99


def test_unreachable_target_and_bad_settings_raise():
    """Ref item 4: a target outside the block bounds is a clear error, not silent drift."""
    with pytest.raises(OwlError, match="cannot be reached"):
        owl_sparsities([1, 2, 3], 0.995, 0.08)
    for args in [(0.0, 5, 0.08), (1.0, 5, 0.08), (0.7, 0, 0.08), (0.7, -1, 0.08), (0.7, 5, -0.01), (0.7, 5, 0.5)]:
        with pytest.raises(OwlError):
            validate_owl(*args)
    validate_owl(0.7, 5, 0.08)  # reference defaults (item 6) are valid
    with pytest.raises(OwlError):
        owl_sparsities([], 0.7, 0.08)
    with pytest.raises(OwlError):
        owl_sparsities([1.0, float("nan")], 0.7, 0.08)
    with pytest.raises(OwlError):
        uniform_sparsities(0, 0.5)


def test_outlier_ratio_single_matrix():
    """Ref item 3: A = [[1,1,1,1],[1,1,1,9]], mean 2; M = 3 -> threshold 6 -> 1 of 8 entries = 12.5 %.
    The comparison is strict: M = 4.5 puts the threshold at exactly 9 and nothing counts."""
    a = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 9]])
    assert outlier_ratio([a], 3) == 12.5
    assert outlier_ratio([a], 4.5) == 0.0


def test_outlier_ratio_pools_all_linears_of_a_block():
    """Ref item 3: one mean over the concatenation of all linears, not a per-linear ratio.
    A1 as above (sum 16) and A2 = [[0,0,0,3]]: pooled mean 19/12, M = 2 -> threshold 19/6 ≈ 3.17, so only
    the 9 counts: 1/12 = 8.33 %. Per-linear thresholds (4 and 1.5) would have counted the 3 as well."""
    a1 = torch.tensor([[1.0, 1, 1, 1], [1, 1, 1, 9]])
    a2 = torch.tensor([[0.0, 0, 0, 3]])
    assert outlier_ratio([a1, a2], 2) == pytest.approx(100 / 12)


def test_outlier_ratio_on_wanda_scores_4x8():
    """Ref items 2-3 on a 4x8 layer: A = |W| * sqrt(s), s = [1,4,9,16,1,4,9,16] -> sqrt [1,2,3,4,1,2,3,4].
    Row sums of A: 100, 80, 20, 36 -> mean 236/32 = 7.375. M = 2 (threshold 14.75): 16, 21, 32, 18, 20
    -> 5/32 = 15.625 %. M = 3 (threshold 22.125): only 32 -> 3.125 %."""
    from tiny_models import S48, W48

    from owl_deploy.prune.wanda import wanda_scores

    a = wanda_scores(W48, S48)
    assert outlier_ratio([a], 2) == 15.625
    assert outlier_ratio([a], 3) == 3.125
    with pytest.raises(OwlError):
        outlier_ratio([a], 0)
    with pytest.raises(OwlError):
        outlier_ratio([], 5)


def test_owl_nm_moves_integer_n():
    """Ref item 7: r scaled to [0, λ·m] (λ as a fraction of the group), centred, rounded;
    N = base_N - round(r - mean r). D = [1, 2, 3], 4:8, λ = 0.25 -> r = [0, 1, 2], centred [-1, 0, 1]
    -> N = [5, 4, 3] (the reference's `--Lamda 2` for 5:8). Inverse -> [3, 4, 5]."""
    assert owl_nm([1, 2, 3], 4, 8, 0.25) == [5, 4, 3]
    assert owl_nm([1, 2, 3], 4, 8, 0.25, inverse=True) == [3, 4, 5]


def test_owl_nm_uniform_cases_and_rounding():
    """Ref item 7: all-equal D -> base N; λ·m < 1 cannot move N (λ = 0.08 with 2:4: spread 0.32);
    rounding is half-to-even like np.round: D = [1, 2], 2:4, λ = 0.25 -> centred [-0.5, 0.5] -> [2, 2]."""
    assert owl_nm([7, 7, 7], 2, 4, 0.08) == [2, 2, 2]
    assert owl_nm([1, 2, 3], 2, 4, 0.08) == [2, 2, 2]
    assert owl_nm([1, 2], 2, 4, 0.25) == [2, 2]


def test_owl_nm_clips_to_group():
    """Ref item 7 + documented clip to [0, m]: D = [1, 2], 1:8, λ = 0.45 -> r = [0, 3.6], centred
    [-1.8, 1.8] -> round [-2, 2] -> N = [3, -1] -> clipped [3, 0]."""
    assert owl_nm([1, 2], 1, 8, 0.45) == [3, 0]
    with pytest.raises(OwlError):
        owl_nm([1, 2], 4, 4, 0.1)
    with pytest.raises(OwlError):
        owl_nm([1, 2], 2, 4, 0.5)

"""Tests of the weight quantizers in fgq_tvm.quant.ternary."""

import itertools

import numpy as np
import pytest
import torch

from fgq_tvm.quant.layers import expand_groups
from fgq_tvm.quant.ternary import TernaryGroups, quantize_int8_per_channel, ternarize_groups


def _values_and_scales(groups: TernaryGroups) -> tuple[np.ndarray, np.ndarray]:
    """``t`` and the scales of symmetric ternary groups."""
    assert not groups.asymmetric
    return groups.values, groups.positive


def brute_force_error(group: np.ndarray) -> float:
    """Smallest ||w - alpha * t||^2 over every t in {-1, 0, 1}^n with its best alpha >= 0."""
    best = float(group @ group)
    for pattern in itertools.product((-1, 0, 1), repeat=len(group)):
        t = np.array(pattern, dtype=np.float64)
        norm = t @ t
        if norm:
            alpha = max(0.0, (group @ t) / norm)
            best = min(best, float(((group - alpha * t) ** 2).sum()))
    return best


def group_errors(w: np.ndarray, t: np.ndarray, alpha: np.ndarray, n: int) -> np.ndarray:
    """Squared error of every group, ``[K, G, R, S]``."""
    approx = t * expand_groups(alpha.astype(np.float64), n, w.shape[1])
    diff = np.zeros((w.shape[0], alpha.shape[1] * n) + w.shape[2:])
    diff[:, : w.shape[1]] = (w - approx) ** 2
    return diff.reshape(w.shape[0], alpha.shape[1], n, *w.shape[2:]).sum(axis=2)


def twn_loop(w: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """TWN written out group by group."""
    k_dim, c_dim, r_dim, s_dim = w.shape
    g_dim = -(-c_dim // n)
    t = np.zeros(w.shape, dtype=np.int8)
    alpha = np.zeros((k_dim, g_dim, r_dim, s_dim), dtype=np.float32)
    for k, g, r, s in itertools.product(range(k_dim), range(g_dim), range(r_dim), range(s_dim)):
        group = w[k, g * n : (g + 1) * n, r, s]
        delta = 0.7 * np.mean(np.abs(group))
        kept = np.abs(group) > delta
        t[k, g * n : (g + 1) * n, r, s] = np.sign(group) * kept
        alpha[k, g, r, s] = np.abs(group[kept]).mean() if kept.any() else 0.0
    return t, alpha


@pytest.mark.parametrize(("n", "channels"), [(1, 3), (3, 7), (4, 8), (4, 10), (5, 7), (6, 6)])
def test_exact_solver_is_l2_optimal_and_beats_twn(n, channels):
    rng = np.random.default_rng(n * 100 + channels)
    w = rng.standard_normal((3, channels, 2, 2)) * rng.uniform(0.1, 2.0, (3, 1, 1, 1))
    t, alpha = _values_and_scales(ternarize_groups(w, n, "exact"))
    assert t.dtype == np.int8 and t.shape == w.shape
    assert alpha.dtype == np.float32 and alpha.shape == (3, -(-channels // n), 2, 2)
    assert set(np.unique(t)) <= {-1, 0, 1}
    errors = group_errors(w, t, alpha, n)
    for k, g, r, s in np.ndindex(errors.shape):
        group = w[k, g * n : (g + 1) * n, r, s]
        assert errors[k, g, r, s] == pytest.approx(brute_force_error(group), rel=1e-5, abs=1e-9)
    twn_t, twn_alpha = _values_and_scales(ternarize_groups(w, n, "twn"))
    assert np.all(errors <= group_errors(w, twn_t, twn_alpha, n) * (1 + 1e-6) + 1e-12)


def brute_force_asymmetric_error(group: np.ndarray) -> float:
    """Smallest ||w - w_t||^2 over every t in {-1, 0, 1}^n, where w_t is ``positive`` for
    t = 1 and ``-negative`` for t = -1, each scale its best non-negative value."""
    best = float(group @ group)
    for pattern in itertools.product((-1, 0, 1), repeat=len(group)):
        t = np.array(pattern)
        approx = np.zeros_like(group)
        for sign in (1, -1):
            chosen = t == sign
            if chosen.any():
                approx[chosen] = sign * max(0.0, sign * group[chosen].mean())
        best = min(best, float(((group - approx) ** 2).sum()))
    return best


@pytest.mark.parametrize(("n", "channels"), [(1, 3), (3, 7), (4, 8), (5, 7), (6, 6)])
def test_asymmetric_exact_solver_is_l2_optimal(n, channels):
    rng = np.random.default_rng(n * 10 + channels)
    w = rng.standard_normal((3, channels, 2, 1)) + rng.uniform(-0.5, 0.5, (3, 1, 1, 1))
    groups = ternarize_groups(w, n, "exact", asymmetric=True)
    assert groups.asymmetric and groups.negative.shape == groups.positive.shape
    assert groups.negative.dtype == np.float32 and (groups.negative >= 0).all()
    assert not (groups.values[w > 0] == -1).any() and not (groups.values[w < 0] == 1).any()
    errors = ((w - groups.dequantize()) ** 2).sum()
    expected = sum(
        brute_force_asymmetric_error(w[k, g * n : (g + 1) * n, r, s])
        for k, g, r, s in np.ndindex(groups.positive.shape)
    )
    assert errors == pytest.approx(expected, rel=1e-5)
    symmetric = ternarize_groups(w, n, "exact")
    assert errors <= ((w - symmetric.dequantize()) ** 2).sum() * (1 + 1e-6)


def test_asymmetric_twn_keeps_the_same_weights_and_averages_each_sign():
    w = np.array([[1.0, -2.0, 3.0, -1.5, 0.1, -0.2, 1.0]]).reshape(1, 7, 1, 1)
    groups = ternarize_groups(w, 4, "twn", asymmetric=True)
    np.testing.assert_array_equal(groups.values, ternarize_groups(w, 4, "twn").values)
    assert groups.values.ravel().tolist() == [0, -1, 1, -1, 0, 0, 1]
    assert groups.positive.ravel() == pytest.approx([3.0, 1.0])
    assert groups.negative.ravel() == pytest.approx([1.75, 0.0])


def test_asymmetric_scales_share_one_channel_scale():
    positive = np.array([[1.0, 0.5], [0.0, 0.0]], np.float32)
    negative = np.array([[2.0, 0.0], [0.0, 0.3]], np.float32)
    groups = TernaryGroups(np.zeros((2, 2), np.int8), positive, negative, 1)
    positive_q, negative_q, beta = groups.quantized_scales()
    np.testing.assert_allclose(beta, np.array([2.0, 0.3], np.float32) / 127)
    assert positive_q.tolist() == [[64, 32], [0, 0]]
    assert negative_q.tolist() == [[127, 0], [0, 127]]


def test_exact_solver_keeps_the_sign_and_the_mean_of_the_kept_weights():
    w = np.array([[0.1, -3.0, 2.5, 0.2, 0.0, -0.05, 1.0]]).reshape(1, 7, 1, 1)
    t, alpha = _values_and_scales(ternarize_groups(w, 4, "exact"))
    assert t.ravel().tolist() == [0, -1, 1, 0, 0, 0, 1]
    assert alpha.ravel() == pytest.approx([2.75, 1.0])


@pytest.mark.parametrize(("n", "channels"), [(1, 4), (3, 7), (4, 16), (5, 11)])
def test_twn_matches_a_loop(n, channels):
    w = np.random.default_rng(channels).standard_normal((4, channels, 3, 3))
    t, alpha = _values_and_scales(ternarize_groups(w, n, "twn"))
    loop_t, loop_alpha = twn_loop(w, n)
    np.testing.assert_array_equal(t, loop_t)
    np.testing.assert_allclose(alpha, loop_alpha, rtol=1e-6)


@pytest.mark.parametrize("method", ["exact", "twn"])
def test_all_zero_groups_give_zero(method):
    w = np.random.default_rng(0).standard_normal((3, 6, 1, 1))
    w[1] = 0.0
    w[2, 4:] = 0.0
    t, alpha = _values_and_scales(ternarize_groups(w, 4, method))
    assert not t[1].any() and not alpha[1].any()
    assert not t[2, 4:].any() and alpha[2, 1, 0, 0] == 0.0


@pytest.mark.parametrize("method", ["exact", "twn"])
def test_linear_weights_and_torch_tensors(method):
    w = torch.randn(5, 9)
    t, alpha = _values_and_scales(ternarize_groups(w, 4, method))
    t4, alpha4 = _values_and_scales(ternarize_groups(w.numpy()[:, :, None, None], 4, method))
    assert t.shape == (5, 9) and alpha.shape == (5, 3)
    np.testing.assert_array_equal(t, t4[:, :, 0, 0])
    np.testing.assert_array_equal(alpha, alpha4[:, :, 0, 0])


def test_group_size_larger_than_the_channels_is_one_group():
    w = np.random.default_rng(1).standard_normal((2, 3, 3, 3))
    t, alpha = _values_and_scales(ternarize_groups(w, 64, "exact"))
    assert alpha.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(t, ternarize_groups(w, 3, "exact").values)


def test_dequantize_takes_the_scale_of_each_sign():
    t = np.array([[1, -1, 0, 1, -1]], dtype=np.int8)
    positive = np.array([[0.5, 2.0]], dtype=np.float32)
    out = TernaryGroups(t, positive, None, 3).dequantize()
    assert out.dtype == np.float32
    assert out.tolist() == [[0.5, -0.5, 0.0, 2.0, -2.0]]
    negative = np.array([[0.25, 3.0]], dtype=np.float32)
    assert TernaryGroups(t, positive, negative, 3).dequantize().tolist() == [
        [0.5, -0.25, 0.0, 2.0, -3.0]
    ]


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        ternarize_groups(np.ones((2, 2)), 2, "median")
    with pytest.raises(ValueError, match="shape"):
        ternarize_groups(np.ones((2, 2, 2)), 2)
    with pytest.raises(ValueError, match="positive"):
        ternarize_groups(np.ones((2, 2)), 0)


def test_group_scale_quantization_round_trip():
    rng = np.random.default_rng(2)
    alpha = rng.uniform(0, 3, (4, 5, 3, 3)).astype(np.float32)
    alpha[2] = 0.0
    alpha[3, 1:] = 0.0
    values = np.zeros((4, 5, 3, 3), np.int8)
    alpha_q, negative_q, beta = TernaryGroups(values, alpha, None, 1).quantized_scales()
    assert negative_q is None
    assert alpha_q.dtype == np.int8 and alpha_q.shape == alpha.shape
    assert beta.dtype == np.float32 and beta.shape == (4,)
    assert alpha_q.min() >= 0 and alpha_q.max() <= 127
    assert alpha_q.reshape(4, -1).max(axis=1).tolist() == [127, 127, 0, 127]
    assert beta[2] == 1.0
    error = np.abs(alpha - alpha_q * beta[:, None, None, None])
    assert np.all(error <= beta[:, None, None, None] * (0.5 + 1e-5))


def test_int8_per_channel_round_trip():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    w[5] = 0.0
    w_q, scale = quantize_int8_per_channel(torch.from_numpy(w))
    assert w_q.dtype == np.int8 and w_q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (6,)
    assert w_q.min() >= -127 and w_q.max() <= 127
    assert np.abs(w_q[:5]).reshape(5, -1).max(axis=1).tolist() == [127] * 5
    assert scale[5] == 1.0 and not w_q[5].any()
    per_filter = scale[:, None, None, None]
    assert np.all(np.abs(w - w_q * per_filter) <= per_filter * 0.5001)
    w_lin, scale_lin = quantize_int8_per_channel(w.reshape(6, -1))
    np.testing.assert_array_equal(w_lin, w_q.reshape(6, -1))
    np.testing.assert_array_equal(scale_lin, scale)

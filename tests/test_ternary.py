"""Tests of the weight quantizers in fgq_tvm.quant.ternary."""

import itertools

import numpy as np
import pytest
import torch

from fgq_tvm.quant.layers import expand_groups
from fgq_tvm.quant.ternary import (
    dequantize_ternary,
    quantize_group_scales,
    quantize_int8_per_channel,
    ternarize_groups,
)


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
    t, alpha = ternarize_groups(w, n, "exact")
    assert t.dtype == np.int8 and t.shape == w.shape
    assert alpha.dtype == np.float32 and alpha.shape == (3, -(-channels // n), 2, 2)
    assert set(np.unique(t)) <= {-1, 0, 1}
    errors = group_errors(w, t, alpha, n)
    for k, g, r, s in np.ndindex(errors.shape):
        group = w[k, g * n : (g + 1) * n, r, s]
        assert errors[k, g, r, s] == pytest.approx(brute_force_error(group), rel=1e-5, abs=1e-9)
    twn_t, twn_alpha = ternarize_groups(w, n, "twn")
    assert np.all(errors <= group_errors(w, twn_t, twn_alpha, n) * (1 + 1e-6) + 1e-12)


def test_exact_solver_keeps_the_sign_and_the_mean_of_the_kept_weights():
    w = np.array([[0.1, -3.0, 2.5, 0.2, 0.0, -0.05, 1.0]]).reshape(1, 7, 1, 1)
    t, alpha = ternarize_groups(w, 4, "exact")
    assert t.ravel().tolist() == [0, -1, 1, 0, 0, 0, 1]
    assert alpha.ravel() == pytest.approx([2.75, 1.0])


@pytest.mark.parametrize(("n", "channels"), [(1, 4), (3, 7), (4, 16), (5, 11)])
def test_twn_matches_a_loop(n, channels):
    w = np.random.default_rng(channels).standard_normal((4, channels, 3, 3))
    t, alpha = ternarize_groups(w, n, "twn")
    loop_t, loop_alpha = twn_loop(w, n)
    np.testing.assert_array_equal(t, loop_t)
    np.testing.assert_allclose(alpha, loop_alpha, rtol=1e-6)


@pytest.mark.parametrize("method", ["exact", "twn"])
def test_all_zero_groups_give_zero(method):
    w = np.random.default_rng(0).standard_normal((3, 6, 1, 1))
    w[1] = 0.0
    w[2, 4:] = 0.0
    t, alpha = ternarize_groups(w, 4, method)
    assert not t[1].any() and not alpha[1].any()
    assert not t[2, 4:].any() and alpha[2, 1, 0, 0] == 0.0


@pytest.mark.parametrize("method", ["exact", "twn"])
def test_linear_weights_and_torch_tensors(method):
    w = torch.randn(5, 9)
    t, alpha = ternarize_groups(w, 4, method)
    t4, alpha4 = ternarize_groups(w.numpy()[:, :, None, None], 4, method)
    assert t.shape == (5, 9) and alpha.shape == (5, 3)
    np.testing.assert_array_equal(t, t4[:, :, 0, 0])
    np.testing.assert_array_equal(alpha, alpha4[:, :, 0, 0])


def test_group_size_larger_than_the_channels_is_one_group():
    w = np.random.default_rng(1).standard_normal((2, 3, 3, 3))
    t, alpha = ternarize_groups(w, 64, "exact")
    assert alpha.shape == (2, 1, 3, 3)
    np.testing.assert_array_equal(t, ternarize_groups(w, 3, "exact")[0])


def test_dequantize_ternary():
    t = np.array([[1, -1, 0, 1, 1]], dtype=np.int8)
    alpha = np.array([[0.5, 2.0]], dtype=np.float32)
    out = dequantize_ternary(t, alpha, 3)
    assert out.dtype == np.float32
    assert out.tolist() == [[0.5, -0.5, 0.0, 2.0, 2.0]]


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
    alpha_q, beta = quantize_group_scales(alpha)
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

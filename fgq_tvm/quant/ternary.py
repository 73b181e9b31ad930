"""Weight quantizers: fine-grained ternary groups, int8 group scales and int8 weights.

Groups are ``group_size`` consecutive input channels at one ``(k, r, s)`` (DESIGN.md, "The
arithmetic"): group ``g`` of filter ``k`` is ``W[k, g*N:(g+1)*N, r, s]``; when ``C`` is not a
multiple of ``N`` the last group is shorter. All solvers work on every group of a layer at once.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .layers import expand_groups

TernaryMethod = Literal["exact", "twn"]

TWN_THRESHOLD = 0.7
INT8_MAX = 127


def ternarize_groups(
    weight: np.ndarray | torch.Tensor, group_size: int, method: TernaryMethod = "exact"
) -> tuple[np.ndarray, np.ndarray]:
    """Ternarize a conv or linear weight in groups of ``group_size`` input channels.

    Parameters
    ----------
    weight
        ``[K, C, R, S]`` conv weight or ``[K, C]`` linear weight.
    group_size
        Input channels per group ``N`` (``G = ceil(C / N)`` groups per filter position).
    method
        ``"exact"``: the L2-optimal solution (sort ``|w|`` descending, keep the ``k`` largest that
        maximise ``(sum of top k)^2 / k``, ``alpha`` = their mean). ``"twn"``: keep
        ``|w| > 0.7 * mean|w|`` of the group, ``alpha`` = mean of the kept ``|w|``.

    Returns
    -------
    t, alpha
        int8 ternary values in {-1, 0, 1} with the shape of ``weight``, and float32 non-negative
        group scales ``[K, G, R, S]`` (``[K, G]`` for a linear weight). A group with no kept
        weight (all zero) has ``t = 0`` and ``alpha = 0``.
    """
    w = _as_float64(weight)
    if w.ndim not in (2, 4):
        raise ValueError(f"expected a [K, C] or [K, C, R, S] weight, got shape {w.shape}")
    if group_size < 1:
        raise ValueError(f"group size must be positive, got {group_size}")
    w4 = w.reshape(w.shape + (1, 1)) if w.ndim == 2 else w
    groups = _to_groups(w4, group_size)
    if method == "exact":
        keep, alpha = _solve_exact(np.abs(groups))
    elif method == "twn":
        keep, alpha = _solve_twn(np.abs(groups), _group_lengths(w4.shape[1], group_size))
    else:
        raise ValueError(f"unknown ternarization method {method!r}: use 'exact' or 'twn'")
    t = _from_groups(np.sign(groups) * keep, w4.shape[1]).astype(np.int8)
    alpha = alpha.astype(np.float32)
    if w.ndim == 2:
        return t[:, :, 0, 0], alpha[:, :, 0, 0]
    return t, alpha


def dequantize_ternary(t: np.ndarray, alpha: np.ndarray, group_size: int) -> np.ndarray:
    """float32 weight ``t * alpha`` (``alpha`` expanded from groups to channels), any rank."""
    return (t * expand_groups(alpha, group_size, t.shape[1])).astype(np.float32)


def quantize_group_scales(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize group scales to int8 against one float scale per output channel.

    Parameters
    ----------
    alpha
        float non-negative group scales ``[K, G, R, S]`` (any rank with ``K`` first).

    Returns
    -------
    alpha_q, beta
        int8 ``alpha_q = round(alpha / beta)`` in 0..127 with the shape of ``alpha``, and float32
        ``beta[k] = max(alpha[k]) / 127`` (1 for a filter whose scales are all zero).
    """
    alpha = np.asarray(alpha, dtype=np.float32)
    if np.any(alpha < 0):
        raise ValueError("group scales must be non-negative")
    beta = _channel_scale(alpha)
    alpha_q = np.clip(np.rint(alpha / _per_channel(beta, alpha.ndim)), 0, INT8_MAX)
    return alpha_q.astype(np.int8), beta


def quantize_int8_per_channel(weight: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 8-bit weights with one scale per output channel.

    Parameters
    ----------
    weight
        float weight with the output channel first (``[K, C, R, S]`` or ``[K, C]``).

    Returns
    -------
    w_int8, scale
        int8 ``round(w / scale)`` in -127..127 with the shape of ``weight``, and float32
        ``scale[k] = max|w[k]| / 127`` (1 for an all-zero filter).
    """
    w = np.asarray(_as_float64(weight), dtype=np.float32)
    scale = _channel_scale(np.abs(w))
    w_int8 = np.clip(np.rint(w / _per_channel(scale, w.ndim)), -INT8_MAX, INT8_MAX)
    return w_int8.astype(np.int8), scale


def _as_float64(weight: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        weight = weight.detach().cpu().numpy()
    return np.asarray(weight, dtype=np.float64)


def _channel_scale(magnitude: np.ndarray) -> np.ndarray:
    """float32 ``max(magnitude[k]) / 127`` per output channel, 1 where that is not positive."""
    peak = magnitude.reshape(magnitude.shape[0], -1).max(axis=1, initial=0.0)
    scale = (peak / np.float32(INT8_MAX)).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape((-1,) + (1,) * (ndim - 1))


def _to_groups(w: np.ndarray, group_size: int) -> np.ndarray:
    """``[K, C, R, S]`` -> ``[K, G, R, S, N]``, the short last group padded with zeros."""
    k, c, r, s = w.shape
    g = -(-c // group_size)
    padded = np.pad(w, ((0, 0), (0, g * group_size - c), (0, 0), (0, 0)))
    return padded.reshape(k, g, group_size, r, s).transpose(0, 1, 3, 4, 2)


def _from_groups(groups: np.ndarray, channels: int) -> np.ndarray:
    """``[K, G, R, S, N]`` -> ``[K, C, R, S]``, dropping the padding."""
    k, g, r, s, n = groups.shape
    return groups.transpose(0, 1, 4, 2, 3).reshape(k, g * n, r, s)[:, :channels]


def _group_lengths(channels: int, group_size: int) -> np.ndarray:
    """Real (unpadded) length of each group, shaped ``[1, G, 1, 1]``."""
    starts = np.arange(0, channels, group_size)
    return np.minimum(group_size, channels - starts).reshape(1, -1, 1, 1)


def _solve_exact(magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The L2-optimal kept set and scale of every group (last axis).

    Padding zeros sort last and never enter the optimum: they add nothing to the sum while
    increasing ``k``, and ``argmax`` takes the first (smallest) best ``k``. An all-zero group
    scores 0 everywhere, so ``k = 1`` and ``alpha = 0``; its kept element is a zero, whose
    sign (and so its ``t``) is 0.
    """
    n = magnitude.shape[-1]
    order = np.argsort(-magnitude, axis=-1, kind="stable")
    sums = np.cumsum(np.take_along_axis(magnitude, order, axis=-1), axis=-1)
    best = np.argmax(sums**2 / np.arange(1, n + 1), axis=-1)
    alpha = np.take_along_axis(sums, best[..., None], axis=-1)[..., 0] / (best + 1)
    ranks = np.argsort(order, axis=-1)
    return ranks <= best[..., None], alpha


def _solve_twn(magnitude: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """TWN's kept set and scale per group; ``lengths`` are the groups' unpadded sizes."""
    delta = TWN_THRESHOLD * magnitude.sum(axis=-1) / lengths
    keep = magnitude > delta[..., None]
    kept = keep.sum(axis=-1)
    alpha = (magnitude * keep).sum(axis=-1) / np.maximum(kept, 1)
    return keep, alpha

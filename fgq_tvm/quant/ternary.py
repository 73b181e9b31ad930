"""Weight quantizers: fine-grained ternary groups, int8 group scales and int8 weights.

Groups are ``group_size`` consecutive input channels at one ``(k, r, s)`` (DESIGN.md, "The
arithmetic"): group ``g`` of filter ``k`` is ``W[k, g*N:(g+1)*N, r, s]``; when ``C`` is not a
multiple of ``N`` the last group is shorter. All solvers work on every group of a layer at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .layers import signed_scales

TernaryMethod = Literal["exact", "twn"]

TWN_THRESHOLD = 0.7
INT8_MAX = 127


@dataclass(frozen=True, eq=False)
class TernaryGroups:
    """A weight ternarized in groups: the values ``t`` and the scales that give them magnitude.

    Attributes
    ----------
    values
        int8 ``t`` in {-1, 0, 1}, ``[K, C, R, S]`` (``[K, C]`` for a linear weight).
    positive
        float32 non-negative group scales ``[K, G, R, S]`` (``[K, G]``): the magnitude of the
        group's ``t = 1`` weights, and of all its weights when :attr:`negative` is ``None``.
    negative
        float32 ``[K, G, R, S]``: the magnitude of the group's ``t = -1`` weights (asymmetric
        scales, as in TTQ), or ``None`` (one scale per group).
    group_size
        Input channels per group.
    """

    values: np.ndarray
    positive: np.ndarray
    negative: np.ndarray | None
    group_size: int

    @property
    def asymmetric(self) -> bool:
        return self.negative is not None

    @property
    def _scales(self) -> list[np.ndarray]:
        """The positive scales, then the negative ones if there are any."""
        return [self.positive] if self.negative is None else [self.positive, self.negative]

    def dequantize(self) -> np.ndarray:
        """float32 weight: each ``t`` times the scale of its group and sign."""
        scales = signed_scales(self.values, self.positive, self.negative, self.group_size)
        return (self.values * scales).astype(np.float32)

    def folded(self, factor: np.ndarray) -> TernaryGroups:
        """The weight scaled by a per-output-channel ``factor`` (float64 ``[K]``, a folded
        BatchNorm's), in ternary form.

        ``t_f = t * sign(factor)``, scales ``* |factor|`` (rounded once, from float64), and where
        ``factor < 0`` the positive and negative scales trade places, so that the dequantized
        weight equals the float32 product ``fold_batchnorm`` computes for :meth:`dequantize`'s.
        """
        values = (self.values * _per_channel(np.sign(factor), self.values.ndim)).astype(np.int8)
        magnitude = _per_channel(np.abs(factor), self.values.ndim)
        scaled = [
            (scale.astype(np.float64) * magnitude).astype(np.float32) for scale in self._scales
        ]
        if self.asymmetric:
            flip = _per_channel(factor < 0, self.values.ndim)
            scaled = [np.where(flip, scaled[1], scaled[0]), np.where(flip, scaled[0], scaled[1])]
        return TernaryGroups(
            values, scaled[0], scaled[1] if self.asymmetric else None, self.group_size
        )

    def quantized_scales(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The group scales in int8 against one float scale per output channel.

        Returns
        -------
        positive_q, negative_q, beta
            int8 ``round(scale / beta)`` in 0..127 (``negative_q`` is ``None`` for symmetric
            scales), and float32 ``beta[k]``: the largest scale of filter ``k`` (either sign)
            over 127, 1 for a filter whose scales are all zero.
        """
        beta = _channel_scale(np.concatenate(self._scales, axis=1))
        quantized = [_quantize_scales(scale, beta) for scale in self._scales]
        return quantized[0], (quantized[1] if self.asymmetric else None), beta


def ternarize_groups(
    weight: np.ndarray | torch.Tensor,
    group_size: int,
    method: TernaryMethod = "exact",
    asymmetric: bool = False,
) -> TernaryGroups:
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
    asymmetric
        Solve the group's positive and negative weights apart, each with its own scale (the
        L2 optimum of that form: a positive weight never takes ``t = -1``). TWN keeps the same
        weights either way and averages each sign's magnitudes apart.

    Returns
    -------
    TernaryGroups
        A group with no kept weight of a sign (all zero) has ``t = 0`` and that scale ``0``.
    """
    w = _as_float64(weight)
    if w.ndim not in (2, 4):
        raise ValueError(f"expected a [K, C] or [K, C, R, S] weight, got shape {w.shape}")
    if group_size < 1:
        raise ValueError(f"group size must be positive, got {group_size}")
    if method not in ("exact", "twn"):
        raise ValueError(f"unknown ternarization method {method!r}: use 'exact' or 'twn'")
    w4 = w.reshape(w.shape + (1, 1)) if w.ndim == 2 else w
    groups = _to_groups(w4, group_size)
    signs = (groups > 0, groups < 0) if asymmetric else (groups != 0,)
    lengths = _group_lengths(w4.shape[1], group_size)
    solved = [_solve(groups, sign, method, lengths) for sign in signs]
    keep = np.logical_or.reduce([kept for kept, _ in solved])
    scales = [scale.astype(np.float32) for _, scale in solved]
    t = _from_groups(np.sign(groups) * keep, w4.shape[1]).astype(np.int8)
    if w.ndim == 2:
        t, scales = t[:, :, 0, 0], [scale[:, :, 0, 0] for scale in scales]
    return TernaryGroups(t, scales[0], scales[1] if asymmetric else None, group_size)


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


def _quantize_scales(scale: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """int8 ``round(scale / beta)`` per output channel, in 0..127."""
    if np.any(scale < 0):
        raise ValueError("group scales must be non-negative")
    quantized = np.rint(scale.astype(np.float32) / _per_channel(beta, scale.ndim))
    return np.clip(quantized, 0, INT8_MAX).astype(np.int8)


def _solve(
    groups: np.ndarray, sign: np.ndarray, method: TernaryMethod, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The kept set (within ``sign``, a mask of the weights this scale serves) and the scale of
    every group (last axis) of ``groups``."""
    if method == "exact":
        keep, scale = _solve_exact(np.abs(groups * sign))
        return keep & sign, scale
    return _solve_twn(np.abs(groups), sign, lengths)


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


def _solve_twn(
    magnitude: np.ndarray, sign: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """TWN's kept set within ``sign`` and its scale per group; the threshold comes from all of
    the group's weights (``lengths``: the groups' unpadded sizes)."""
    delta = TWN_THRESHOLD * magnitude.sum(axis=-1) / lengths
    keep = (magnitude > delta[..., None]) & sign
    kept = keep.sum(axis=-1)
    alpha = (magnitude * keep).sum(axis=-1) / np.maximum(kept, 1)
    return keep, alpha

"""The quantized layer record and the reference arithmetic that defines its numbers.

Every conv or linear layer that fgq-tvm quantizes becomes a :class:`QuantizedLayer`. The
PyTorch reference model and the compiled module both compute :func:`reference_forward`'s
numbers (DESIGN.md, "The arithmetic"):

* input activations ``x_q = clamp(round(x / s_x), qmin, qmax)`` (float32 division, round half
  to even);
* ternary layers with float scales: ``y = f32(f64(s_x) * sum_{g,r,s} f64(alpha[k,g,r,s]) *
  psum[k,g,r,s]) + bias`` where ``psum`` is the exact integer sum of ``t * x_q`` over the
  group's channels; the scale sum runs in float64 so that the summation order of the compiled
  kernel and of the reference do not change the float32 result;
* integer-weight layers (ternary with int8 scales, where the weight is ``t * alpha_q``, with
  ``alpha_q`` of the weight's sign where the scales are asymmetric, and 8-bit weight layers):
  ``y = f32(f64(acc) * f64(out_scale[k])) + bias`` with ``acc`` the exact int32 sum of
  ``w * x_q`` and ``out_scale = f32(s_x) * f32(channel_scale)`` in float32. Products are
  rounded to float32 once, so a compiler's fused multiply-add cannot change the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..config import LayerConfig


@dataclass(frozen=True)
class ActQuant:
    """Uniform activation quantizer: ``clamp(round(x / scale), qmin, qmax)``.

    Unsigned quantizers (inputs that are never negative, such as ReLU outputs) use
    ``[0, 2^bits - 1]``; signed ones the symmetric ``[-(2^(bits-1) - 1), 2^(bits-1) - 1]``.
    """

    scale: float
    bits: int
    signed: bool

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> str:
        """The integer dtype that holds the quantized values."""
        return "int8" if self.signed else "uint8"

    @property
    def offset(self) -> int:
        """Added to a quantized value to store it as an unsigned byte: 128 when signed (the
        int8 dot core multiplies unsigned activation bytes)."""
        return 128 if self.signed else 0

    @property
    def name(self) -> str:
        """``u8:0.05``: signedness, bits and the exact scale (:meth:`parse` reads it back)."""
        return f"{'s' if self.signed else 'u'}{self.bits}:{float(self.scale)!r}"

    @staticmethod
    def parse(name: str) -> ActQuant:
        """The quantizer called ``name`` (see :attr:`name`)."""
        kind, _, scale = name.partition(":")
        if kind[:1] not in ("s", "u") or not kind[1:].isdigit() or not scale:
            raise ValueError(f"unknown activation quantizer {name!r}")
        return ActQuant(float(scale), int(kind[1:]), kind[0] == "s")

    def stored(self, x: np.ndarray) -> np.ndarray:
        """NumPy reference of the activation bytes between int8 kernels: the quantized
        float32 ``x`` plus :attr:`offset`, as uint8."""
        scale = np.float32(self.scale)
        values = np.clip(np.round(x.astype(np.float32) / scale), self.qmin, self.qmax)
        return (values + self.offset).astype(np.uint8)

    def quantize(self, x):
        """Quantize a float32 torch tensor; returns float32 tensor of integers."""
        import torch

        scale = torch.tensor(self.scale, dtype=torch.float32)
        return torch.clamp(torch.round(x / scale), self.qmin, self.qmax)


@dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """A conv2d or linear layer in quantized form.

    Attributes
    ----------
    name
        The module path of the layer in the PyTorch model (``layer1.0.conv1``).
    op
        ``"conv2d"`` or ``"linear"``. Linear weights are stored as ``[K, C, 1, 1]``.
    config
        The :class:`~fgq_tvm.config.LayerConfig` the layer was quantized with.
    act
        The quantizer of the layer's input activations.
    weight
        int8 ``[K, C, R, S]``: the ternary values ``t`` (in {-1, 0, 1}) of a ternary layer, or the
        8-bit weights of an int8 layer.
    group_size
        Input channels per group (the last group of a layer may be shorter); ``C`` for int8 layers.
    group_scale
        float32 ``[K, G, R, S]``: ternary layers with float scales, ``alpha``.
    group_scale_q
        int8 ``[K, G, R, S]``: ternary layers with int8 scales, ``alpha_q`` in 0..127 (with
        asymmetric scales, that of the ``t = 1`` weights).
    negative_scale_q
        int8 ``[K, G, R, S]``: ternary layers with asymmetric int8 scales, ``alpha_q`` of the
        ``t = -1`` weights; ``None`` where one scale serves both signs.
    channel_scale
        float32 ``[K]``: the per-output-channel weight scale of int8 layers, or ``beta`` of ternary
        layers with int8 scales.
    bias
        float32 ``[K]`` (zeros where the layer had none).
    stride, padding, dilation
        Conv2d geometry (``(1, 1)``, ``(0, 0)``, ``(1, 1)`` for linear).
    """

    name: str
    op: Literal["conv2d", "linear"]
    config: LayerConfig
    act: ActQuant
    weight: np.ndarray
    group_size: int
    bias: np.ndarray
    group_scale: np.ndarray | None = None
    group_scale_q: np.ndarray | None = None
    negative_scale_q: np.ndarray | None = None
    channel_scale: np.ndarray | None = None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def is_ternary(self) -> bool:
        return self.config.weights == "ternary"

    @property
    def uses_group_scales(self) -> bool:
        """True for the float-scale ternary form (one float multiply per group)."""
        return self.group_scale is not None

    @property
    def num_groups(self) -> int:
        return -(-self.weight.shape[1] // self.group_size)

    @property
    def asymmetric_scales(self) -> bool:
        return self.negative_scale_q is not None

    def integer_weight(self) -> np.ndarray:
        """int32 ``[K, C, R, S]`` integer-form weights: ``t * alpha_q`` or the int8 weights."""
        weight = self.weight.astype(np.int32)
        if self.group_scale_q is None:
            return weight
        scales = signed_scales(weight, self.group_scale_q, self.negative_scale_q, self.group_size)
        return weight * scales.astype(np.int32)

    def out_scale(self) -> np.ndarray:
        """float32 ``[K]`` output scale of the integer forms: ``f32(s_x) * channel_scale``."""
        return (np.float32(self.act.scale) * self.channel_scale.astype(np.float32)).astype(
            np.float32
        )


def expand_groups(per_group: np.ndarray, group_size: int, channels: int) -> np.ndarray:
    """Repeat ``[K, G, ...]`` per-group values to ``[K, C, ...]`` per-channel values."""
    return np.repeat(per_group, group_size, axis=1)[:, :channels]


def signed_scales(
    t: np.ndarray, positive: np.ndarray, negative: np.ndarray | None, group_size: int
) -> np.ndarray:
    """Each weight's scale, ``[K, C, ...]``: its group's ``negative`` where ``t < 0``, else
    ``positive`` (per group ``[K, G, ...]``; ``negative=None``: ``positive`` everywhere)."""
    channels = t.shape[1]
    scales = expand_groups(positive, group_size, channels)
    if negative is None:
        return scales
    return np.where(t < 0, expand_groups(negative, group_size, channels), scales)


def reference_forward(layer: QuantizedLayer, x):
    """The layer's output for float32 input ``x`` (torch, NCHW or NC), as the product defines it."""
    import torch
    import torch.nn.functional as F

    x_q = layer.act.quantize(x)
    if layer.op == "linear":
        x_q = x_q[:, :, None, None]
    if layer.uses_group_scales:
        channels = layer.weight.shape[1]
        alpha = expand_groups(layer.group_scale, layer.group_size, channels).astype(np.float64)
        weight = torch.from_numpy(layer.weight.astype(np.float64) * alpha)
        acc = F.conv2d(x_q.double(), weight, **_geometry(layer))
    else:
        acc = integer_conv(x_q, layer.integer_weight(), layer)
    if layer.uses_group_scales:
        y = (acc * float(np.float32(layer.act.scale))).float()
    else:
        out_scale = torch.from_numpy(layer.out_scale().astype(np.float64))
        y = (acc * out_scale[:, None, None]).float()
    y = y + torch.from_numpy(layer.bias.astype(np.float32))[:, None, None]
    return y[:, :, 0, 0] if layer.op == "linear" else y


FLOAT32_EXACT = 2**24  # every integer of smaller magnitude is a float32


def integer_conv(x_q, weight: np.ndarray, layer: QuantizedLayer):
    """The exact sums ``conv2d(x_q, weight)`` (float64 torch) of integer activations ``x_q``
    (float32 torch) and integer weights ``[K, C, R, S]``, with ``layer``'s geometry.

    As float32 convolutions where no sum can reach 2^24 (every partial sum is then an integer
    a float32 holds, whatever the order of the additions): with the weights as they are, or
    split into ``16 * high + low`` (both in -8..8) and the two sums added in float64; about 4x
    faster than float64 convolutions here (``benchmarks/reference_speed.py``). A result that
    is not all integers (a convolution algorithm with inexact transforms, which PyTorch's CPU
    convolutions do not use) and layers too wide for the bound take the float64 convolution.
    """
    import torch
    import torch.nn.functional as F

    geometry = _geometry(layer)
    reach = max(abs(layer.act.qmin), abs(layer.act.qmax))
    high = np.floor_divide(weight + 8, 16)
    parts = [weight] if _exact_in_float32(weight, reach) else [high, weight - 16 * high]
    if all(_exact_in_float32(part, reach) for part in parts):
        sums = [
            F.conv2d(x_q, torch.from_numpy(part.astype(np.float32)), **geometry).double()
            for part in parts
        ]
        acc = sums[0] if len(sums) == 1 else sums[0] * 16 + sums[1]
        if torch.equal(acc, acc.round()):
            return acc
    return F.conv2d(x_q.double(), torch.from_numpy(weight.astype(np.float64)), **geometry)


def _geometry(layer: QuantizedLayer) -> dict:
    """``layer``'s stride, padding and dilation, as ``conv2d`` takes them."""
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}


def _exact_in_float32(weight: np.ndarray, reach: int) -> bool:
    """Whether every sum of products of ``weight``'s rows with activations of magnitude up to
    ``reach`` stays below :data:`FLOAT32_EXACT`."""
    largest = np.abs(weight.astype(np.int64)).reshape(weight.shape[0], -1).sum(axis=1).max()
    return int(largest) * reach < FLOAT32_EXACT

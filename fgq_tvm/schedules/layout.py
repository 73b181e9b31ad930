"""Activation layouts between layers: plain ``NCHW``, channels in blocks of 16 (``NCHW16c``),
or channels last (``NHWC``).

``NCHW16c`` stores element ``[b, c, h, w]`` at ``[b, c // 16, h, w, c % 16]``: one 64-byte float
vector per pixel and channel block. It is the layout of the int8 dot core's register tile (16
output channels per vector), so a kernel writes its output tile with whole vector stores and the
next kernel quantizes its input with whole vector loads; in ``NCHW`` both are transposes.

``NHWC`` stores element ``[b, c, h, w]`` at ``[b, h, w, c]``: the layout of the GPU's implicit
GEMM (:mod:`~fgq_tvm.schedules.conv2d_cuda`), whose output matrix (one row per pixel, one column
per channel) is the NHWC tensor and whose im2col rows read whole pixels.

The network keeps one layout from its first layer in it to its last (Relax's ``ConvertLayout``,
see :func:`fgq_tvm.compiler.lower_to_relax`); in ``NCHW16c``, channel counts that are not whole
blocks stay ``NCHW``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from tvm import te

ActivationLayout = Literal["NCHW", "NCHW16c", "NHWC"]
NCHW: ActivationLayout = "NCHW"
NCHW16C: ActivationLayout = "NCHW16c"
NHWC: ActivationLayout = "NHWC"
CHANNEL_BLOCK = 16


@dataclass(frozen=True)
class Layouts:
    """The layouts of a kernel's input and of its output (and residual).

    A stem conv whose input channels are no whole block (an RGB image) reads NCHW and may
    write NCHW16c, so that the network is blocked from its first layer on.
    """

    input: ActivationLayout = NCHW
    output: ActivationLayout = NCHW

    @property
    def name(self) -> str:
        """``NCHW``, ``NHWC``, ``NCHW16c`` or ``NCHW->NCHW16c`` (:meth:`parse` reads it
        back)."""
        return self.input if self.input == self.output else f"{self.input}->{self.output}"

    @staticmethod
    def parse(name: str) -> Layouts:
        """The layouts called ``name`` (see :attr:`name`)."""
        source, _, target = name.partition("->")
        if not {source, target or source} <= {NCHW, NCHW16C, NHWC}:
            raise ValueError(f"unknown layouts {name!r}")
        return Layouts(source, target or source)


PLAIN = Layouts()
BLOCKED = Layouts(NCHW16C, NCHW16C)
CHANNELS_LAST = Layouts(NHWC, NHWC)


def activation_dims(
    layout: ActivationLayout, batch: int, channels: int, height: int, width: int
) -> tuple[int, ...]:
    """The tensor shape of an NCHW activation of these dimensions in ``layout``."""
    if layout == NCHW:
        return batch, channels, height, width
    if layout == NHWC:
        return batch, height, width, channels
    _check_whole_blocks(channels)
    return batch, channels // CHANNEL_BLOCK, height, width, CHANNEL_BLOCK


def activation_placeholder(
    layout: ActivationLayout, nchw: tuple[int, int, int, int], name: str, dtype: str = "float32"
) -> te.Tensor:
    """A placeholder holding an activation of NCHW shape ``nchw`` in ``layout``."""
    return te.placeholder(activation_dims(layout, *nchw), dtype, name=name)


def element(tensor: te.Tensor, layout: ActivationLayout, b, c, h, w):
    """``tensor``'s element at NCHW position ``(b, c, h, w)``."""
    if layout == NCHW:
        return tensor[b, c, h, w]
    if layout == NHWC:
        return tensor[b, h, w, c]
    return tensor[b, c // CHANNEL_BLOCK, h, w, c % CHANNEL_BLOCK]


def to_layout(x: np.ndarray, layout: ActivationLayout) -> np.ndarray:
    """An NCHW array in ``layout`` (NumPy reference of ``R.layout_transform``)."""
    if layout == NCHW:
        return x
    if layout == NHWC:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    batch, channels, height, width = x.shape
    _check_whole_blocks(channels)
    blocked = x.reshape(batch, channels // CHANNEL_BLOCK, CHANNEL_BLOCK, height, width)
    return np.ascontiguousarray(blocked.transpose(0, 1, 3, 4, 2))


def from_layout(y: np.ndarray, layout: ActivationLayout) -> np.ndarray:
    """A ``layout`` array back in NCHW."""
    if layout == NCHW:
        return y
    if layout == NHWC:
        return np.ascontiguousarray(y.transpose(0, 3, 1, 2))
    batch, blocks, height, width, lanes = y.shape
    return np.ascontiguousarray(y.transpose(0, 1, 4, 2, 3)).reshape(
        batch, blocks * lanes, height, width
    )


def index_map(source: ActivationLayout, target: ActivationLayout):
    """The index map of ``R.layout_transform`` from ``source`` to ``target`` (different)."""
    if (source, target) == (NCHW, NCHW16C):
        return lambda b, c, h, w: (b, c // CHANNEL_BLOCK, h, w, c % CHANNEL_BLOCK)
    if (source, target) == (NCHW16C, NCHW):
        return lambda b, cb, h, w, ci: (b, cb * CHANNEL_BLOCK + ci, h, w)
    if (source, target) == (NCHW, NHWC):
        return lambda b, c, h, w: (b, h, w, c)
    if (source, target) == (NHWC, NCHW):
        return lambda b, h, w, c: (b, c, h, w)
    raise ValueError(f"no layout transform from {source} to {target}")


def nchw_shape(dims: tuple[int, ...], layout: ActivationLayout) -> tuple[int, int, int, int]:
    """The NCHW shape of an activation whose ``layout`` tensor has shape ``dims``."""
    if layout == NCHW:
        return dims
    if layout == NHWC:
        batch, height, width, channels = dims
        return batch, channels, height, width
    batch, blocks, height, width, _ = dims
    return batch, blocks * CHANNEL_BLOCK, height, width


def _check_whole_blocks(channels: int) -> None:
    if channels % CHANNEL_BLOCK:
        raise ValueError(f"{NCHW16C} wants whole blocks of {CHANNEL_BLOCK} channels: {channels}")

"""Which core computes a layer on a target, and its scheduled PrimFunc.

Cores:

* ``int8-dot-vnni`` (:mod:`~fgq_tvm.schedules.conv2d_vnni`): integer weights (int8 layers, or
  ternary with int8 group scales) and unsigned activations on a target with AVX-512 VNNI, when
  each weight serves enough output positions to repay decoding it once per call;
* ``bitplane`` (:mod:`~fgq_tvm.schedules.conv2d`): everything else (float group scales, signed
  activations, dense layers, targets without VNNI).

Both take the same arguments and compute the same numbers (``reference_forward``).
"""

from __future__ import annotations

from typing import Literal

import tvm

from ..quant.layers import ActQuant
from . import conv2d_vnni
from .conv2d import Conv2dShape, WeightEncoding, conv2d_prim_func
from .intrinsics_x86 import has_vnni

Core = Literal["bitplane", "int8-dot-vnni"]
MIN_VNNI_REUSE = 16  # output positions per weight from which the dot core's decode pays off


def select_core(shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding, target) -> Core:
    """The fastest exact core for this layer on ``target`` (``None``: portable default)."""
    reuse = shape.batch * shape.out_height * shape.out_width
    if (
        target is not None
        and has_vnni(target)
        and conv2d_vnni.supports(shape, act, encoding)
        and reuse >= MIN_VNNI_REUSE
    ):
        return "int8-dot-vnni"
    return "bitplane"


def core_prim_func(
    core: Core, shape: Conv2dShape, act: ActQuant, encoding: WeightEncoding
) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc of ``core`` for this layer, with its default schedule."""
    if core == "int8-dot-vnni":
        return conv2d_vnni.vnni_conv2d_prim_func(shape, act, encoding)
    return conv2d_prim_func(shape, act, encoding)

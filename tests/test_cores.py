"""The core interface: cores are plug-ins chosen by an ordered list of rules.

The cores' arithmetic is checked bit for bit in tests/test_kernels.py; these tests check the
rules that pick them and the requests they refuse.
"""

from __future__ import annotations

import numpy as np
import pytest

from fgq_tvm.quant.layers import ActQuant
from fgq_tvm.schedules.conv2d import BITPLANE_CORE
from fgq_tvm.schedules.conv2d_popcount import POPCOUNT_CORE
from fgq_tvm.schedules.core import Conv2dShape, Core, Epilogue, LayerKernels
from fgq_tvm.schedules.layout import (
    BLOCKED,
    CHANNELS_LAST,
    NCHW,
    NCHW16C,
    NHWC,
    PLAIN,
    Layouts,
    activation_dims,
    from_layout,
    index_map,
    nchw_shape,
    to_layout,
)
from fgq_tvm.schedules.select import CORES, core_named, network_layout, select_core
from fgq_tvm.target import parse_target

SHAPE = Conv2dShape(1, 64, 8, 8, 64, (3, 3), padding=(1, 1), group_size=4)
UNSIGNED = ActQuant(0.1, 8, False)


class _WideOnly(Core):
    """A core for Sapphire Rapids targets that computes layers of at least 128 input channels."""

    name = "wide-only"

    def available(self, target) -> bool:
        return target is not None and target.attrs.get("mcpu") == "sapphirerapids"

    def supports(self, shape, act, encoding) -> bool:
        return shape.in_channels >= 128

    def layer_kernels(self, shape, act, encoding, epilogue, layouts, quantized_input):
        return LayerKernels(self.name, None, (shape.output_dims, "float32"))


def test_the_first_core_the_target_has_and_that_computes_the_layer_takes_it():
    cores = (_WideOnly(), BITPLANE_CORE)
    sapphire_rapids = parse_target("llvm -mcpu=sapphirerapids")
    wide = Conv2dShape(1, 128, 8, 8, 64, group_size=4)
    assert select_core(wide, UNSIGNED, "int8", sapphire_rapids, cores) == "wide-only"
    assert select_core(SHAPE, UNSIGNED, "int8", sapphire_rapids, cores) == "bitplane"
    assert (
        select_core(wide, UNSIGNED, "int8", parse_target("llvm -mcpu=znver4"), cores) == "bitplane"
    )
    with pytest.raises(ValueError, match="no core computes int8 weights"):
        select_core(SHAPE, UNSIGNED, "int8", sapphire_rapids, cores[:1])


def test_the_registered_cores_have_distinct_names_and_end_with_one_for_every_layer():
    names = [core.name for core in CORES]
    assert len(set(names)) == len(names)
    assert CORES[-1] is BITPLANE_CORE
    assert BITPLANE_CORE.available(None) and BITPLANE_CORE.supports(SHAPE, UNSIGNED, "int8")
    assert all(core_named(name).name == name for name in names)
    with pytest.raises(ValueError, match="no core is named 'amx'"):
        core_named("amx")


def test_a_core_refuses_layouts_and_activation_bytes_it_does_not_compute_in():
    with pytest.raises(ValueError, match="bitplane core computes in NCHW only, not NCHW16c"):
        BITPLANE_CORE.kernels(SHAPE, UNSIGNED, "int8", layouts=BLOCKED)
    with pytest.raises(ValueError, match="reads and writes float32 activations only"):
        POPCOUNT_CORE.kernels(SHAPE, UNSIGNED, "int8", quantized_input=True)
    with pytest.raises(ValueError, match="reads and writes float32 activations only"):
        BITPLANE_CORE.kernels(SHAPE, UNSIGNED, "int8", Epilogue(quantize=UNSIGNED))
    assert BITPLANE_CORE.layouts_for(BLOCKED) == PLAIN
    assert core_named("int8-dot-vnni").layouts_for(BLOCKED) == BLOCKED
    assert core_named("int8-gemm-cuda").layouts_for(PLAIN) == CHANNELS_LAST
    with pytest.raises(ValueError, match="gemm-cuda core computes in NHWC only, not NCHW"):
        core_named("int8-gemm-cuda").kernels(SHAPE, UNSIGNED, "int8")


def test_the_network_keeps_the_layout_of_the_targets_first_core_that_has_one():
    assert network_layout(parse_target("llvm -mcpu=cascadelake")) == NCHW16C
    assert network_layout(parse_target("llvm -mcpu=haswell")) == NCHW16C
    assert network_layout(parse_target("llvm -mcpu=nehalem")) == NCHW
    assert network_layout(None) == NCHW
    assert network_layout(parse_target("cuda")) == NHWC


@pytest.mark.parametrize("layout", [NCHW, NCHW16C, NHWC])
def test_layouts_round_trip_and_name_their_dims(layout):
    x = np.arange(2 * 32 * 3 * 5, dtype=np.float32).reshape(2, 32, 3, 5)
    stored = to_layout(x, layout)
    assert stored.shape == activation_dims(layout, *x.shape)
    assert nchw_shape(stored.shape, layout) == x.shape
    assert np.array_equal(from_layout(stored, layout), x)
    if layout != NCHW:
        moved = np.zeros(stored.shape, np.float32)
        for index in np.ndindex(*x.shape):
            moved[index_map(NCHW, layout)(*index)] = x[index]
        assert np.array_equal(moved, stored)
        assert Layouts.parse(Layouts(NCHW, layout).name) == Layouts(NCHW, layout)


def test_only_tunable_cores_define_a_search_space():
    with pytest.raises(NotImplementedError, match="bitplane core has no tuning space"):
        BITPLANE_CORE.workload(SHAPE, UNSIGNED, "int8", Epilogue(), PLAIN, False)
    assert [core.name for core in CORES if core.tunable] == ["int8-dot-vnni", "int16-dot-avx2"]

"""Randomised checks of the quantized conv2d/dense kernels against the reference arithmetic.

Two properties, on random geometries (channels not divisible by N, stride 2, padding,
dilation, 1x1 and 3x3 kernels, dense layers, N in 1, 3, 4, 16, 64, every weight encoding and
both schedule families):

* the integer part of the compute (the per-group sums of the bitplane core) equals NumPy's
  exact integer sums;
* the scheduled kernel's float output is bit-identical to :func:`reference_forward`, for the
  bitplane core (every encoding and schedule family) and for both integer dot cores (AVX-512
  VNNI and AVX2) with their load-time weight pack (every encoding, int8 group scales one per
  group or one per sign and group included; signed activations for the integer encodings;
  NCHW, NCHW16c and NCHW in, NCHW16c out; activation bytes in and out; built for the host CPU,
  or for Haswell on the AVX2 core) and for the popcount core (1- to 4-bit unsigned
  activations, groups of 64 and 128 channels, both one-scale-per-group forms).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import tvm
from tvm import te

from fgq_tvm.config import LayerConfig
from fgq_tvm.quant.layers import ActQuant, QuantizedLayer, reference_forward
from fgq_tvm.schedules import conv2d_popcount
from fgq_tvm.schedules.conv2d import (
    ConvSchedule,
    conv2d_compute,
    conv2d_prim_func,
    pack_trits,
    reference_group_sums,
)
from fgq_tvm.schedules.core import NO_EPILOGUE, Conv2dShape, Epilogue, LayerKernels
from fgq_tvm.schedules.intrinsics_x86 import AVX2_DOT, VNNI_DOT
from fgq_tvm.schedules.kernel_spec import kernel_arguments, layer_encoding, layer_shape
from fgq_tvm.schedules.layout import BLOCKED, CHANNEL_BLOCK, NCHW, NCHW16C, PLAIN, Layouts
from fgq_tvm.schedules.select import build_layer, core_named, select_core
from fgq_tvm.target import host_target, parse_target

TARGET = tvm.target.Target({"kind": "llvm"})
GROUP_SIZES = (1, 3, 4, 16, 64)
ENCODINGS = (
    "ternary_group_scales",
    "ternary_int8_scales",
    "ternary_asymmetric_int8_scales",
    "int8",
)
INTEGER_SCALES = ("ternary_int8_scales", "ternary_asymmetric_int8_scales")
SHAPES_PER_ENCODING = 70
LAYOUTS = (PLAIN, BLOCKED, Layouts(NCHW, NCHW16C))


def random_layer(
    rng: np.random.Generator,
    encoding: str,
    dense: bool = False,
    layouts: Layouts = PLAIN,
    channel_multiple: int = 1,
) -> QuantizedLayer:
    """A random quantized layer with a random geometry (whole blocks of 16 channels where
    ``layouts`` has NCHW16c; input channels a multiple of ``channel_multiple``)."""
    channels = int(rng.integers(1, 80))
    out_channels = int(rng.choice([int(rng.integers(1, 40)), 16, 32]))
    if layouts.input == NCHW16C:
        channels = CHANNEL_BLOCK * int(rng.integers(1, 5))
    channels = -(-channels // channel_multiple) * channel_multiple
    if layouts.output == NCHW16C:
        out_channels = CHANNEL_BLOCK * int(rng.integers(1, 5))
    kernel = 1 if dense else int(rng.choice([1, 3]))
    group_size = int(rng.choice(GROUP_SIZES))
    if encoding == "int8":
        group_size = channels
    weights = "int8" if encoding == "int8" else "ternary"
    scales = {"ternary_int8_scales": "int8", "ternary_asymmetric_int8_scales": "int8-asymmetric"}
    config = LayerConfig(
        weights, group_size, int(rng.choice([8, 4])), scales.get(encoding, "float")
    )
    act_scale = float(np.float32(rng.uniform(0.01, 0.2)))
    act = ActQuant(act_scale, config.act_bits, signed=bool(rng.integers(0, 2)))
    groups = -(-channels // group_size)
    if encoding == "int8":
        weight = rng.integers(-127, 128, (out_channels, channels, kernel, kernel))
    else:
        weight = rng.integers(-1, 2, (out_channels, channels, kernel, kernel))
    scale_shape = (out_channels, groups, kernel, kernel)
    geometry = {} if dense else _random_geometry(rng, kernel)
    return QuantizedLayer(
        name="layer",
        op="linear" if dense else "conv2d",
        config=config,
        act=act,
        weight=weight.astype(np.int8),
        group_size=group_size,
        bias=rng.normal(size=out_channels).astype(np.float32),
        group_scale=(
            rng.uniform(0.001, 1.0, scale_shape).astype(np.float32)
            if encoding == "ternary_group_scales"
            else None
        ),
        group_scale_q=(
            rng.integers(0, 128, scale_shape).astype(np.int8)
            if encoding in INTEGER_SCALES
            else None
        ),
        negative_scale_q=(
            rng.integers(0, 128, scale_shape).astype(np.int8)
            if encoding == "ternary_asymmetric_int8_scales"
            else None
        ),
        channel_scale=(
            None
            if encoding == "ternary_group_scales"
            else rng.uniform(1e-4, 1e-2, out_channels).astype(np.float32)
        ),
        **geometry,
    )


def _random_geometry(rng: np.random.Generator, kernel: int) -> dict:
    stride = int(rng.choice([1, 2]))
    padding = int(rng.integers(0, 2)) if kernel == 3 else 0
    dilation = int(rng.choice([1, 1, 2])) if kernel == 3 else 1
    return {"stride": (stride, stride), "padding": (padding, padding), "dilation": (dilation,) * 2}


def random_input(rng: np.random.Generator, layer: QuantizedLayer) -> np.ndarray:
    """Float input spanning the quantizer's range and beyond (to exercise clamping)."""
    channels = layer.weight.shape[1]
    if layer.op == "linear":
        shape = (int(rng.integers(1, 3)), channels)
    else:
        size = int(rng.integers(5, 20))
        shape = (int(rng.integers(1, 3)), channels, size, int(rng.integers(5, 20)))
    bound = layer.act.scale * layer.act.qmax * 1.2
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def run_kernel(
    layer: QuantizedLayer,
    x: np.ndarray,
    knobs: ConvSchedule | None = None,
    epilogue: Epilogue = NO_EPILOGUE,
    residual: tuple[np.ndarray, ...] = (),
):
    """Compile and run the layer's scheduled bitplane PrimFunc on ``x``."""
    shape = layer_shape(layer, as_image(x).shape)
    kernels = core_named("bitplane").kernels(shape, layer.act, layer_encoding(layer))
    func = conv2d_prim_func(shape, layer.act, layer_encoding(layer), knobs, epilogue)
    return run_layer(replace(kernels, layer=func), layer, x, TARGET, *residual)


def run_layer(kernels: LayerKernels, layer: QuantizedLayer, x: np.ndarray, target, *residual):
    """Build ``kernels`` for ``target`` with the layer's weights and run them on ``x``."""
    stored = kernel_arguments(layer, kernels.core)
    result = build_layer(kernels, stored, target)(as_image(x), *residual)
    return result if x.ndim == 4 else result[:, :, 0, 0]


def with_epilogue(rng: np.random.Generator, expected: np.ndarray, quantize=None):
    """A random epilogue (quantizing its output with ``quantize``, if given), the residual it
    adds (if any) and the expected output after it."""
    residual, relu = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
    epilogue = Epilogue(residual, relu, quantize)
    image = as_image(expected)
    residual = rng.normal(size=image.shape).astype(np.float32) if epilogue.residual else None
    after = epilogue.reference(image, residual)
    result = after if expected.ndim == 4 else after[:, :, 0, 0]
    return epilogue, [] if residual is None else [residual], result


def as_image(x: np.ndarray) -> np.ndarray:
    """Linear layers' ``[B, F]`` inputs as the ``[B, F, 1, 1]`` their kernels take."""
    return x if x.ndim == 4 else x[:, :, None, None]


def compute_group_sums(layer: QuantizedLayer, x_q: np.ndarray, shape: Conv2dShape):
    """The compute definition's ``psum`` stage, built unscheduled and run."""
    knobs = ConvSchedule.default_for(shape)
    tensors = conv2d_compute(shape, layer.act, "ternary_group_scales", knobs)
    psum = next(t for t in _producers(tensors[-1]) if t.op.name == "psum")
    func = te.create_prim_func([*tensors[:-2], psum])
    kernel = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    out_w = knobs.padded_out_width(shape)
    dims = [int(d) for d in psum.shape]
    out = tvm.runtime.tensor(np.zeros(dims, np.float32))
    x = x_q * np.float32(layer.act.scale)
    arguments = [tvm.runtime.tensor(a) for a in [x, *kernel_arguments(layer, "bitplane")[:-1]]]
    kernel(*arguments, out)
    return out.numpy()[..., : shape.out_width] if out_w != shape.out_width else out.numpy()


def _producers(tensor: te.Tensor):
    seen, stack = [], [tensor]
    while stack:
        current = stack.pop()
        for parent in getattr(current.op, "input_tensors", []):
            if all(parent is not s for s in seen):
                seen.append(parent)
                stack.append(parent)
    return seen


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_kernels_match_reference_bit_for_bit(encoding):
    rng = np.random.default_rng(ENCODINGS.index(encoding))
    mismatches = []
    for case in range(SHAPES_PER_ENCODING):
        layer = random_layer(rng, encoding, dense=case % 7 == 0)
        x = random_input(rng, layer)
        expected = reference_forward(layer, torch.from_numpy(x)).numpy()
        epilogue, residual, expected = with_epilogue(rng, expected)
        actual = run_kernel(layer, x, epilogue=epilogue, residual=residual)
        if not np.array_equal(actual, expected):
            mismatches.append((case, layer.weight.shape, layer.group_size, layer.stride))
    assert not mismatches


@pytest.mark.parametrize(
    "knobs",
    [
        ConvSchedule("width", 16, 8),
        ConvSchedule("width", 8, 3, decode_once=False),
        ConvSchedule("channels", 16),
        ConvSchedule("channels", 16, decode_once=False),
    ],
)
def test_every_schedule_family_is_exact(knobs):
    rng = np.random.default_rng(7)
    for encoding in ENCODINGS:
        layer = random_layer(rng, encoding)
        x = random_input(rng, layer)
        expected = reference_forward(layer, torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(run_kernel(layer, x, knobs), expected)


def test_integer_part_of_bitplane_core_is_exact():
    rng = np.random.default_rng(11)
    for _ in range(30):
        layer = random_layer(rng, "ternary_group_scales")
        x = random_input(rng, layer)
        x_q = layer.act.quantize(torch.from_numpy(x)).numpy()
        shape = layer_shape(layer, x.shape)
        expected = reference_group_sums(x_q, layer.weight, shape)
        actual = compute_group_sums(layer, x_q, shape)
        np.testing.assert_array_equal(actual.astype(np.int64), expected)


def test_base3_storage_holds_five_weights_per_byte():
    rng = np.random.default_rng(3)
    ternary = rng.integers(-1, 2, (6, 13, 3, 3)).astype(np.int8)
    trits = pack_trits(ternary, group_size=4)  # 13 channels -> 16 -> 4 bytes
    assert trits.shape == (3, 3, 4, 6) and trits.dtype == np.uint8
    digits = (trits[..., None].astype(int) // 3 ** np.arange(5)) % 3 - 1  # [R, S, B, K, 5]
    decoded = digits.transpose(3, 2, 4, 0, 1).reshape(6, 20, 3, 3)
    np.testing.assert_array_equal(decoded[:, :13], ternary)
    assert not decoded[:, 13:].any()


# --- the integer dot cores (AVX-512 VNNI, AVX2) ---------------------------------------------

HOST = parse_target(host_target())
# (core, target it is built for): the AVX2 core also on a host with VNNI, built for Haswell
DOT_CORE_TARGETS = {
    "int8-dot-vnni": HOST,
    "int16-dot-avx2": parse_target("llvm -mcpu=haswell"),
}
DOT_CASES = [
    pytest.param(
        core,
        encoding,
        marks=pytest.mark.skipif(
            not instruction.available(HOST), reason=f"the host CPU has no {instruction.feature}"
        ),
    )
    for core, instruction in (("int8-dot-vnni", VNNI_DOT), ("int16-dot-avx2", AVX2_DOT))
    for encoding in ENCODINGS
]


@pytest.mark.parametrize(("core", "encoding"), DOT_CASES)
def test_dot_cores_match_reference_bit_for_bit(core, encoding):
    rng = np.random.default_rng(100 + ENCODINGS.index(encoding))
    mismatches = []
    for case in range(40):
        layouts = LAYOUTS[case % len(LAYOUTS)]
        layer = random_layer(rng, encoding, dense=case % 9 == 0, layouts=layouts)
        if encoding == "ternary_group_scales":
            layer = replace(layer, act=replace(layer.act, signed=False))
            group_sizes = [4, 16, 64] if core == "int8-dot-vnni" else [2, 4, 16, 64]
            layer = replace(layer, group_size=int(rng.choice(group_sizes)))
            layer = replace(layer, group_scale=_group_scales(rng, layer))
        x = random_input(rng, layer)
        shape = layer_shape(layer, as_image(x).shape)
        expected = reference_forward(layer, torch.from_numpy(x)).numpy()
        quantized_input, quantize = case % 4 == 1, _next_quantizer(rng) if case % 3 == 1 else None
        epilogue, residual, expected = with_epilogue(rng, expected, quantize)
        kernels = core_named(core).kernels(
            shape, layer.act, encoding, epilogue, layouts, quantized_input
        )
        given = layer.act.stored(x) if quantized_input else x
        actual = run_layer(kernels, layer, given, DOT_CORE_TARGETS[core], *residual)
        if not np.array_equal(actual, expected):
            mismatches.append((case, shape, layouts.name, quantized_input, quantize))
    assert not mismatches


needs_popcount = pytest.mark.skipif(
    not conv2d_popcount.available(HOST), reason="the host CPU has no AVX-512 VPOPCNTDQ"
)


@needs_popcount
@pytest.mark.parametrize("encoding", ENCODINGS[:2])
def test_popcount_core_matches_reference_bit_for_bit(encoding):
    rng = np.random.default_rng(200 + ENCODINGS.index(encoding))
    mismatches = []
    for case in range(30):
        layer = random_layer(rng, encoding, dense=case % 9 == 0)
        act = ActQuant(layer.act.scale, int(rng.integers(1, 5)), signed=False)
        layer = replace(layer, act=act, group_size=int(rng.choice([64, 128])))
        layer = _with_group_scales(rng, layer, encoding)
        x = random_input(rng, layer)
        shape = layer_shape(layer, as_image(x).shape)
        expected = reference_forward(layer, torch.from_numpy(x)).numpy()
        epilogue, residual, expected = with_epilogue(rng, expected)
        kernels = core_named("popcount-vpopcntdq").kernels(shape, layer.act, encoding, epilogue)
        actual = run_layer(kernels, layer, x, HOST, *residual)
        if not np.array_equal(actual, expected):
            mismatches.append((case, shape, act))
    assert not mismatches


def _with_group_scales(rng: np.random.Generator, layer: QuantizedLayer, encoding: str):
    """``layer`` with random scales for its (changed) group size."""
    if encoding == "ternary_group_scales":
        return replace(layer, group_scale=_group_scales(rng, layer))
    out_channels, channels, k_h, k_w = layer.weight.shape
    dims = (out_channels, -(-channels // layer.group_size), k_h, k_w)
    return replace(layer, group_scale_q=rng.integers(0, 128, dims).astype(np.int8))


def _next_quantizer(rng: np.random.Generator) -> ActQuant:
    """A random quantizer for the next layer's activation bytes."""
    return ActQuant(float(rng.uniform(0.01, 0.2)), int(rng.choice([4, 8])), bool(rng.integers(2)))


def _group_scales(rng: np.random.Generator, layer: QuantizedLayer) -> np.ndarray:
    out_channels, channels, k_h, k_w = layer.weight.shape
    groups = -(-channels // layer.group_size)
    return rng.uniform(0.001, 1.0, (out_channels, groups, k_h, k_w)).astype(np.float32)


def test_core_selection_rules():
    wide = Conv2dShape(1, 64, 28, 28, 64, (3, 3), padding=(1, 1), group_size=4)
    dense = Conv2dShape(1, 512, 1, 1, 10, group_size=512)
    unsigned, signed = ActQuant(0.1, 8, False), ActQuant(0.1, 8, True)
    vnni = parse_target("llvm -mcpu=cascadelake")
    avx2 = parse_target("llvm -mcpu=haswell")
    assert select_core(wide, unsigned, "int8", vnni) == "int8-dot-vnni"
    assert select_core(wide, unsigned, "ternary_int8_scales", vnni) == "int8-dot-vnni"
    assert select_core(wide, unsigned, "ternary_group_scales", vnni) == "int8-dot-vnni"
    odd_groups = replace(wide, group_size=3)
    assert select_core(odd_groups, unsigned, "ternary_group_scales", vnni) == "bitplane"
    assert select_core(wide, signed, "int8", vnni) == "int8-dot-vnni"
    assert select_core(wide, signed, "ternary_group_scales", vnni) == "bitplane"
    assert select_core(dense, unsigned, "int8", vnni) == "int8-dot-vnni"
    assert select_core(wide, unsigned, "int8", avx2) == "int16-dot-avx2"
    assert select_core(wide, unsigned, "ternary_group_scales", avx2) == "int16-dot-avx2"
    two_channel_groups = replace(wide, group_size=2)
    assert (
        select_core(two_channel_groups, unsigned, "ternary_group_scales", avx2) == "int16-dot-avx2"
    )
    assert select_core(two_channel_groups, unsigned, "ternary_group_scales", vnni) == "bitplane"
    assert select_core(odd_groups, unsigned, "ternary_group_scales", avx2) == "bitplane"
    assert select_core(wide, unsigned, "int8", parse_target("llvm -mcpu=nehalem")) == "bitplane"
    assert select_core(wide, unsigned, "int8", None) == "bitplane"
    knights_mill = parse_target("llvm -mcpu=knm")  # VPOPCNTDQ without VNNI
    words, four_bit = replace(wide, group_size=64), ActQuant(0.1, 4, False)
    for target, core in ((knights_mill, "popcount-vpopcntdq"), (vnni, "int8-dot-vnni")):
        assert select_core(words, four_bit, "ternary_int8_scales", target) == core
    assert select_core(words, unsigned, "ternary_int8_scales", knights_mill) == "int16-dot-avx2"
    assert select_core(wide, four_bit, "ternary_int8_scales", knights_mill) == "int16-dot-avx2"
    asymmetric = "ternary_asymmetric_int8_scales"  # one scale per group on the popcount core
    assert select_core(words, four_bit, asymmetric, knights_mill) == "int16-dot-avx2"
    assert select_core(words, four_bit, asymmetric, vnni) == "int8-dot-vnni"


# --- the GPU cores: their compute run on the CPU --------------------------------------------

GPU_CORE_OF = {encoding: "int8-gemm-cuda" for encoding in ENCODINGS[1:]}
GPU_CORE_OF["ternary_group_scales"] = "bitplane-cuda"


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_gpu_cores_compute_the_reference_on_the_cpu(encoding):
    """The GPU cores' PrimFuncs, built unscheduled for the CPU, give the reference's numbers
    (the GPU schedule only reorders the loops of this compute: checked on a GPU by
    benchmarks/gpu_check.sh)."""
    rng = np.random.default_rng(300 + ENCODINGS.index(encoding))
    cuda = parse_target("cuda -arch=sm_90")
    mismatches = []
    for case in range(8):
        layer = random_layer(rng, encoding, dense=case % 5 == 0)
        x = random_input(rng, layer)
        shape = layer_shape(layer, as_image(x).shape)
        core = select_core(shape, layer.act, encoding, cuda)
        assert core == GPU_CORE_OF[encoding]
        expected = reference_forward(layer, torch.from_numpy(x)).numpy()
        quantized_input = case % 4 == 1 and core == "int8-gemm-cuda"
        quantize = _next_quantizer(rng) if case % 3 == 1 and quantized_input else None
        epilogue, residual, expected = with_epilogue(rng, expected, quantize)
        layouts = core_named(core).layouts_for(PLAIN)  # NHWC on the GEMM core
        kernels = core_named(core).kernels(
            shape, layer.act, encoding, epilogue, layouts, quantized_input
        )
        given = layer.act.stored(x) if quantized_input else x
        actual = run_layer(kernels, layer, given, TARGET, *residual)
        if not np.array_equal(actual, expected):
            mismatches.append((case, shape, quantized_input, quantize))
    assert not mismatches

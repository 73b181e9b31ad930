"""AMX int8: the intrinsics in TIR (fgq_tvm/schedules/intrinsics_amx.py), the AMX core
(fgq_tvm/schedules/conv2d_amx.py) and the measured AMX peak of bench.

On any x86 CPU: the tile configuration, the NumPy reference of ``tdpbusd``, the code LLVM makes
of the intrinsics and of the core's kernels, the reasons the peak is not measured, and the
core's kernels bit for bit against ``reference_forward`` with the tiles emulated (the same loops
and operand addresses in plain code). Where the CPU has AMX, the same kernels on the tiles and
the peak's products (elsewhere those tests skip with a reason).
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import re

import numpy as np
import pytest
import torch
import tvm
from helpers import EmulatedAmxCore
from test_kernels import _next_quantizer, as_image, random_input, random_layer, with_epilogue

from fgq_tvm.bench.amx_peak import (
    ITERATIONS,
    _exact,
    amx_peak_kernel,
    amx_unavailable,
    measure_amx_peak,
)
from fgq_tvm.cpu_features import AMX_TILE_CORES, host_has, request_amx_tile_data
from fgq_tvm.quant.layers import ActQuant, reference_forward
from fgq_tvm.schedules import intrinsics_amx, select
from fgq_tvm.schedules.conv2d_amx import (
    AMX_CORE,
    AmxCore,
    AmxSchedule,
    TileGeometry,
    amx_conv2d_prim_func,
)
from fgq_tvm.schedules.conv2d_dot import VNNI_CORE
from fgq_tvm.schedules.core import Conv2dShape, Epilogue
from fgq_tvm.schedules.intrinsics_amx import (
    AMX_TILES,
    EMULATED_TILES,
    dot_reference,
    tile_configuration,
)
from fgq_tvm.schedules.kernel_spec import kernel_arguments, layer_shape
from fgq_tvm.schedules.layout import BLOCKED, NCHW, NCHW16C, PLAIN, Layouts
from fgq_tvm.target import host_target, parse_target

AMX_TARGET = parse_target("llvm -mcpu=sapphirerapids")
HAS_AMX = host_has("amx_tile", "amx_int8")
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="this CPU has no AMX int8 (amx_int8)")
INSTRUCTION = re.compile(
    r"^\s+(ldtilecfg|tilezero|tileloadd|tdpbusd|tilestored|tilerelease)\b(.*)$", re.M
)


def test_the_configuration_shapes_eight_full_tiles():
    config = tile_configuration()
    assert config.dtype == np.uint8 and config.shape == (64,)
    assert config[0] == 1  # palette 1
    column_bytes = config[16:32].view("<u2")
    assert list(column_bytes) == [64] * 8 and list(config[48:56]) == [16] * 8
    assert not config[1:16].any() and not config[56:].any()


def test_the_reference_reads_weights_in_words_of_four():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 64), dtype=np.uint8)
    b = rng.integers(-128, 128, (16, 64), dtype=np.int8)
    expected = np.zeros((16, 16), np.int64)
    for m in range(16):
        for n in range(16):
            expected[m, n] = sum(int(a[m, k]) * int(b[k // 4, 4 * n + k % 4]) for k in range(64))
    np.testing.assert_array_equal(dot_reference(a, b), expected)


def test_the_peak_kernel_is_four_products_per_round_on_each_thread():
    built = tvm.compile(tvm.IRModule({"amx_peak": amx_peak_kernel(2, 3)}), AMX_TARGET)
    found = INSTRUCTION.findall(built.mod.inspect_source("s"))
    counts = collections.Counter(name for name, _ in found)
    assert counts == {"ldtilecfg": 1, "tilezero": 4, "tileloadd": 4, "tdpbusd": 12,
                      "tilestored": 4, "tilerelease": 1}  # fmt: skip
    products = {operands.strip() for name, operands in found if name == "tdpbusd"}
    # AT&T order: weights, activations, accumulator
    assert products == {
        "%tmm6, %tmm4, %tmm0", "%tmm7, %tmm4, %tmm1", "%tmm6, %tmm5, %tmm2", "%tmm7, %tmm5, %tmm3"
    }  # fmt: skip


def test_tile_numbers_are_those_of_the_eight_tiles():
    with pytest.raises(ValueError, match="tiles 0 to 7, not 8"):
        intrinsics_amx.dot_tiles(8, 4, 6)


def test_wrong_products_are_no_peak():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 3, (2, 16, 64), dtype=np.uint8)
    b = rng.integers(-1, 2, (2, 16, 64), dtype=np.int8)
    c = np.stack([5 * dot_reference(a[j // 2], b[j % 2]) for j in range(4)])[None].repeat(2, 0)
    assert _exact(c, a, b, 5)
    c[1, 3, 15, 15] += 1
    assert not _exact(c, a, b, 5)


def test_the_peak_says_why_it_was_not_measured():
    assert amx_unavailable(parse_target("llvm -mcpu=icelake-server")) == (
        "the target has no AMX int8"
    )
    peak, why = measure_amx_peak(parse_target("llvm -mcpu=znver4"), 2, 3)
    assert peak is None and why == "not measured: the target has no AMX int8"
    if not HAS_AMX:
        assert amx_unavailable(AMX_TARGET) == "this CPU has no AMX int8"


@pytest.mark.skipif(HAS_AMX, reason="this CPU has AMX")
def test_linux_refuses_the_tile_state_to_a_cpu_without_amx():
    with pytest.raises(OSError) as error:
        request_amx_tile_data()
    assert error.value.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)
    assert "ARCH_REQ_XCOMP_PERM" in str(error.value) or error.value.errno == errno.ENOSYS


@needs_amx
def test_the_peak_kernel_multiplies_exactly_and_reports_a_rate():
    request_amx_tile_data()
    target = parse_target(host_target())
    peak, how = measure_amx_peak(target, 2, 3, iterations=ITERATIONS // 100)
    assert how.startswith("measured (tdpbusd into 4 tiles on 2 threads"), how
    assert peak > 0


# --- the AMX core ---------------------------------------------------------------------------

INTEGER_ENCODINGS = ("ternary_int8_scales", "ternary_asymmetric_int8_scales", "int8")
LAYOUTS = (PLAIN, BLOCKED, Layouts(NCHW, NCHW16C))


def test_the_amx_core_takes_integer_layers_of_whole_64_channel_blocks_on_amx_targets():
    act = ActQuant(0.1, 8, False)
    conv = Conv2dShape(1, 128, 14, 14, 64, (3, 3), padding=(1, 1), group_size=4)
    for encoding in INTEGER_ENCODINGS:
        assert AMX_CORE.supports(conv, act, encoding)
    assert not AMX_CORE.supports(conv, act, "ternary_group_scales")
    stem = Conv2dShape(1, 3, 224, 224, 64, (7, 7), (2, 2), (3, 3))
    dense = Conv2dShape(1, 2048, 1, 1, 1000)
    assert not AMX_CORE.supports(stem, act, "int8") and not AMX_CORE.supports(dense, act, "int8")
    assert AMX_CORE.available(AMX_TARGET)
    assert not AMX_CORE.available(parse_target("llvm -mcpu=icelake-server"))
    assert AMX_CORE.layouts == VNNI_CORE.layouts and AMX_CORE.activation_bytes
    assert AMX_CORE.name in AMX_TILE_CORES  # its modules ask for the tile state at load


def tile_instructions(func: tvm.tirx.PrimFunc) -> list[tuple[str, str]]:
    """The tile instructions of ``func`` built for Sapphire Rapids: (name, operands)."""
    built = tvm.compile(tvm.IRModule({"main": func}), AMX_TARGET)
    return [(name, operands.strip()) for name, operands in INSTRUCTION.findall(
        built.mod.inspect_source("s"))]  # fmt: skip


def test_the_amx_core_builds_to_tile_instructions():
    """A 3x3 layer 56 wide in blocks of 2 x 2 tiles: per block, 9 kernel positions of two
    activation and two weight tiles loaded and four products, the accumulators staying in
    tmm0-tmm3 from their zeroing to their store."""
    shape = Conv2dShape(1, 64, 56, 56, 64, (3, 3), padding=(1, 1), group_size=4)
    assert AmxSchedule.default_for(shape) == AmxSchedule(2, 2)
    epilogue = Epilogue(relu=True, quantize=ActQuant(0.2, 8, False))
    kernels = AMX_CORE.kernels(shape, ActQuant(0.1, 8, False), "ternary_int8_scales", epilogue,
                               BLOCKED, quantized_input=True)  # fmt: skip
    found = tile_instructions(kernels.layer)
    counts = collections.Counter(name for name, _ in found)
    assert (
        counts["ldtilecfg"] >= 1
        and counts["tilezero"] == counts["tilestored"] == 4 * counts["ldtilecfg"]
    )
    assert counts["tdpbusd"] == counts["tileloadd"] == 9 * 4 * counts["ldtilecfg"]
    products = {operands for name, operands in found if name == "tdpbusd"}
    assert products == {"%tmm6, %tmm4, %tmm0", "%tmm7, %tmm4, %tmm1", "%tmm6, %tmm5, %tmm2",
                        "%tmm7, %tmm5, %tmm3"}  # fmt: skip
    stored = {operands.split(",")[0] for name, operands in found if name == "tilestored"}
    assert stored == {"%tmm0", "%tmm1", "%tmm2", "%tmm3"}


def test_tiles_spanning_rows_build_to_tile_instructions():
    """A 7x7 layer: its sums in memory for the output stage (one group of all rows), stored by
    the same four accumulator tiles."""
    shape = Conv2dShape(1, 512, 7, 7, 512, (3, 3), padding=(1, 1), group_size=4)
    assert TileGeometry.of(shape).groups == 1 and AmxSchedule.default_for(shape) == AmxSchedule(
        2, 2
    )
    kernels = AMX_CORE.kernels(shape, ActQuant(0.1, 8, False), "int8", Epilogue(relu=True), BLOCKED)
    found = tile_instructions(kernels.layer)
    counts = collections.Counter(name for name, _ in found)
    assert counts["tilezero"] == counts["tilestored"] == 4
    assert counts["tdpbusd"] == counts["tileloadd"] > 0  # four loads per four products
    stored = {operands.split(",")[0] for name, operands in found if name == "tilestored"}
    assert stored == {"%tmm0", "%tmm1", "%tmm2", "%tmm3"}


@pytest.mark.parametrize("knobs", [AmxSchedule(1, 1), AmxSchedule(2, 1), AmxSchedule(1, 2)])
def test_smaller_blocks_use_fewer_tiles(knobs):
    shape = Conv2dShape(1, 64, 28, 28, 64, (1, 1), group_size=4)
    func = amx_conv2d_prim_func(shape, ActQuant(0.1, 8, False), "int8", knobs)
    found = tile_instructions(func)
    accumulators = {
        operands.split(",")[-1].strip() for name, operands in found if name == "tdpbusd"
    }
    assert accumulators == {f"%tmm{t}" for t in range(knobs.accumulators)}
    loaded = {operands.split(",")[-1].strip() for name, operands in found if name == "tileloadd"}
    activations = {f"%tmm{4 + i}" for i in range(knobs.row_tiles)}
    assert loaded == activations | {f"%tmm{6 + j}" for j in range(knobs.channel_tiles)}


def test_outputs_narrower_than_a_tile_share_tiles_across_rows():
    """A 7x7 output in tiles of 16 columns per row would compute 112 positions for 49; over
    all rows, the padded input 9 wide, 64. Wide outputs keep a group per row."""
    small = TileGeometry.of(Conv2dShape(1, 512, 7, 7, 512, (3, 3), padding=(1, 1)))
    assert small == TileGeometry(pitch=9, group_rows=7, groups=1, positions=64, length=64 + 20)
    pointwise = TileGeometry.of(Conv2dShape(1, 2048, 7, 7, 512))
    assert (pointwise.pitch, pointwise.positions) == (7, 64)  # 49 positions, no padding
    wide = TileGeometry.of(Conv2dShape(1, 64, 56, 56, 64, (3, 3), padding=(1, 1)))
    assert (wide.pitch, wide.group_rows, wide.groups, wide.positions) == (58, 1, 56, 64)
    down = TileGeometry.of(Conv2dShape(1, 256, 56, 56, 512, stride=(2, 2)))
    assert (down.pitch, down.group_rows, down.positions) == (28, 1, 32)


def test_blocks_divide_the_tiles_of_a_layer():
    def choices(width, channels):
        shape = Conv2dShape(1, 64, width, width, channels, (3, 3), padding=(1, 1))
        return {(k.row_tiles, k.channel_tiles) for k in AmxSchedule.choices_for(shape)}

    assert choices(56, 64) == {(1, 1), (1, 2), (2, 1), (2, 2)}  # 4 column tiles, 4 blocks
    assert choices(16, 64) == {(1, 1), (1, 2)}  # one column tile per row
    assert choices(14, 64) == {(1, 1), (1, 2), (2, 1), (2, 2)}  # 14 tiles over all rows
    assert choices(56, 48) == {(1, 1), (2, 1)}  # three channel blocks
    with pytest.raises(ValueError, match="1 to 2 of each"):
        EMULATED_TILES.block(3, 1)


def every_block(shape: Conv2dShape) -> tuple[AmxSchedule, ...]:
    """The layer's blocks, the largest first (its default)."""
    return tuple(sorted(AmxSchedule.choices_for(shape), key=lambda k: -k.accumulators))


def test_the_design_space_is_one_schedule_per_block_and_each_replays():
    """MetaSchedule searches the blocks as separate spaces; a record's trace, replayed on the
    workload (as compiling with tuning records does), gives that block's kernel."""
    shape = Conv2dShape(1, 64, 28, 28, 64, (3, 3), padding=(1, 1), group_size=4)
    act, core = ActQuant(0.1, 8, False), AmxCore(EMULATED_TILES)
    assert core.tunable
    workload = core.workload(shape, act, "int8", Epilogue(), PLAIN, False)
    spaces = core.schedule(tvm.s_tir.Schedule(workload))
    assert len(spaces) == len(AmxSchedule.choices_for(shape)) == 4
    for space, knobs in zip(spaces, AmxSchedule.choices_for(shape), strict=True):
        replayed = tvm.s_tir.Schedule(workload)
        space.trace.apply_to_schedule(replayed, remove_postproc=False)
        expected = amx_conv2d_prim_func(shape, act, "int8", knobs, tiles=EMULATED_TILES)
        tvm.ir.assert_structural_equal(replayed.mod["main"], expected)


def amx_core_mismatches(core: AmxCore, encoding: str, cases: int, target) -> list:
    """Random layers of ``encoding`` on ``core`` against ``reference_forward``: layouts,
    epilogues, byte input and output, signed activations, strides, padding, dilation, outputs
    narrower and wider than a tile, every block of tiles the layer allows in turn."""
    rng = np.random.default_rng(400 + INTEGER_ENCODINGS.index(encoding))
    mismatches = []
    for case in range(cases):
        layouts = LAYOUTS[case % len(LAYOUTS)]
        layer = random_layer(rng, encoding, layouts=layouts, channel_multiple=64)
        x = random_input(rng, layer)
        shape = layer_shape(layer, as_image(x).shape)
        expected = reference_forward(layer, torch.from_numpy(x)).numpy()
        quantized_input, quantize = case % 4 == 1, _next_quantizer(rng) if case % 3 == 1 else None
        epilogue, residual, expected = with_epilogue(rng, expected, quantize)
        kernels = core.kernels(shape, layer.act, encoding, epilogue, layouts, quantized_input)
        knobs = every_block(shape)[case % len(every_block(shape))]
        layer_func = amx_conv2d_prim_func(
            shape, layer.act, encoding, knobs, epilogue, layouts, quantized_input, core.tiles
        )
        kernels = dataclasses.replace(kernels, layer=layer_func)
        stored = kernel_arguments(layer, VNNI_CORE.name)  # the dot core's pack, arguments
        given = layer.act.stored(x) if quantized_input else x
        actual = select.build_layer(kernels, stored, target)(as_image(given), *residual)
        if not np.array_equal(actual, expected):
            mismatches.append((case, shape, knobs, layouts.name, quantized_input, quantize))
    return mismatches


@pytest.mark.parametrize("encoding", INTEGER_ENCODINGS)
def test_the_amx_core_computes_the_reference_with_emulated_tiles(encoding):
    core = AmxCore(EMULATED_TILES)
    assert not amx_core_mismatches(core, encoding, 10, parse_target(host_target()))


@needs_amx
@pytest.mark.parametrize("encoding", INTEGER_ENCODINGS)
def test_the_amx_core_computes_the_reference_on_the_tiles(encoding):
    request_amx_tile_data()
    core = AmxCore(AMX_TILES)
    assert not amx_core_mismatches(core, encoding, 10, parse_target(host_target()))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("core", "images"),
    [
        pytest.param(EmulatedAmxCore(), 100, id="emulated"),  # plain code: slow
        pytest.param(AMX_CORE, None, id="amx", marks=needs_amx),  # the whole eval split
    ],
)
def test_a_network_with_amx_layers_matches_the_reference(core, images, tmp_path, monkeypatch):
    """The pretrained CIFAR ResNet-20, int8 group scales: its 64-channel layers on the AMX core
    first in the list of cores, the others on the host's, activations passed between them (on
    the tiles, the module asks Linux for the tile state when it is loaded): logits close on
    every image, the same top-1 on at least 99.9% (as the end-to-end test of the host's
    cores)."""
    from test_end_to_end import compare, compile_and_load

    from fgq_tvm.data import data_dir, load_npz_split
    from fgq_tvm.runtime import sidecar_path

    monkeypatch.setattr(select, "CORES", (core, *select.CORES))
    weights = data_dir() / "cifar_resnet" / "resnet20-12fca82f.th"
    npz = data_dir() / "cifar10" / "cifar10_test_jpeg.npz"
    compiled, reference, spec = compile_and_load(
        "cifar_resnet20", tmp_path, weights=str(weights), calib=str(npz), batch=50, scales="int8"
    )
    layers = json.loads(sidecar_path(tmp_path / "m.so").read_text())["layers"]
    on_amx = [layer["name"] for layer in layers if layer["core"] == core.name]
    assert on_amx == [f"layer3.{block}.conv{conv}" for block in range(3) for conv in (1, 2)][1:]
    images, _ = load_npz_split(npz, "eval", spec, limit=images)
    close, same_top1 = compare(compiled, reference, images, 50)
    assert close == 1.0 and same_top1 >= 0.999

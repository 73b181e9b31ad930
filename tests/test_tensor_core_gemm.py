"""The tensor-core schedule of the GPU GEMM core: its knobs, and that it builds to ldmatrix and
mma.sync code for every kind of layer, which nvcc compiles without local memory (its numbers are
checked on a GPU by benchmarks/gpu_check.py; the compute it schedules is checked on the CPU in
test_kernels)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import replace

import pytest
import tvm
from tvm import te
from tvm.s_tir import Schedule

from fgq_tvm.cuda_binary import NVCC_OPTIONS
from fgq_tvm.quant.layers import ActQuant
from fgq_tvm.schedules.conv2d_cuda import GEMM_CUDA_CORE, gemm_extents
from fgq_tvm.schedules.core import Conv2dShape, Epilogue
from fgq_tvm.schedules.cuda_pipeline import cuda_tir_pipeline
from fgq_tvm.schedules.gpu_rules import schedule_for_gpu
from fgq_tvm.schedules.layout import CHANNELS_LAST
from fgq_tvm.schedules.tensor_core_gemm import (
    SHARED_MEMORY,
    GemmTiles,
    TensorCoreGemm,
    default_tiles,
    padded_extents,
    schedule_tensor_core_gemm,
    tile_candidates,
)
from fgq_tvm.target import parse_target

UNSIGNED = ActQuant(0.05, 8, False)
SIGNED = ActQuant(0.05, 8, True)
CUDA = parse_target("cuda -arch=sm_80")
RESNET50_BATCH1 = [  # (M, N, K) of ResNet-50's layers at batch 1, unpadded
    (12544, 64, 147), (3136, 64, 64), (3136, 64, 576), (3136, 256, 64), (784, 128, 1152),
    (784, 512, 128), (196, 256, 2304), (196, 1024, 256), (49, 512, 4608), (49, 2048, 512),
    (1, 1000, 2048),
]  # fmt: skip


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_default_tiles_divide_and_fit_every_resnet50_gemm(batch):
    for m, n, k in RESNET50_BATCH1:
        padded = padded_extents(m * batch, n, k)
        tiles = default_tiles(*padded)
        tiles.check(*padded)  # raises if they do not divide or fit
        assert tiles.shared_bytes <= SHARED_MEMORY
        assert all(p >= e and p % 32 == 0 for p, e in zip(padded, (m * batch, n, k), strict=True))


@pytest.mark.parametrize("batch", [1, 64])
def test_the_search_space_holds_the_default_and_only_tiles_that_fit(batch):
    for m, n, k in RESNET50_BATCH1:
        padded = padded_extents(m * batch, n, k)
        candidates = tile_candidates(*padded)
        assert default_tiles(*padded) in candidates
        for tiles in candidates:
            tiles.check(*padded)
            assert tiles.block_m * tiles.block_n // tiles.threads <= 64
        assert len(set(candidates)) == len(candidates) > 10


def test_big_gemms_get_big_tiles_and_small_ones_enough_blocks():
    assert default_tiles(200704, 256, 576) == GemmTiles(128, 64, 2, 2, 2)
    small = default_tiles(64, 512, 4608)
    assert (64 // small.block_m) * (512 // small.block_n) >= 16


def test_tiles_that_do_not_fit_say_why():
    with pytest.raises(ValueError, match="blocks do not divide 96 x 64"):
        GemmTiles(64, 64).check(96, 64, 64)
    with pytest.raises(ValueError, match="steps of 32 do not divide K 96"):
        GemmTiles(32, 32, 1, 1, 2).check(64, 64, 96)
    with pytest.raises(ValueError, match="warp tiles .* no multiples of 16"):
        GemmTiles(32, 32, 4, 1, 1).check(64, 64, 64)
    with pytest.raises(ValueError, match="bytes of shared memory"):
        GemmTiles(256, 128, 4, 4, 1).check(256, 128, 128)
    with pytest.raises(ValueError, match="4 stages are none of"):
        GemmTiles(32, 32, 1, 1, 1, 4).check(64, 64, 256)
    with pytest.raises(ValueError, match="3 stages exceed K 64's copies"):
        GemmTiles(32, 32, 1, 1, 1, 3).check(64, 64, 64)


def test_stages_hold_a_slice_of_both_operands_each_and_the_accumulators_reuse_them():
    row = 2 * 32 + 16  # two steps of 32 bytes, and the padding against bank conflicts
    for stages in (1, 2, 3):
        tiles = GemmTiles(128, 64, 2, 2, 2, stages)
        assert tiles.shared_bytes == max((128 + 64) * row * stages, 128 * 64 * 4)
    assert {tiles.stages for tiles in tile_candidates(*padded_extents(3136, 64, 576))} == {1, 2, 3}


LAYERS = [  # shape, epilogue, whether the input holds activation bytes
    (Conv2dShape(1, 64, 7, 7, 128, (3, 3), padding=(1, 1)), Epilogue(True, True, UNSIGNED), True),
    (Conv2dShape(2, 3, 17, 17, 24, (7, 7), (2, 2), (3, 3)), Epilogue(relu=True), False),
    (Conv2dShape(1, 512, 1, 1, 10), Epilogue(), True),
    (Conv2dShape(4, 96, 9, 9, 48, (1, 1), (2, 2)), Epilogue(quantize=UNSIGNED), True),
    (Conv2dShape(4, 48, 5, 5, 48), Epilogue(relu=True), True),  # K 48, padded to 64
]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("case", range(len(LAYERS)))
def test_gemm_layers_build_on_the_tensor_cores(case, tmp_path):
    shape, epilogue, quantized_input = LAYERS[case]
    kernels = _layer_kernels(case)
    scheduled = schedule_for_gpu(tvm.IRModule({"main": kernels.layer}), CUDA)
    source = _cuda_source(scheduled)
    assert source.count("ldmatrix") >= 2 and "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8" in source
    kernels_defined = set(re.findall(r"__global__ void .*? (\w+)\(", source))
    assert len(kernels_defined) == 1  # the epilogue runs beside the products
    nhwc = (shape.batch, shape.out_height, shape.out_width, shape.out_channels)
    assert kernels.output[0] == nhwc
    if quantized_input:  # vectors of 16 bytes of one pixel's channels (8 where the tile is small)
        assert re.search(r"= \*\(uint[24]\*\)\(x_ptr", source)
    stack, spill_stores, spill_loads = _local_memory(source, tmp_path)
    assert stack == spill_stores == spill_loads == 0  # the fragments stay in registers
    assert "cp.async" not in source  # one stage: nothing to copy ahead
    tiles = default_tiles(*padded_extents(*gemm_extents(shape)))
    _assert_merged_shared_memory(scheduled, source, tiles)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize(
    ("case", "act", "stages"),
    [(0, SIGNED, 2), (0, UNSIGNED, 3), (1, UNSIGNED, 2), (2, UNSIGNED, 3), (3, UNSIGNED, 2)],
)
def test_pipelined_stages_copy_both_operands_ahead_with_cp_async(case, act, stages, tmp_path):
    kernels = _layer_kernels(case, act)
    sch = Schedule(kernels.layer)
    extents = padded_extents(*gemm_extents(LAYERS[case][0]))
    tiles = replace(default_tiles(*extents), k_steps=1, stages=stages)
    schedule_tensor_core_gemm(sch, tiles)
    source = _cuda_source(sch.mod)
    found = re.findall(r"ptx_cp_async_legacy_(\w+?)_1_1\(buf_dyn_shmem_ptr, [^,]+, (\w+)", source)
    copies = {operand: kind for kind, operand in found}  # the copies from x and from wgemm
    assert copies["wgemm_ptr"] in ("cg_16", "ca_8", "ca_4")  # the weights, unconditionally
    if case == 1:  # float32 input, quantized in the copy
        assert "x_ptr" not in copies
    elif case == 0 and act.signed:  # padded with the byte 128, which cp.async cannot fill
        assert "x_ptr" not in copies and "= condval" in source
    elif case == 0:  # activation bytes, zero-filled where the window leaves the image
        assert copies["x_ptr"].startswith("pred_")
    else:  # 1x1 windows: nothing to pad
        assert not copies["x_ptr"].startswith("pred_")
    assert f"cp.async.wait_group {stages - 2};" in source
    _assert_merged_shared_memory(sch.mod, source, tiles)
    stack, spill_stores, spill_loads = _local_memory(source, tmp_path)
    assert stack == spill_stores == spill_loads == 0


def _assert_merged_shared_memory(mod: tvm.IRModule, source: str, tiles: GemmTiles) -> None:
    """One dynamic shared allocation of ``tiles.shared_bytes``; a barrier between the last
    products (reading operand slices) and the accumulator tile's store over them; no barrier
    repeated."""
    assert re.findall(r"__shared__ .*\[(\d*)\]", source) == [""]  # its size: at the launch
    lower = tvm.tirx.get_tir_pipeline(cuda_tir_pipeline())[0]
    with CUDA:
        lowered = lower(tvm.tirx.transform.BindTarget(CUDA)(mod)).script()
    launch = r"T\.int64\((\d+)\), launch_params=\[[^]]*tirx\.use_dyn_shared_memory"
    assert re.findall(launch, lowered) == [str(tiles.shared_bytes)]
    after_products = source[source.rindex("mma.sync") :]
    assert "__syncthreads" in after_products[: after_products.index("for (int local_id")]
    assert not re.search(r"__syncthreads\(\);\s*__syncthreads\(\);", source)


def _layer_kernels(case: int, act: ActQuant | None = None):
    """The kernels of ``LAYERS[case]``; by default the first reads signed activations (its
    padding is the byte 128), the others unsigned ones (the byte 0)."""
    shape, epilogue, quantized_input = LAYERS[case]
    act = act or (SIGNED if case == 0 else UNSIGNED)
    return GEMM_CUDA_CORE.kernels(
        shape, act, "ternary_int8_scales", epilogue, CHANNELS_LAST, quantized_input
    )


def _cuda_source(mod: tvm.IRModule) -> str:
    with CUDA:
        built = tvm.compile(mod, target=CUDA, tir_pipeline=cuda_tir_pipeline())
    return built.mod.imports[0].inspect_source()


def _local_memory(source: str, folder) -> tuple[int, ...]:
    """The bytes of stack frame, spill stores and spill loads ptxas reports for ``source``."""
    path = folder / "kernel.cu"
    path.write_text(source)
    command = ["nvcc", "--cubin", *NVCC_OPTIONS, "-arch=sm_90", "-Xptxas", "-v", str(path)]
    report = subprocess.run(
        [*command, "-o", str(folder / "kernel.cubin")], capture_output=True, text=True, check=True
    ).stderr
    found = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", report
    )
    assert found, report
    return tuple(int(number) for number in found.groups())


def test_the_rule_leaves_other_prim_funcs_alone():
    x = te.placeholder((64, 64), "int8", name="x")
    plain = te.create_prim_func([x, te.compute((64, 64), lambda i, j: x[i, j] + 1, name="y")])
    assert TensorCoreGemm().apply(plain, CUDA, False) is None

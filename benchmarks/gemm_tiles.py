"""A tile search for the GPU GEMM core, measured on the GPU by ``gpu_check``.

Which :class:`~fgq_tvm.schedules.tensor_core_gemm.GemmTiles` run ResNet-50's convolutions
fastest on a given GPU is a question for that GPU. ``gpu_check prepare`` calls :func:`prepare`
here (with fgq-tvm and TVM): for each layer of :data:`LAYERS` at batch 1 and 64, the layer's
kernel (bias, ReLU and the next layer's quantization in its epilogue, activation bytes in and
out) scheduled with the default tiles, with them pipelined over 2 and 3 stages, and with others
from :func:`~fgq_tvm.schedules.tensor_core_gemm.tile_candidates` (:data:`PROBES` first),
:data:`VARIANTS` at most, all in one module per layer and batch, compiled by nvcc, and a
manifest of their arguments.

``gpu_check run`` calls :func:`run` there (the TVM runtime and PyTorch), in a process of its
own that a failing variant ends (the next one goes on from the next layer): random arguments on
the GPU, every variant of a layer run on the same ones (their outputs must be identical: they
compute the same integers in another order), each timed (median of :data:`REPEATS` runs after
:data:`WARMUP`), with its rate in int8 tera-operations per second (2 per multiply-add of the
unpadded GEMM) and its time against the default's. :func:`table` is the Markdown of the rows.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import astuple, replace
from pathlib import Path

MANIFEST = "gemm_tiles.json"
BATCHES = (1, 64)
VARIANTS = 10
WARMUP, REPEATS = 3, 20
# ResNet-50's heaviest kinds of convolution: (name, in channels, size, out channels, kernel,
# stride), and its classifier as a 1x1 conv on a 1x1 input
LAYERS = (
    ("layer1_3x3", 64, 56, 64, 3, 1),
    ("layer1_1x1_expand", 64, 56, 256, 1, 1),
    ("layer2_3x3", 128, 28, 128, 3, 1),
    ("layer3_3x3", 256, 14, 256, 3, 1),
    ("layer3_1x1_reduce", 1024, 14, 256, 1, 1),
    ("layer4_3x3", 512, 7, 512, 3, 1),
    ("layer4_1x1_expand", 512, 7, 2048, 1, 1),
    ("fc", 2048, 1, 1000, 1, 1),
)
PROBES = (  # (block_m, block_n, warps_m, warps_n, k_steps, stages), tried where they fit
    (128, 128, 2, 4, 2, 2), (256, 64, 4, 2, 2, 2), (128, 64, 2, 2, 2, 3), (64, 128, 2, 2, 2, 2),
    (64, 64, 2, 2, 4, 3), (32, 64, 1, 2, 4, 2), (32, 32, 1, 1, 4, 2),
)  # fmt: skip


# --- prepare (here: fgq-tvm and TVM) ---------------------------------------------------------


def prepare(out: Path, target_text: str = "cuda") -> None:
    """Build the variants of every layer of :data:`LAYERS` at every batch of :data:`BATCHES`
    into ``out`` (one module each) and write the manifest."""
    from fgq_tvm.target import parse_target

    target = parse_target(target_text)
    out.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, channels, size, out_channels, kernel, stride in LAYERS:
        for batch in BATCHES:
            entry = _build_layer(out, target, f"{name}_b{batch}", batch, channels, size,
                                 out_channels, kernel, stride)  # fmt: skip
            manifest.append(entry)
            print(f"gemm tiles: built {entry['module']} ({len(entry['variants'])} variants)",
                  flush=True)  # fmt: skip
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _build_layer(out: Path, target, label: str, batch, channels, size, out_channels, kernel,
                 stride) -> dict:  # fmt: skip
    import tvm
    from tvm.s_tir import Schedule

    from fgq_tvm.cuda_binary import compiling_cuda_with_nvcc
    from fgq_tvm.quant.layers import ActQuant
    from fgq_tvm.schedules.conv2d_cuda import gemm_conv2d_prim_func, gemm_extents
    from fgq_tvm.schedules.core import Conv2dShape, Epilogue
    from fgq_tvm.schedules.cuda_pipeline import cuda_tir_pipeline
    from fgq_tvm.schedules.tensor_core_gemm import (
        default_tiles,
        padded_extents,
        schedule_tensor_core_gemm,
        tile_candidates,
    )

    act = ActQuant(0.05, 8, False)
    padding = (kernel // 2, kernel // 2)
    shape = Conv2dShape(batch, channels, size, size, out_channels, (kernel, kernel),
                        (stride, stride), padding)  # fmt: skip
    func = gemm_conv2d_prim_func(shape, act, "ternary_int8_scales", Epilogue(True, True, act), True)
    pixels, channels_out, depth = gemm_extents(shape)
    extents = padded_extents(pixels, channels_out, depth)
    chosen = _variants(default_tiles(*extents), tile_candidates(*extents))
    functions = {}
    for tiles in chosen:
        sch = Schedule(func)
        schedule_tensor_core_gemm(sch, tiles)
        symbol = _symbol(tiles)
        functions[symbol] = sch.mod["main"].with_attr("global_symbol", symbol)
    with target, compiling_cuda_with_nvcc(str(target.attrs["arch"])):
        library = tvm.compile(tvm.IRModule(functions), target=target,
                              tir_pipeline=cuda_tir_pipeline())  # fmt: skip
    module = f"gemm_{label}.so"
    library.export_library(str(out / module))
    arguments = [(tuple(int(d) for d in p.ty.shape), str(p.ty.dtype)) for p in func.params]
    return {
        "layer": label, "module": module, "arguments": arguments, "arch": target.attrs["arch"],
        "macs": pixels * channels_out * depth,
        "variants": [_symbol(tiles) for tiles in chosen],
    }  # fmt: skip


def _variants(default, candidates: list) -> list:
    """The default tiles, then the candidates that differ from them only in their stages,
    then the :data:`PROBES` among ``candidates`` (in that order), then others spread over the list:
    :data:`VARIANTS` at most."""
    pipelined = [t for t in candidates if replace(t, stages=default.stages) == default]
    probes = [tiles for knobs in PROBES for tiles in candidates if astuple(tiles) == knobs]
    others = candidates[:: max(1, len(candidates) // VARIANTS)]
    chosen = [default]
    for tiles in (*pipelined, *probes, *others):
        if len(chosen) < VARIANTS and tiles not in chosen:
            chosen.append(tiles)
    return chosen


def _symbol(tiles) -> str:
    """``t128x64_w2x2_k2_s1``: the function of one variant."""
    m, n, warps_m, warps_n, steps, stages = astuple(tiles)
    return f"t{m}x{n}_w{warps_m}x{warps_n}_k{steps}_s{stages}"


# --- run (there: the TVM runtime and PyTorch) ------------------------------------------------


def run(folder: Path, start: int = 0, write=print) -> None:
    """Check and time on GPU 0 the variants of the manifest's layers in ``folder`` from the
    ``start``-th on, handing each layer's rows to ``write`` as they are done (a layer whose
    variants disagree has ``"agrees": False`` on the others).

    Raises
    ------
    VariantFault
        A variant failed (its row, and the layer's before it, written): the GPU context may be
        unusable, so the caller goes on in a new process from the next layer.
    """
    import torch

    from fgq_tvm import gpu_runtime, runtime

    ffi = runtime.tvm_ffi_runtime()
    manifest = json.loads((folder / MANIFEST).read_text())
    for entry in manifest[start:]:
        path = folder / entry["module"]
        gpu_runtime.open_gpu(path, entry["arch"], runtime.runtime_library(), ffi)
        module = ffi.load_module(str(path))
        generator = torch.Generator(device="cuda").manual_seed(0)
        tensors = [_random(shape, dtype, generator) for shape, dtype in entry["arguments"]]
        rows, outputs = [], {}
        for symbol in entry["variants"]:
            row = {"layer": entry["layer"], "tiles": symbol}
            try:
                milliseconds = _median_ms(_caller(module[symbol], tensors, ffi))
            except Exception as error:  # a launch or the kernel failed: the GPU may be unusable
                write([*_compared(rows, outputs), {**row, "error": _first_line(error)}])
                raise VariantFault(f"{entry['layer']} {symbol}: {_first_line(error)}") from error
            outputs[symbol] = tensors[-1].clone()
            rows.append({**row, "ms": milliseconds, "tops": 2 * entry["macs"] / milliseconds / 1e9})
        write(_compared(rows, outputs))


def _compared(rows: list[dict], outputs: dict) -> list[dict]:
    """``rows`` (timed variants of one layer, the default first) with whether each one's
    output equals the default's and its time against the default's."""
    import torch

    first = rows[0] if rows else None
    return [
        {**row, "agrees": bool(torch.equal(outputs[row["tiles"]], outputs[first["tiles"]])),
         "vs_default": row["ms"] / first["ms"]}
        for row in rows
    ]  # fmt: skip


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class VariantFault(RuntimeError):
    """A variant's launch or kernel failed on the GPU."""


def _random(shape, dtype: str, generator):
    """A random argument on the GPU: bytes and weights over their ranges, small scales."""
    import torch

    shape = tuple(shape)
    if dtype == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda", generator=generator)
    if dtype == "int8":
        return torch.randint(-3, 4, shape, dtype=torch.int8, device="cuda", generator=generator)
    if dtype == "int32":
        return torch.randint(-1000, 1000, shape, dtype=torch.int32, device="cuda",
                             generator=generator)  # fmt: skip
    return torch.rand(shape, device="cuda", generator=generator) * 1e-3


def _caller(function, tensors, ffi):
    """A call of ``function`` on ``tensors`` (read in place) that waits for the GPU."""
    import torch

    arguments = [ffi.from_dlpack(tensor) for tensor in tensors]

    def call():
        function(*arguments)
        torch.cuda.synchronize()

    return call


def _median_ms(call) -> float:
    for _ in range(WARMUP):
        call()
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def table(rows: list[dict]) -> list[str]:
    """The rows as Markdown lines."""
    lines = [
        "| layer | tiles (block, warps, steps, stages) | ms | int8 TOPS | vs default | same |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['layer']} | {row['tiles']} | failed: {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['layer']} | {row['tiles']} | {row['ms']:.4f} | {row['tops']:.1f} | "
            f"{row['vs_default']:.2f}x | {'yes' if row['agrees'] else 'NO'} |"
        )
    return lines

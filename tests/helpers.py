"""Helpers shared by the tests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from fgq_tvm.runtime import SIDECAR_FORMAT, sidecar_path
from fgq_tvm.schedules.conv2d_amx import AmxCore
from fgq_tvm.schedules.intrinsics_amx import EMULATED_TILES

TINY_SHAPE = (2, 3, 4, 4)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, some gammas negative."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                size = bn.num_features
                bn.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(size, generator=generator) * 2 + 0.2)
                bn.weight.copy_(torch.randn(size, generator=generator))
                bn.bias.copy_(torch.randn(size, generator=generator) * 0.3)
    return model.eval()


def fgq_tvm(*args: object) -> subprocess.CompletedProcess:
    """Run ``python -m fgq_tvm ARGS`` without FGQ_TVM_DEBUG."""
    env = {key: value for key, value in os.environ.items() if key != "FGQ_TVM_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "fgq_tvm", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def fgq_tvm_at_once(*commands: Sequence[object]) -> list[subprocess.CompletedProcess]:
    """Run ``commands`` (the arguments of :func:`fgq_tvm`) four at a time: each spends
    seconds importing torch and TVM. Their results, in order."""
    with ThreadPoolExecutor(max_workers=min(len(commands), 4)) as pool:
        return list(pool.map(lambda args: fgq_tvm(*args), commands))


def tiny_executable():
    """A tiny module in the fgq-tvm format, built with TVM in well under a second: ``main``
    computes the per-channel mean of a ``TINY_SHAPE`` batch and takes the result of
    ``prepare`` (as every fgq-tvm module does; here an empty tuple)."""
    import tvm
    from tvm import relax

    builder = relax.BlockBuilder()
    with builder.function("prepare", []):
        builder.emit_func_output(relax.Tuple([]))
    x = relax.Var("x", relax.TensorType(TINY_SHAPE, "float32"))
    prepared = relax.Var("prepared", relax.TupleType([]))
    with builder.function("main", [x, prepared]):
        mean = builder.emit(relax.op.mean(x, axis=[2, 3]))
        builder.emit_func_output(relax.Tuple([mean]))
    return tvm.compile(builder.get(), target=tvm.target.Target({"kind": "llvm"}))


def tiny_sidecar(module: Path) -> dict:
    """The sidecar of the tiny module (:func:`tiny_executable`) exported to ``module``."""
    return {
        "format": SIDECAR_FORMAT,
        "model": "tiny",
        "target": json.dumps({"kind": "llvm"}),
        "module_sha256": hashlib.sha256(module.read_bytes()).hexdigest(),
        "input": {"shape": list(TINY_SHAPE), "dtype": "float32", "layout": "NCHW"},
        "output": {"shape": [TINY_SHAPE[0], TINY_SHAPE[1]], "dtype": "float32"},
    }


def write_tiny_module(path: Path) -> Path:
    """Export :func:`tiny_executable` to ``path`` with its sidecar beside it."""
    tiny_executable().export_library(str(path))
    sidecar_path(path).write_text(json.dumps(tiny_sidecar(path)))
    return path


def kernel_call(
    bb, layer, x, core="bitplane", epilogue=None, residual=None, emit=True, layouts=None,
    name=None, quantized_input=False,
):  # fmt: skip
    """Emit the calls LegalizeQuantizedLayers (and FuseLayerEpilogues, given an epilogue) make
    for ``layer`` on ``x``: the load-time pack if the core has one, then the kernel (returned
    unbound unless ``emit``); ``layouts`` (a ``Layouts``) default to NCHW, ``name`` to the
    kernel's name in the passes; ``quantized_input``: ``x`` holds activation bytes."""
    from tvm import relax

    from fgq_tvm.schedules.core import NO_EPILOGUE
    from fgq_tvm.schedules.kernel_spec import SCHEDULED, KernelSpec, kernel_arguments, layer_shape
    from fgq_tvm.schedules.layout import PLAIN, nchw_shape

    epilogue = epilogue or NO_EPILOGUE
    layouts = layouts or PLAIN
    shape = layer_shape(layer, nchw_shape(tuple(int(d) for d in x.ty.shape), layouts.input))
    spec = KernelSpec(layer, shape, core, epilogue, layouts, quantized_input)
    kernels = spec.kernels()
    pack_name = "fgq_" + layer.name + "_pack"
    stored = [relax.const(a) for a in kernel_arguments(layer, core)]
    prepared = []
    if kernels.pack is not None:
        pack = bb.add_func(
            kernels.pack.with_attrs({"global_symbol": pack_name, SCHEDULED: True}),
            pack_name,
        )
        types = [relax.TensorType(*spec) for spec in kernels.prepared]
        packed = bb.emit(
            relax.call_tir(
                pack, stored[: kernels.packed_arguments], types[0] if len(types) == 1 else types
            )
        )
        prepared = (
            [packed]
            if len(types) == 1
            else [bb.emit(relax.TupleGetItem(packed, i)) for i in range(len(types))]
        )
    if name is None:
        name = "fgq_" + layer.name + ("_" + epilogue.name if epilogue != NO_EPILOGUE else "")
    kernel = bb.add_func(kernels.layer.with_attrs(spec.attributes(name)), name)
    args = [
        x,
        *prepared,
        *stored[kernels.packed_arguments :],
        *([residual] if residual is not None else []),
    ]
    call = relax.call_tir(kernel, args, relax.TensorType(*kernels.output))
    return bb.emit(call) if emit else call


def ternary_conv_layer(out_channels: int, in_channels: int, act_scale: float = 0.0625):
    """A 3x3 (padding 1) ternary conv named ``conv``: groups of 4 channels with float scales,
    unsigned 8-bit activations, random weights (seed 0)."""
    import numpy as np

    from fgq_tvm.config import LayerConfig
    from fgq_tvm.quant.layers import ActQuant, QuantizedLayer

    rng = np.random.default_rng(0)
    groups = -(-in_channels // 4)
    return QuantizedLayer(
        name="conv",
        op="conv2d",
        config=LayerConfig("ternary", 4),
        act=ActQuant(act_scale, 8, signed=False),
        weight=rng.integers(-1, 2, (out_channels, in_channels, 3, 3)).astype(np.int8),
        group_size=4,
        bias=rng.normal(size=out_channels).astype(np.float32),
        group_scale=rng.uniform(0.1, 1.0, (out_channels, groups, 3, 3)).astype(np.float32),
        padding=(1, 1),
    )


def vnni_tuning_case():
    """What the tuning tests search: a residual, ReLU'd 3x3 ternary layer (16 -> 32 channels,
    8x8) on the VNNI core in NCHW16c, as ``(layer, shape, spec, task)``."""
    from fgq_tvm.schedules.core import Conv2dShape, Epilogue
    from fgq_tvm.schedules.kernel_spec import KernelSpec
    from fgq_tvm.schedules.layout import BLOCKED
    from fgq_tvm.tuning import KernelTask

    layer = ternary_conv_layer(32, 16, act_scale=0.05)
    shape = Conv2dShape(1, 16, 8, 8, 32, (3, 3), padding=(1, 1), group_size=4)
    spec = KernelSpec(layer, shape, "int8-dot-vnni", Epilogue(residual=True, relu=True), BLOCKED)
    return layer, shape, spec, KernelTask(spec)


class EmulatedAmxCore(AmxCore):
    """The AMX core with emulated tiles (any CPU runs them) on every CPU target:
    ``int8-amx-emulated``, whose modules need no tile state."""

    name = "int8-amx-emulated"

    def __init__(self):
        super().__init__(EMULATED_TILES)

    def available(self, target) -> bool:
        return target is not None and target.kind.name == "llvm"

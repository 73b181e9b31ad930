"""Each quantized layer's kernel timed on its own, as the compiled module has it (core, fused
epilogue, layouts, float or byte activations; default schedule): :func:`time_layer` and, for a
whole model, :func:`time_layers`. The bench tables compare their MAC rates with the int8 peak
(:func:`~fgq_tvm.cpu_features.vnni_peak_gmacs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..remote import LOCAL, Session
from ..timing import median
from .results import LayerResult

if TYPE_CHECKING:
    from tvm.target import Target

    from ..compiler import CompileResult
    from ..schedules.kernel_spec import KernelSpec

Progress = Callable[[str], None]
"""Called with a short description of each stage of a bench run."""
MIN_KERNEL_REPEAT_MS = 10  # each timed kernel repeat loops the kernel for at least this long


def time_layer(
    spec: KernelSpec, target: Target, repeats: int, session: Session = LOCAL
) -> LayerResult:
    """Build a layer's kernels as the compiled module has them (core, fused epilogue, layout;
    default schedule) and time the per-inference kernel standalone on ``session``, its weights
    packed beforehand as at load time.

    The input is random, uniform over the layer's quantization range (the residual, if any,
    standard normal); the time is the median of ``repeats`` repeats of at least
    :data:`MIN_KERNEL_REPEAT_MS` each.

    Parameters
    ----------
    spec
        The layer's kernels as the compiler chose them.
    target
        The target to build them for.
    repeats
        Timed repeats.
    session
        Where the kernel runs (:mod:`fgq_tvm.remote`).

    Returns
    -------
    LayerResult
    """
    from ..schedules.kernel_spec import kernel_arguments
    from ..schedules.select import build_layer

    layer, shape = spec.layer, spec.shape
    built = build_layer(spec.kernels(), kernel_arguments(layer, spec.core), target, session)
    rng = np.random.default_rng(0)
    input_shape = (shape.batch, shape.in_channels, shape.height, shape.width)
    low, high = layer.act.qmin * layer.act.scale, layer.act.qmax * layer.act.scale
    x = rng.uniform(low, high, input_shape).astype(np.float32)
    x = layer.act.stored(x) if spec.quantized_input else x
    out_dims = (shape.batch, shape.out_channels, shape.out_height, shape.out_width)
    residual = [rng.normal(size=out_dims).astype(np.float32)] if spec.epilogue.residual else []
    timer = built.module.time_evaluator(
        "main", session.device, number=1, repeat=repeats, min_repeat_ms=MIN_KERNEL_REPEAT_MS
    )
    seconds = median(list(timer(*built.arguments(x, *residual)).results))
    weights = f"ternary N={layer.group_size}" if layer.is_ternary else layer.config.weights
    return LayerResult(
        layer.name, layer.op, weights, spec.core, input_shape, shape.macs, seconds * 1e3
    )


def time_layers(
    compiled: CompileResult,
    target: Target,
    repeats: int,
    progress: Progress,
    session: Session = LOCAL,
) -> list[LayerResult]:
    """:func:`time_layer` for every quantized layer of a compiled model, in model order.

    Parameters
    ----------
    compiled
        :func:`~fgq_tvm.compiler.compile_model`'s result (its ``kernels``).
    target
        The target it was compiled for.
    repeats
        Timed repeats of each kernel.
    progress
        Called before each kernel with ``"time kernel I/N: NAME"``.
    session
        Where the kernels run (:mod:`fgq_tvm.remote`).

    Returns
    -------
    list of LayerResult
    """
    results = []
    for index, (name, spec) in enumerate(compiled.kernels.items(), 1):
        progress(f"time kernel {index}/{len(compiled.kernels)}: {name}")
        results.append(time_layer(spec, target, repeats, session))
    return results

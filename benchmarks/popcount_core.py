"""The bitplane popcount core against the integer dot cores, layer by layer, in one run.

For every layer of MODEL that the popcount core computes (ternary weights in groups of whole
64-channel words, unsigned activations of at most 4 bits), this builds four kernels with their
default schedules and the layer's real quantized weights: the int8 dot core (VNNI) as the
compiled network runs it (its layout, its activation bytes in and out), the int8 dot core with
float32 NCHW input and output, the int16 dot core (AVX2, built for Haswell) and the popcount
core, both float32 NCHW in and out. It times them in interleaved rounds
(:func:`fgq_tvm.timing.time_rounds`; batch 1, the given threads), and writes a markdown table of
medians, GMAC/s and the popcount core's time over the others'.

Usage::

    python benchmarks/popcount_core.py resnet18 --group-size 64 --act-bits 4 \\
        --out benchmarks/results/popcount-core-resnet18.md
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from statistics import median

import torch

from fgq_tvm.compiler import kernel_info, lower_to_relax
from fgq_tvm.config import QuantConfig
from fgq_tvm.data import load_calibration
from fgq_tvm.models import build_model
from fgq_tvm.quant.quantize import quantize_model
from fgq_tvm.reporting import write_text_atomically
from fgq_tvm.schedules import conv2d_popcount
from fgq_tvm.schedules.conv2d_dot import AVX2_CORE
from fgq_tvm.schedules.conv2d_popcount import POPCOUNT_CORE
from fgq_tvm.schedules.core import NO_EPILOGUE
from fgq_tvm.schedules.kernel_spec import KernelSpec, layer_encoding
from fgq_tvm.schedules.layout import PLAIN
from fgq_tvm.target import host_target, parse_target
from fgq_tvm.threads import thread_settings
from fgq_tvm.timing import time_rounds
from fgq_tvm.tuning import KernelTask

VARIANTS = (
    "VNNI dot core, as in the network",
    "VNNI dot core, float NCHW",
    "AVX2 dot core, float NCHW",
    "popcount core, float NCHW",
)
AVX2 = parse_target("llvm -mcpu=haswell")


def layer_variants(spec: KernelSpec, host) -> list[tuple[KernelSpec, object]]:
    """The kernels of :data:`VARIANTS` for one compiled layer, with the target of each."""
    plain = replace(spec, layouts=PLAIN, quantized_input=False, epilogue=NO_EPILOGUE)
    avx2, popcount = (replace(plain, core=core.name) for core in (AVX2_CORE, POPCOUNT_CORE))
    return [(spec, host), (plain, host), (avx2, AVX2), (popcount, host)]


def runner(spec: KernelSpec, target):
    """A no-argument call of the layer's kernel (default schedule) on a fixed random input."""
    return KernelTask(spec).runner(spec.kernels().layer, target)


def _cell(ms: float, macs: int | None) -> str:
    return f"{ms:.3f} ({macs / ms / 1e6:.0f})" if macs else f"{ms:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--scales", default="int8", choices=("float", "int8"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    target = parse_target(host_target())
    if not conv2d_popcount.available(target):
        sys.exit(f"popcount_core.py: this CPU has no {conv2d_popcount.FEATURE}")
    model, spec = build_model(args.model)
    calibration, _ = load_calibration(None, spec, limit=16)
    config = QuantConfig(group_size=args.group_size, act_bits=args.act_bits, scales=args.scales)
    quantized = quantize_model(model, config, [calibration])
    mod = lower_to_relax(quantized, spec.input_shape, target)
    kernels = kernel_info(mod, quantized.layers)
    rows = []
    with thread_settings(args.threads):
        for name, compiled in kernels.items():
            layer_spec = compiled.spec
            encoding = layer_encoding(layer_spec.layer)
            if not conv2d_popcount.supports(layer_spec.shape, layer_spec.layer.act, encoding):
                continue
            print(f"{name} ...", file=sys.stderr, flush=True)
            variants = zip(VARIANTS, layer_variants(layer_spec, target), strict=True)
            runs = {variant: runner(*kernel) for variant, kernel in variants}
            times = {v: median(t) for v, t in time_rounds(runs, args.repeats, 3, 0.0).items()}
            rows.append((name, layer_spec.shape.macs, times))
    header = f"# Popcount core against the integer dot cores: {args.model}, N={args.group_size}, "
    header += f"a{args.act_bits}, {args.scales} scales, {args.threads} threads\n\n"
    header += "Median ms of " + str(args.repeats) + " interleaved rounds (GMAC/s).\n\n"
    ratios = ("popcount / VNNI (network)", "popcount / AVX2")
    table = ["| layer | MMACs | " + " | ".join((*VARIANTS, *ratios)) + " |"]
    table.append("|---" * (len(VARIANTS) + len(ratios) + 2) + "|")
    totals = {v: sum(times[v] for *_, times in rows) for v in VARIANTS}
    for name, macs, times in [*rows, ("total", None, totals)]:
        cells = [_cell(times[v], macs) for v in VARIANTS]
        popcount = times[VARIANTS[3]]
        cells += [f"{popcount / times[VARIANTS[0]]:.2f}x", f"{popcount / times[VARIANTS[2]]:.2f}x"]
        mmacs = f"{macs / 1e6:.1f}" if macs else ""
        table.append(f"| {name} | {mmacs} | " + " | ".join(cells) + " |")
    text = header + "\n".join(table) + "\n"
    write_text_atomically(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

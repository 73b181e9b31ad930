"""Batch-1 latency of compiled fgq-tvm modules against PyTorch FP32 eager, in one run.

For each model: compile with the default schedules (no tuning database), then time the ``.so``
and the float PyTorch model alternately on the same input with the same thread count, and report
medians and the ratio. Writes a markdown and a JSON table.

Usage::

    python benchmarks/latency.py --models resnet18 resnet50 --target "llvm -mcpu=znver4" \
        --out benchmarks/results/latency
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fgq_tvm.compiler import compile_model
from fgq_tvm.config import QuantConfig, parse_group_size
from fgq_tvm.data import load_calibration
from fgq_tvm.models import build_model
from fgq_tvm.runtime import load
from fgq_tvm.target import host_target, parse_target

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "alexnet", "vgg11", "vgg16")


def median_ms(run, repeats: int, warmup: int) -> float:
    """Median wall time of ``run()`` in milliseconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, target, config: QuantConfig, repeats: int, workdir: Path) -> dict:
    model, spec = build_model(name)
    calibration, _ = load_calibration(None, spec, limit=32)
    start = time.perf_counter()
    result = compile_model(model, spec, config, calibration, target, workdir / f"{name}.so")
    compile_s = time.perf_counter() - start
    compiled = load(result.output)
    x = torch.randn(spec.input_shape, generator=torch.Generator().manual_seed(0))
    x_numpy = x.numpy()
    with torch.no_grad():
        torch_ms = median_ms(lambda: model(x), repeats, warmup=3)
    fgq_ms = median_ms(lambda: compiled(x_numpy), repeats, warmup=3)
    return {
        "model": name,
        "group_size": config.group_size or "channel",
        "act_bits": config.act_bits,
        "fgq_tvm_ms": round(fgq_ms, 2),
        "torch_fp32_ms": round(torch_ms, 2),
        "ratio_to_torch_fp32": round(fgq_ms / torch_ms, 2),
        "compile_s": round(compile_s, 1),
        "so_bytes": result.output.stat().st_size,
    }


def markdown(rows: list[dict], target: str, threads: int) -> str:
    lines = [
        f"Batch 1, {threads} threads, target `{target}`, default schedules, medians.",
        "",
        "| model | N | act bits | fgq-tvm ms | PyTorch FP32 ms | ratio | compile s | .so MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['group_size']} | {row['act_bits']} | {row['fgq_tvm_ms']} "
            f"| {row['torch_fp32_ms']} | {row['ratio_to_torch_fp32']} | {row['compile_s']} "
            f"| {row['so_bytes'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--target", default=host_target())
    parser.add_argument("--group-size", default="4")
    parser.add_argument("--act-bits", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/latency")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = parse_target(args.target)
    config = QuantConfig(group_size=parse_group_size(args.group_size), act_bits=args.act_bits)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            rows.append(measure(name, target, config, args.repeats, Path(workdir)))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows, args.target, args.threads))


if __name__ == "__main__":
    main()

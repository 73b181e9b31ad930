"""Batch-1 latency of fgq-tvm against its peers, one model after another, in one run.

For each model this does what ``fgq-tvm bench`` does (:mod:`fgq_tvm.bench`): fgq-tvm with the
default schedules, the "fgq-tvm tuned" hook (n/a until tuning databases exist), PyTorch FP32 eager,
PyTorch int8 (FX graph mode, x86), ONNX Runtime FP32 and int8 (static QDQ) and TVM FP32
(with the MetaSchedule records of ``fgq-tvm tune --fp32`` where the target has them), all at 2
threads, median of 20 runs after warm-up, plus every quantized layer's
kernel against the int8 VNNI peak. It writes ``<out>/<target key>/<model>.md`` and ``.json``,
then ``summary.md`` of every model measured so far for that target, and prints the summary.

ONNX Runtime comes with ``pip install -e ".[bench]"``; without it its rows read "not installed".

Usage::

    python benchmarks/peers.py --models resnet18 resnet50 [--target "llvm -mcpu=znver4"]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fgq_tvm import bench
from fgq_tvm.config import QuantConfig, parse_act_bits, parse_group_size
from fgq_tvm.errors import FGQError
from fgq_tvm.models import build_model
from fgq_tvm.reporting import output_folder, progress_printer
from fgq_tvm.target import host_target, parse_target, target_key

if TYPE_CHECKING:
    from tvm.target import Target

RESULTS = Path(__file__).resolve().parent / "results"
PROG = Path(__file__).name


def main(argv: list[str] | None = None) -> int:
    """Bench every model of ``--models``, then write and print the summary of the target's
    results; returns the exit status (2 for a usage error, 1 for another failure)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--target", help="as for fgq-tvm compile (default: the host CPU)")
    parser.add_argument("--group-size", default="4")
    parser.add_argument("--act-bits", default="8")
    parser.add_argument("--scales", default="int8", choices=("float", "int8"))
    parser.add_argument("--repeats", type=int, default=bench.DEFAULT_REPEATS)
    parser.add_argument("--warmup", type=int, default=bench.DEFAULT_WARMUP)
    parser.add_argument("--threads", type=int, default=bench.DEFAULT_THREADS)
    parser.add_argument("--peers", default="all", help="as for fgq-tvm bench --peers")
    parser.add_argument(
        "--batches", default="8,32", help="as for fgq-tvm bench --batches (default: 8,32)"
    )
    parser.add_argument(
        "--ghz", type=float, help="clock of the VNNI peak (default: from /proc/cpuinfo)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args(argv)
    try:
        target = parse_target(args.target or host_target())
        quant = QuantConfig(
            group_size=parse_group_size(args.group_size),
            act_bits=parse_act_bits(args.act_bits),
            scales=args.scales,
        )
        peers = bench.parse_peers(args.peers)
        options = bench.BenchOptions(
            peers, args.repeats, args.warmup, args.threads, args.ghz,
            batches=bench.parse_batches(args.batches),
        )  # fmt: skip
    except FGQError as error:
        parser.error(str(error))
    try:
        folder = output_folder(args.out / target_key(target))
        for model in args.models:
            bench_model(model, target, quant, options, folder)
    except FGQError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    summary = bench.summary_markdown(
        [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    )
    (folder / "summary.md").write_text(summary)
    print(summary)
    return 0


def bench_model(
    name: str, target: Target, quant: QuantConfig, options: bench.BenchOptions, folder: Path
) -> None:
    """What ``fgq-tvm bench NAME`` does: bench the zoo model ``name`` (random weights, the
    calibration images ``fgq-tvm compile`` picks by default), print the report and write it.

    Parameters
    ----------
    name
        A zoo model name or a ``.pt2`` file.
    target
        The target to compile for.
    quant
        fgq-tvm's quantization.
    options
        Peers, repeats, warm-up runs, threads and clock.
    folder
        Where ``<model>.md`` and ``.json`` go.

    Raises
    ------
    FGQError
        The model, its calibration images or the folder cannot be used.
    """
    model, spec = build_model(name)
    result, (markdown, data) = bench.bench_model(
        model, spec, quant, target, options, folder, progress=progress_printer(name),
        warn=lambda warning: print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True),
    )  # fmt: skip
    print(bench.format_markdown(result))
    print(f"wrote {markdown} and {data}")


if __name__ == "__main__":
    sys.exit(main())

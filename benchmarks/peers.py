"""Batch-1 latency of fgq-tvm against its peers, one model after another, in one run.

For each model this runs ``fgq-tvm bench`` (:mod:`fgq_tvm.bench`): fgq-tvm with the default
schedules, the "fgq-tvm tuned" hook (n/a until tuning databases exist), PyTorch FP32 eager,
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

from fgq_tvm import bench, cli
from fgq_tvm.errors import FGQError
from fgq_tvm.target import parse_target, target_key

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--target", help="as for fgq-tvm compile (default: the host CPU)")
    parser.add_argument("--group-size", default="4")
    parser.add_argument("--act-bits", default="8")
    parser.add_argument("--scales", default="int8", choices=("float", "int8"))
    parser.add_argument("--repeats", default="20")
    parser.add_argument("--warmup", default="3")
    parser.add_argument("--threads", default="2")
    parser.add_argument("--peers", default="all", help="as for fgq-tvm bench --peers")
    parser.add_argument("--ghz", help="clock of the VNNI peak (default: from /proc/cpuinfo)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"default: {RESULTS}")
    args = parser.parse_args(argv)
    target = args.target or cli.default_target()
    try:
        folder = args.out / target_key(parse_target(target))
    except FGQError as error:
        parser.error(str(error))
    for model in args.models:
        words = [
            "bench", model, "--target", target, "--group-size", args.group_size,
            "--act-bits", args.act_bits, "--scales", args.scales,
            "--repeats", args.repeats, "--warmup", args.warmup,
            "--threads", args.threads, "--peers", args.peers, "--out", str(folder),
        ]  # fmt: skip
        status = cli.main([*words, *(["--ghz", args.ghz] if args.ghz else [])])
        if status != 0:
            return status
    summary = bench.summary_markdown(
        [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    )
    (folder / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a compiled module spends an inference: the time of every operator call, measured in
the whole network (:meth:`fgq_tvm.runtime.CompiledModel.operator_times`).

Each operator's time is the median over the repeats of its summed calls in one inference,
batch 1 (the module's batch), on a fixed random input. Operators are grouped into the
quantized layers' kernels (``fgq_*``), the other graph operators (pools, layout transforms,
pads) and the virtual machine's own builtins (allocation, shape checks). Writes a markdown
table (``--out``) and prints it.

Usage::

    fgq-tvm compile resnet50 -o r50.so
    python benchmarks/operator_times.py r50.so --out benchmarks/results/operator-times-resnet50.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from statistics import median

import numpy as np

GROUPS = (("quantized kernels", "fgq_"), ("VM builtins", "vm.builtin."), ("other operators", ""))


def group_of(name: str) -> str:
    return next(group for group, prefix in GROUPS if name.startswith(prefix))


def operator_table(path: Path, times: dict[str, list[float]], threads: int) -> str:
    medians = {name: median(runs) * 1e3 for name, runs in times.items()}
    total = sum(medians.values())
    lines = [
        f"# Operator times of {path.name}",
        "",
        f"Batch of the module, {threads} threads, median over {len(next(iter(times.values())))} "
        f"inferences of each operator's summed calls; the medians add up to {total:.2f} ms.",
        "",
        "| group | ms | share |",
        "| --- | --- | --- |",
    ]
    for group, _ in GROUPS:
        ms = sum(value for name, value in medians.items() if group_of(name) == group)
        lines.append(f"| {group} | {ms:.3f} | {ms / total:.1%} |")
    lines += ["", "| operator | group | ms | share |", "| --- | --- | --- | --- |"]
    for name, ms in sorted(medians.items(), key=lambda item: -item[1]):
        lines.append(f"| `{name}` | {group_of(name)} | {ms:.3f} | {ms / total:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("module", type=Path, help="a .so written by fgq-tvm compile")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="markdown file to write")
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM starts its thread pool
    import fgq_tvm
    from fgq_tvm.errors import FGQError
    from fgq_tvm.reporting import write_text_atomically

    try:
        model = fgq_tvm.load(args.module)
        x = np.random.default_rng(0).normal(size=model.input_shape).astype(np.float32)
        table = operator_table(args.module, model.operator_times(x, args.repeats), args.threads)
        if args.out is not None:
            write_text_atomically(args.out, table)
    except FGQError as error:
        print(f"operator_times: error: {error}", file=sys.stderr)
        return 1
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

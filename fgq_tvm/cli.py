"""The ``fgq-tvm`` command line: ``compile`` a model into a ``.so``, ``run`` a compiled module,
``bundle`` it with the TVM runtime for machines without fgq-tvm, ``tune`` its kernels with
MetaSchedule, ``bench`` a model against its peers, ``eval`` its accuracy against the
full-precision model, ``finetune`` it through its quantizers, ``report`` what the quantization
buys at each group size.

Every failure is reported as one line, ``fgq-tvm: error: <message>``, with exit status 2 for
command-line mistakes and 1 otherwise; unexpected exceptions are reported the same way as
"internal error" unless ``FGQ_TVM_DEBUG=1`` asks for the traceback
(:func:`~fgq_tvm.errors.exit_status`). ``run`` needs only NumPy, apache-tvm-ffi and TVM's
runtime library (:mod:`fgq_tvm.run_command`): the modules that import PyTorch or the compiler
are imported inside the other commands alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import (
    BATCHNORM_MODES,
    CALIB_IMAGES,
    METHODS,
    NOISE_CALIB_IMAGES,
    RECONSTRUCTION_CALIB_IMAGES,
    RECONSTRUCTION_MAX_MACS,
    RECONSTRUCTION_MODES,
    SCALE_MODES,
    SWEEP_ACT_BITS,
    SWEEP_GROUP_SIZES,
    QuantConfig,
    data_defaults,
    parse_act_bits,
    parse_group_size,
    parse_override,
)
from .errors import FGQError, Interrupted, UsageError, exit_status
from .reporting import (
    output_file,
    output_folder,
    progress_bar_printer,
    progress_printer,
    write_atomically,
    write_text_atomically,
)
from .run_command import OneLineParser, add_run_options, run_npy
from .target import TUNING_LOGS, database_folder, host_target, is_target_flag, parse_target

if TYPE_CHECKING:
    from torch import nn

    from .models import ModelSpec

PROG = "fgq-tvm"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Parameters
    ----------
    argv
        The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for usage errors, 1 for other errors.
    """
    words = sys.argv[1:] if argv is None else list(argv)

    def command() -> int:
        args = build_parser().parse_args(join_target_words(words))
        return args.handler(args)

    return exit_status(command, PROG)


def join_target_words(argv: Sequence[str]) -> list[str]:
    """Join the words that follow ``--target VALUE`` and look like target flags into VALUE.

    ``["--target", "llvm", "-mcpu=skylake", "-o", "m.so"]`` becomes
    ``["--target", "llvm -mcpu=skylake", "-o", "m.so"]`` (argparse would otherwise read
    ``-mcpu=skylake`` as an option of its own). ``--target=VALUE`` is handled alike.
    """
    joined: list[str] = []
    for word in argv:
        after_target = bool(joined) and (
            joined[-1].startswith("--target=") or (len(joined) > 1 and joined[-2] == "--target")
        )
        if after_target and is_target_flag(word):
            joined[-1] = f"{joined[-1]} {word}"
        else:
            joined.append(word)
    return joined


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fgq-tvm`` and its subcommands."""
    parser = OneLineParser(
        prog=PROG,
        description="Compile PyTorch CNNs into fine-grained ternary (FGQ) native modules.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_compile(commands)
    _add_run(commands)
    _add_bundle(commands)
    _add_tune(commands)
    _add_bench(commands)
    _add_eval(commands)
    _add_finetune(commands)
    _add_report(commands)
    _add_sweep(commands)
    return parser


def _add_compile(commands) -> None:
    sub = commands.add_parser(
        "compile",
        help="quantize a model and compile it into a .so",
        description="Quantize MODEL (ternary weights in groups of N, 8- or 4-bit activations) "
        "and compile it for a CPU target into a shared library plus a .json sidecar.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_compile)
    sub.add_argument("-o", "--output", required=True, metavar="OUT.so", help="module to write")
    sub.add_argument(
        "--cuda-graph",
        action="store_true",
        help="cuda targets: run the kernels between the input's and the logits' as one captured "
        "CUDA graph (one launch per inference after the first)",
    )
    _add_model_arguments(sub)
    _add_schedule_arguments(sub)


def _add_schedule_arguments(sub) -> None:
    """Where compiled kernels take their schedules from (compile, eval)."""
    tuning = sub.add_argument_group("schedules")
    tuning.add_argument(
        "--tuning-logs",
        default=str(TUNING_LOGS),
        metavar="DIR",
        help="tuning databases: the kernels recorded in DIR/<target key> use their tuned "
        f"schedules, verified first (default: {TUNING_LOGS})",
    )
    tuning.add_argument("--default-schedules", action="store_true", help="ignore tuning databases")


def _add_tune(commands) -> None:
    sub = commands.add_parser(
        "tune",
        help="tune a model's kernels with MetaSchedule into the target's database",
        description="Quantize MODEL as compile would, then tune each distinct integer dot core "
        "kernel with MetaSchedule (XGBoost cost model, candidates timed on this machine or on "
        "the RPC servers of --rpc-key, each new best verified against the reference arithmetic "
        "where it was timed) and append the records to DIR/<target key>, where compile finds "
        "them.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_tune)
    sub.add_argument(
        "--trials",
        type=_count,
        default=32,
        metavar="N",
        help="measured candidates per kernel (default: 32); 0: only time each kernel's best "
        "record against its default schedule again",
    )
    sub.add_argument(
        "--tuning-logs",
        default=str(TUNING_LOGS),
        metavar="DIR",
        help=f"where the databases live (default: {TUNING_LOGS})",
    )
    sub.add_argument(
        "--threads",
        type=_positive_int,
        default=2,
        metavar="N",
        help="threads the candidates run with: those the module will run with (default: 2, "
        "as bench)",
    )
    sub.add_argument(
        "--fp32",
        action="store_true",
        help="tune bench's TVM FP32 peer instead: the full-precision model with MetaSchedule's "
        "default rules, into DIR/<target key>/tvm-fp32 (tasks with records are skipped)",
    )
    _add_rpc_arguments(sub, "time, verify and compare the candidates")
    sub.add_argument(
        "--rpc-workers",
        type=_positive_int,
        metavar="N",
        help="candidates timed at once on the RPC servers (default: one per server under KEY)",
    )
    _add_model_arguments(sub)


def _add_rpc_arguments(sub, what: str) -> None:
    """``--rpc-tracker`` and ``--rpc-key`` of tune and bench: ``what`` they run remotely."""
    sub.add_argument(
        "--rpc-tracker",
        metavar="HOST:PORT",
        help=f"{what} on the servers registered with this TVM RPC tracker (python -m "
        "tvm.exec.rpc_tracker) under --rpc-key; the target must describe their CPU",
    )
    sub.add_argument(
        "--rpc-key", metavar="KEY", help="the servers' key (python -m tvm.exec.rpc_server --key)"
    )


def _add_eval(commands) -> None:
    sub = commands.add_parser(
        "eval",
        help="accuracy of a quantized model against its full-precision original",
        description="Quantize MODEL as compile would and measure the top-1 and top-5 accuracy "
        "of the full-precision model and of the quantized one on the same labelled images, "
        "and the drop. With --backend tvm the quantized accuracy is that of the compiled "
        "module (built in a temporary folder), checked against the PyTorch reference.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_eval)
    sub.add_argument(
        "--data",
        required=True,
        metavar="D",
        help="labelled images: an .npz in the CIFAR-10 format (see --split) or an ImageFolder "
        "directory (one sub-folder per class, ImageNet preprocessing)",
    )
    sub.add_argument(
        "--split",
        choices=("calib", "eval", "all"),
        default="eval",
        help="split of an .npz to evaluate on (default: eval; never the calibration split you "
        "calibrated on)",
    )
    sub.add_argument(
        "--backend",
        choices=("torch", "tvm"),
        default="torch",
        help="run the quantized network as the PyTorch reference (default) or as the compiled "
        "module",
    )
    sub.add_argument("--images", type=_positive_int, metavar="N", help="evaluate N images only")
    sub.add_argument(
        "--batch-size",
        type=_positive_int,
        metavar="N",
        help="images per batch, also the compiled module's batch (default: 100 for inputs up "
        "to 64x64 pixels, else 10)",
    )
    sub.add_argument(
        "--baseline-weights",
        metavar="FILE",
        help="full-precision weights the drop is measured against (default: --weights), e.g. "
        "the weights a finetune checkpoint started from",
    )
    sub.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_model_arguments(sub)
    _add_schedule_arguments(sub)


def _add_finetune(commands) -> None:
    sub = commands.add_parser(
        "finetune",
        help="fine-tune a model through its quantizers (straight-through estimator)",
        description="Quantize MODEL as compile would, then train its float weights through the "
        "weight and activation quantizers (straight-through estimator, distillation from the "
        "full-precision model, random crops and flips) on the calibration split of D, within a "
        "time budget; write a checkpoint that compile --weights takes, and report the accuracy "
        "on the eval split before and after. Its ternarizer is --method exact unless you say "
        "twn (gptq adapts to the inputs and cannot be trained through); compile the checkpoint "
        "with the same --method.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_finetune)
    sub.add_argument("-o", "--output", required=True, metavar="OUT.pt", help="checkpoint to write")
    sub.add_argument(
        "--data",
        required=True,
        metavar="D",
        help="labelled images: an .npz in the CIFAR-10 format (trains on its calib split, "
        "reports on its eval split) or an ImageFolder directory (trains on all of it)",
    )
    train = sub.add_argument_group("training")
    train.add_argument("--epochs", type=_positive_int, default=60, help="most epochs (default: 60)")
    train.add_argument(
        "--minutes",
        type=_positive_float,
        default=30.0,
        help="time budget; the epochs are cut to fit it (default: 30)",
    )
    train.add_argument("--batch-size", type=_positive_int, default=128, metavar="N")
    train.add_argument(
        "--lr", type=_positive_float, default=0.01, help="start of the cosine (default: 0.01)"
    )
    train.add_argument(
        "--distillation",
        type=float,
        default=1.0,
        metavar="W",
        help="weight of the KL divergence from the full-precision model (default: 1; 0: labels "
        "only)",
    )
    sub.add_argument(
        "--images",
        type=_positive_int,
        metavar="N",
        help="train and evaluate on N images of each split only (a fixed-seed subset)",
    )
    sub.add_argument("--json", metavar="FILE", help="also write the training and accuracy record")
    _add_model_arguments(sub)
    # training runs through a fixed ternarizer (the exact solver, not compile's default gptq)
    # and moves the weights that reconstruction would fit
    sub.set_defaults(method="exact", reconstruction="off")


def _add_report(commands) -> None:
    sub = commands.add_parser(
        "report",
        help="multiplications eliminated, bits per weight, projected speed-up, group-size sweep",
        description="Quantize MODEL as compile would and report per layer and in total the "
        "multiplications eliminated, the bits per weight with their scales, the model bytes "
        "and the paper's projected speed-up over FP32. With --data, also the top-1 accuracy "
        "at every group size and activation width (table and PNG plot).",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_report)
    sub.add_argument(
        "--data",
        metavar="D",
        help="labelled images for the group-size sweep, as for eval (default: no sweep)",
    )
    sub.add_argument(
        "--split",
        choices=("calib", "eval", "all"),
        default="eval",
        help="split of an .npz the sweep is measured on (default: eval)",
    )
    sub.add_argument("--images", type=_positive_int, metavar="N", help="sweep on N images only")
    sub.add_argument(
        "--sweep-group-sizes",
        type=_group_sizes,
        default=SWEEP_GROUP_SIZES,
        metavar="LIST",
        help="group sizes of the sweep (default: " + ",".join(map(str, SWEEP_GROUP_SIZES)) + ")",
    )
    sub.add_argument(
        "--sweep-act-bits",
        type=_act_bits_list,
        default=SWEEP_ACT_BITS,
        metavar="LIST",
        help="activation bits of the sweep (default: 8,4)",
    )
    sub.add_argument("--batch-size", type=_positive_int, default=100, metavar="N")
    sub.add_argument(
        "--out", default="reports", metavar="DIR", help="output folder (default: reports)"
    )
    _add_model_arguments(sub)


def _add_sweep(commands) -> None:
    sub = commands.add_parser(
        "sweep",
        help="compile, tune, time and evaluate models over group sizes, widths and devices",
        description="For every model x group size x activation width x target x device: "
        "quantize as compile would, tune the kernels (up to --trials each, candidates timed on "
        "the device), compile with the verified tuned schedules, time the module on the device "
        "and, where the model has evaluation images, measure its top-1 drop. Each point is "
        "appended to DIR/points.jsonl as it ends, and DIR/sweep.md, .json, .csv and .png "
        "(drop against latency) are written anew; rerun the same command to resume.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_sweep)
    sub.add_argument(
        "models",
        nargs="+",
        metavar="MODEL[=WEIGHTS]",
        help="models as compile takes them, each with its weights file (default: random)",
    )
    sub.add_argument(
        "--group-sizes", type=_group_sizes, default=(4, 64), metavar="LIST",
        help="group sizes (default: 4,64)",
    )  # fmt: skip
    sub.add_argument(
        "--act-bits", type=_act_bits_list, default=(8,), metavar="LIST",
        help="activation bits (default: 8)",
    )  # fmt: skip
    sub.add_argument(
        "--target", action="append", metavar="TARGET",
        help="a target as compile takes it, repeatable (default: the host CPU)",
    )  # fmt: skip
    sub.add_argument(
        "--rpc-tracker", metavar="HOST:PORT",
        help="time on the servers registered with this TVM RPC tracker under each --rpc-key "
        "(default: this machine)",
    )  # fmt: skip
    sub.add_argument(
        "--rpc-key", action="append", metavar="KEY",
        help="a key of the tracker's servers, repeatable: one device per key",
    )  # fmt: skip
    sub.add_argument(
        "--trials", type=_count, default=16, metavar="N",
        help="tuning trials per kernel and point (default: 16; 0: default schedules and the "
        "records tuned before)",
    )  # fmt: skip
    sub.add_argument(
        "--tuning-logs", default=str(TUNING_LOGS), metavar="DIR",
        help=f"where the databases live (default: {TUNING_LOGS})",
    )  # fmt: skip
    sub.add_argument(
        "--data", metavar="D",
        help="labelled images for the accuracy, as for eval (default: the CIFAR-10 evaluation "
        "split for 32x32 models when ../shared/data has it; other models are not evaluated)",
    )  # fmt: skip
    sub.add_argument("--images", type=_positive_int, metavar="N", help="evaluate on N images only")
    sub.add_argument(
        "--rounds", type=_positive_int, default=20, metavar="N",
        help="timed inferences per point (default: 20)",
    )  # fmt: skip
    sub.add_argument(
        "--threads", type=_positive_int, default=2, metavar="N",
        help="threads of the candidates timed on this machine (default: 2)",
    )  # fmt: skip
    sub.add_argument(
        "--out", default="sweeps", metavar="DIR", help="output folder (default: sweeps)"
    )
    _add_quant_arguments(sub, swept=True)
    sub.set_defaults(split="eval")  # the images evaluated on; calibration is on --calib-split


def _add_model_arguments(sub) -> None:
    """The model, target, quantization and calibration options of compile and tune."""
    sub.add_argument(
        "model",
        metavar="MODEL",
        help="zoo model name (e.g. resnet18, cifar_resnet20) or a .pt2 file",
    )
    sub.add_argument(
        "--target",
        metavar="TARGET",
        help="'llvm -mcpu=skylake -mattr=+avx2' (quoted or as separate words) or a JSON dict "
        'such as \'{"kind": "llvm", "mcpu": "skylake"}\' (default: llvm for the host CPU)',
    )
    sub.add_argument("--weights", metavar="FILE", help="state dict to load (default: random)")
    sub.add_argument("--input-shape", metavar="N,C,H,W", help="override the model's input shape")
    _add_quant_arguments(sub, swept=False)


def _add_quant_arguments(sub, swept: bool) -> None:
    """The quantization and calibration options; a sweep gives group sizes and activation
    bits of its own (``swept``)."""
    quant = sub.add_argument_group("quantization")
    if not swept:
        quant.add_argument(
            "--group-size",
            default="4",
            metavar="N|channel",
            help="input channels per ternary group, 1..64 (default: 4)",
        )
        quant.add_argument(
            "--act-bits", default="8", metavar="8|4", help="activation bits (default: 8)"
        )
    quant.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="PATTERN=SPEC",
        help="per-layer override, e.g. 'layer4.*=16,a4' or 'fc=float' (repeatable)",
    )
    quant.add_argument(
        "--scales",
        choices=SCALE_MODES,
        default="int8",
        help="int8 group scales against one float scale per output channel (the full 8-bit "
        "pipeline; default), the same with one scale per sign and group (int8-asymmetric), "
        "or one float scale per group",
    )
    quant.add_argument(
        "--method",
        choices=METHODS,
        help="ternarization rule: the exact per-group solver with error compensation on the "
        "calibration inputs (gptq: the default with calibration data; minutes on ImageNet "
        "models), the exact solver alone (fast; the default without), or TWN's threshold",
    )
    quant.add_argument(
        "--first-last",
        choices=("int8", "ternary", "float"),
        default="int8",
        help="weights of the first and last layer (default: int8)",
    )
    quant.add_argument(
        "--first-last-act-bits",
        default="8",
        metavar="8|4",
        help="activation bits of the first and last layer",
    )
    quant.add_argument(
        "--calibration",
        choices=("max", "percentile", "mse"),
        default="mse",
        help="activation range estimation: min/max, a percentile, or the clipping with the "
        "least squared rounding error at the layer's bits (default: mse)",
    )
    quant.add_argument(
        "--percentile",
        type=float,
        default=99.99,
        metavar="P",
        help="percentile for --calibration percentile (default: 99.99)",
    )
    quant.add_argument(
        "--batchnorm",
        choices=BATCHNORM_MODES,
        help="BatchNorm statistics of the quantized network: the trained ones shifted and scaled "
        "by the change quantization causes on the calibration data (the default with "
        "calibration data), measured anew on it, or kept (the default without)",
    )
    quant.add_argument(
        "--reconstruction",
        choices=RECONSTRUCTION_MODES,
        help="re-solve each residual block's ternary rounding, scales and biases against the "
        "full-precision block on the calibration data (block: the default with calibration "
        f"data for models up to {RECONSTRUCTION_MAX_MACS // 10**6} MMACs per image, about a "
        "minute for a CIFAR ResNet-20 on two cores), or not (off)",
    )
    calib = sub.add_argument_group("calibration data")
    calib.add_argument(
        "--calib",
        metavar="FILE",
        help=".npz in the CIFAR-10 format or a normalised float32 .npy batch (default: the "
        "CIFAR-10 calibration split for 32x32 models, else random images)",
    )
    calib.add_argument(
        "--calib-split",
        choices=("calib", "eval", "all"),
        default="calib",
        help="split of an .npz to use (default: calib)",
    )
    calib.add_argument(
        "--calib-images",
        type=_positive_int,
        metavar="N",
        help=f"most calibration images to use (default: {RECONSTRUCTION_CALIB_IMAGES} with "
        f"block reconstruction, else {CALIB_IMAGES}; without calibration data, "
        f"{NOISE_CALIB_IMAGES} random ones)",
    )


def _add_run(commands) -> None:
    sub = commands.add_parser(
        "run",
        help="run a compiled module on a .npy batch",
        description="Run MODULE on a float32 NCHW batch and print the top-1 classes.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_run)
    sub.add_argument("module", metavar="MODULE", help="a .so written by fgq-tvm compile")
    add_run_options(sub)


def _add_bundle(commands) -> None:
    sub = commands.add_parser(
        "bundle",
        help="write a compiled module with the TVM runtime into a folder that runs without fgq-tvm",
        description="Write MODULE, its sidecar, TVM's libtvm_runtime.so, the fgq-tvm loader "
        "(import fgq_tvm; fgq_tvm.load(path)(x)) and run.py into the new folder DIR. It runs "
        "with only NumPy and apache-tvm-ffi installed: pip install -r DIR/requirements.txt; "
        "python DIR/run.py --input X.npy [--output Y.npy], as fgq-tvm run.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_bundle)
    sub.add_argument("module", metavar="MODULE", help="a .so written by fgq-tvm compile")
    sub.add_argument(
        "-o", "--output", required=True, metavar="DIR", help="folder to write (new or empty)"
    )


def _add_bench(commands) -> None:
    sub = commands.add_parser(
        "bench",
        help="time a model compiled by fgq-tvm against PyTorch, ONNX Runtime and TVM FP32",
        description="Compile MODEL with fgq-tvm (default schedules) and time it at batch 1 "
        "against its peers on the same input and threads (and at --batches, in images per "
        "second); time every quantized layer's kernel against the int8 VNNI peak. Prints the "
        "tables and writes <model>.md and <model>.json.",
        allow_abbrev=False,
    )
    sub.set_defaults(handler=_bench)
    sub.add_argument("model", metavar="MODEL", help="zoo model name or a .pt2 file")
    sub.add_argument("--target", metavar="TARGET", help="as for compile (default: the host CPU)")
    sub.add_argument("--weights", metavar="FILE", help="state dict to load (default: random)")
    sub.add_argument("--group-size", default="4", metavar="N|channel", help="(default: 4)")
    sub.add_argument("--act-bits", default="8", metavar="8|4", help="(default: 8)")
    sub.add_argument("--scales", choices=SCALE_MODES, default="int8", help="as for compile")
    sub.add_argument(
        "--peers",
        type=_peers,
        metavar="LIST",
        help="comma list of torch, torch-int8, ort, ort-int8, tvm-fp32, or all, or none "
        "(default: all, none with --rpc-tracker: peers run on this machine only; fgq-tvm "
        "itself is always timed)",
    )
    sub.add_argument(
        "--batches",
        type=_batches,
        default=(),
        metavar="LIST",
        help="larger batches to time every runtime at as well, e.g. 8,32 (default: none)",
    )
    sub.add_argument(
        "--repeats", type=_positive_int, default=20, metavar="N", help="timed runs (default: 20)"
    )
    sub.add_argument(
        "--warmup", type=_count, default=3, metavar="N", help="untimed runs first (default: 3)"
    )
    sub.add_argument(
        "--threads", type=_positive_int, default=2, metavar="N", help="threads (default: 2)"
    )
    sub.add_argument(
        "--ghz",
        type=_positive_float,
        metavar="GHZ",
        help="clock of the VNNI peak (default: the highest 'cpu MHz' of /proc/cpuinfo)",
    )
    sub.add_argument(
        "--calib", metavar="FILE", help="calibration images, as for compile (default: as compile)"
    )
    sub.add_argument(
        "--calib-images",
        type=_positive_int,
        default=32,
        metavar="N",
        help="most calibration images (default: 32)",
    )
    sub.add_argument(
        "--out", metavar="DIR", help="output folder (default: benchmarks/results/<target key>)"
    )
    sub.add_argument(
        "--tuning-logs",
        default=str(TUNING_LOGS),
        metavar="DIR",
        help="tuning databases for the 'fgq-tvm tuned' row: DIR/<target key> "
        f"(default: {TUNING_LOGS})",
    )
    _add_rpc_arguments(sub, "run and time fgq-tvm's modules and kernels (threads: the servers')")


def _peers(text: str) -> tuple[str, ...]:
    """argparse type of ``--peers``."""
    from .bench import parse_peers

    try:
        return parse_peers(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _batches(text: str) -> tuple[int, ...]:
    """argparse type of ``--batches``."""
    from .bench import parse_batches

    try:
        return parse_batches(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count(text: str) -> int:
    """argparse type: an integer of at least 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _group_sizes(text: str) -> tuple[int, ...]:
    """argparse type of ``--sweep-group-sizes``: a comma list of integers 1..64."""
    sizes = tuple(parse_group_size(word) for word in text.split(","))
    if None in sizes:
        raise UsageError("the sweep takes group sizes 1..64, not 'channel'")
    return sizes


def _act_bits_list(text: str) -> tuple[int, ...]:
    """argparse type of ``--sweep-act-bits``: a comma list of 8 and 4."""
    return tuple(parse_act_bits(word) for word in text.split(","))


def _positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _compile(args: argparse.Namespace) -> int:
    """``fgq-tvm compile``: check every option, then quantize, build and summarise."""
    progress = _progress_printer()
    output = _checked_output(args.output)
    if output.suffix != ".so":
        raise UsageError(f"output {str(output)!r} must end in .so")
    if args.cuda_graph and _target(args.target).kind.name != "cuda":
        raise UsageError("--cuda-graph needs --target cuda (CUDA graphs run on NVIDIA GPUs)")
    model, spec, quant, target, calibration = _model_inputs(args)
    from .compiler import compile_model
    from .models import layer_ops
    from .summary import format_summary

    result = compile_model(
        model, spec, quant, calibration, target, output, progress,
        tuning_logs=_tuning_logs(args), cuda_graph=args.cuda_graph,
    )  # fmt: skip
    progress("done")
    print(format_summary(result.sidecar, layer_ops(model)))
    _print_outputs(output)
    return 0


def _tuning_logs(args: argparse.Namespace) -> Path | None:
    """The tuning databases of compile and eval: ``--tuning-logs``, or none with
    ``--default-schedules``."""
    return None if args.default_schedules else Path(args.tuning_logs)


def _model_and_target(args: argparse.Namespace):
    """``(model, spec, target)`` from the model and target options."""
    input_shape = parse_input_shape(args.input_shape) if args.input_shape else None
    target = _target(args.target)
    model, spec = _load_model(args.model, args.weights, input_shape)
    return model, spec, target


def _target(text: str | None):
    """The ``--target`` option parsed (:func:`~fgq_tvm.target.parse_target`; an empty one is
    refused), or the host CPU when it was not given."""
    return parse_target(host_target() if text is None else text)


def _model_inputs(args: argparse.Namespace):
    """``(model, spec, quant, target, calibration)`` from the options of compile and tune;
    the settings not given default by the calibration data (:func:`~fgq_tvm.config.
    data_defaults`)."""
    from .defaults import quantization_inputs

    given = _quant_fields(args)  # bad options are refused before the model loads
    model, spec, target = _model_and_target(args)
    inputs = quantization_inputs(
        model, spec, given, args.calib, args.calib_split, args.calib_images
    )
    for line in inputs.warnings:
        print(f"{PROG}: warning: {line}", file=sys.stderr, flush=True)
    return model, spec, inputs.quant, target, inputs.calibration


def _tune(args: argparse.Namespace) -> int:
    """``fgq-tvm tune``: quantize and lower as compile does, tune every kernel on a tunable core."""
    progress = _progress_printer()
    if _target(args.target).kind.name == "cuda":
        raise UsageError(
            "tune has no search for cuda targets yet: their kernels use default_tiles "
            "(benchmarks/gemm_tiles.py measures the alternatives on a GPU); compile with "
            "--target cuda, or tune a CPU target"
        )
    if args.fp32:
        if args.rpc_tracker:
            raise UsageError("tune --fp32 times on this machine only; drop --rpc-tracker")
        return _tune_fp32(args, progress)
    device = _device(args, args.rpc_workers)  # a tracker without servers fails here, at once
    model, spec, quant, target, calibration = _model_inputs(args)
    from .compiler import lower_to_relax, quantize
    from .tuning import kernel_tasks, tune

    quantized = quantize(model, spec, quant, calibration, progress)
    lowered = lower_to_relax(quantized, spec.input_shape, target)
    tasks = kernel_tasks(lowered, quantized.layers, target)
    if not tasks:
        raise FGQError(f"no layer of {spec.name} runs on a tunable core for {target}")
    folder = database_folder(target, Path(args.tuning_logs))
    progress(f"tune {len(tasks)} kernels, up to {args.trials} trials each, into {folder}")
    if args.rpc_tracker:
        progress(f"time them on the {device.servers()} RPC server(s) under {device.name}")
    with _reporting_interrupts(folder):
        results = tune(
            tasks, target, args.trials, folder, progress, threads=args.threads, device=device
        )
    tuned = sum(result.best_ms is not None for result in results)
    print(f"{tuned} of {len(results)} kernels have a verified tuned schedule in {folder}")
    timed = [result for result in results if result.cores is not None]
    if timed:
        moved = sum(result.cores.fastest != result.task.spec.core for result in timed)
        print(f"{len(timed)} layers timed on several cores: {moved} faster on another core")
    return 0


def _tune_fp32(args: argparse.Namespace, progress) -> int:
    """``fgq-tvm tune --fp32``: MetaSchedule's default rules on the full-precision model."""
    from .float_peer import float_folder, float_module, tune_float

    model, spec, target = _model_and_target(args)
    folder = float_folder(database_folder(target, Path(args.tuning_logs)))
    progress(f"tune {spec.name} in FP32, up to {args.trials} trials per task, into {folder}")
    with _reporting_interrupts(folder):
        results = tune_float(
            float_module(model, spec.input_shape), target, args.trials, folder, progress,
            threads=args.threads,
        )  # fmt: skip
    tuned = sum(result.best_ms is not None for result in results)
    print(f"{tuned} of {len(results)} functions have a tuned schedule in {folder}")
    return 0


def _device(args: argparse.Namespace, workers: int | None = None):
    """Where tune and bench run kernels: this machine, or the RPC servers of ``--rpc-tracker``
    and ``--rpc-key``, checked to have one (:class:`~fgq_tvm.remote.RemoteDevice`).

    Raises
    ------
    UsageError
        ``--rpc-key`` or ``--rpc-workers`` without ``--rpc-tracker``, or the other way round.
    FGQError
        The tracker cannot be reached or has no server under the key.
    """
    from .remote import LOCAL_DEVICE, RemoteDevice

    if not args.rpc_tracker:
        if args.rpc_key or workers:
            raise UsageError("--rpc-key and --rpc-workers need --rpc-tracker HOST:PORT")
        return LOCAL_DEVICE
    if not args.rpc_key:
        raise UsageError("--rpc-tracker needs --rpc-key KEY: the key its servers registered")
    device = RemoteDevice.parse(args.rpc_tracker, args.rpc_key, workers)
    device.servers()
    return device


@contextlib.contextmanager
def _reporting_interrupts(folder: Path) -> Iterator[None]:
    """Report Ctrl-C during tuning as one line that says where the records are."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the records so far are in {folder}") from None


def _calibrate_apart(args: argparse.Namespace) -> None:
    """Calibrate on the calib split of an .npz evaluated on; refuse to calibrate on the images
    measured."""
    if args.calib is None and Path(args.data).suffix == ".npz":
        args.calib = args.data  # its calibration split (--calib-split)
    if args.calib == args.data and args.calib_split in (args.split, "all"):
        raise UsageError(
            f"calibrating on split {args.calib_split!r} of the images evaluated on ({args.split!r})"
            " measures nothing; use --calib-split calib and --split eval"
        )


def _eval(args: argparse.Namespace) -> int:
    """``fgq-tvm eval``: quantize, then count top-1/top-5 hits of both models on the images."""
    from .data import load_labelled_images
    from .evaluate import evaluate_quantized, format_result

    progress = _progress_printer()
    json_output = _checked_output(args.json) if args.json else None
    _calibrate_apart(args)
    model, spec, quant, target, calibration = _model_inputs(args)
    images = load_labelled_images(args.data, spec, args.split, args.images)
    baseline = None
    if args.baseline_weights:
        input_shape = parse_input_shape(args.input_shape) if args.input_shape else None
        baseline, _ = _load_model(args.model, args.baseline_weights, input_shape)
    evaluation = evaluate_quantized(
        model, spec, quant, calibration, images, backend=args.backend, target=target,
        batch_size=args.batch_size, tuning_logs=_tuning_logs(args), baseline=baseline,
        progress=progress, image_progress=progress_bar_printer(PROG, "images"),
    )  # fmt: skip
    print(format_result(evaluation.result, evaluation.heading()))
    if json_output is not None:
        record = evaluation.record(
            quant, args.layer, args.weights, args.baseline_weights, len(calibration)
        )
        write_text_atomically(json_output, json.dumps(record, indent=2) + "\n")
    return 0


def _report(args: argparse.Namespace) -> int:
    """``fgq-tvm report``: the layer costs at the configuration, and the group-size sweep."""
    from .compiler import quantize
    from .data import load_labelled_images
    from .report import ModelReport, SpeedupModel, float32_bytes, layer_costs, sweep, write_report

    progress = _progress_printer()
    if args.data:
        _calibrate_apart(args)
    output_folder(Path(args.out))  # before minutes of sweeping, not after
    model, spec, quant, _, calibration = _model_inputs(args)
    layers = layer_costs(quantize(model, spec, quant, calibration, progress), spec.input_shape)
    report = ModelReport(spec.name, quant.summary(), layers, float32_bytes(layers), SpeedupModel())
    if args.data:
        images = load_labelled_images(args.data, spec, args.split, args.images)
        progress(f"sweep on {images.count} images of {images.description}")
        full, points = sweep(
            model, quant, lambda config: quantize(model, spec, config, calibration), images,
            spec.input_shape, args.sweep_group_sizes, args.sweep_act_bits, args.batch_size,
            progress,
        )  # fmt: skip
        report = replace(
            report, full_precision=full, sweep=tuple(points),
            images=f"{images.count} images of {images.description}",
        )  # fmt: skip
    paths = write_report(report, Path(args.out))
    print(paths[0].read_text(), end="")
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """``fgq-tvm sweep``: the points of the arguments measured in turn, resumably."""
    from .sweep import PointMeasurer, SweepResults, SweepSettings, run_sweep, sweep_points
    from .target import target_key

    progress = _progress_printer()
    given = _quant_fields(args)
    models = [_model_choice(text) for text in args.models]
    targets = {target_key(target): target for target in map(_target, args.target or [None])}
    devices = _sweep_devices(args)
    if args.data:
        _calibrate_apart(args)
    folder = output_folder(Path(args.out))
    results = SweepResults(folder)
    for line in results.skipped:
        progress(f"warning: skipped an unreadable line of the results: {line}")
    points = sweep_points(models, args.group_sizes, args.act_bits, list(targets), list(devices))
    settings = SweepSettings(
        given, args.calib, args.calib_split, args.calib_images, args.trials,
        Path(args.tuning_logs), args.rounds, threads=args.threads,
    )  # fmt: skip
    images = _sweep_images(args, models)
    measure = PointMeasurer(settings, targets, devices, images, folder, progress)
    progress(f"sweep {len(points)} points into {folder}")
    try:
        run_sweep(points, results, measure, progress)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; the finished points are in {folder}: run the same command to resume"
        ) from None
    paths = results.write_outputs(points)
    print(paths[0].read_text(), end="")
    print(f"wrote {', '.join(map(str, paths))}")
    failed = [p.key for p in points if not results.done(p)]
    if failed:
        raise FGQError(
            f"{len(failed)} of {len(points)} points failed ({failed[0]}, ...): see {paths[0]}"
        )
    return 0


def _model_choice(text: str) -> tuple[str, str | None]:
    """``MODEL[=WEIGHTS]`` of ``fgq-tvm sweep``."""
    name, _, weights = text.partition("=")
    if not name or (weights == "" and text.endswith("=")):
        raise UsageError(f"expected MODEL or MODEL=WEIGHTS, not {text!r}")
    return name, weights or None


def _sweep_devices(args: argparse.Namespace) -> dict[str, object]:
    """The devices of ``fgq-tvm sweep`` by name (each is checked before each point)."""
    from .remote import LOCAL_DEVICE, RemoteDevice

    if not args.rpc_tracker:
        if args.rpc_key:
            raise UsageError("--rpc-key needs --rpc-tracker HOST:PORT")
        return {LOCAL_DEVICE.name: LOCAL_DEVICE}
    if not args.rpc_key:
        raise UsageError("--rpc-tracker needs --rpc-key KEY: the key its servers registered")
    devices = [RemoteDevice.parse(args.rpc_tracker, key) for key in args.rpc_key]
    return {device.name: device for device in devices}


def _sweep_images(args: argparse.Namespace, models: list[tuple[str, str | None]]) -> dict:
    """The evaluation images of each model of a sweep that has some (``--data``, else the
    CIFAR-10 evaluation split for 32x32 models)."""
    from .data import default_cifar_data, load_labelled_images

    images = {}
    for name, weights in models:
        spec = _load_model(name, weights, None)[1]
        data = args.data or default_cifar_data(spec)
        if data is not None:
            images[name] = load_labelled_images(data, spec, "eval", args.images)
    return images


def _finetune(args: argparse.Namespace) -> int:
    """``fgq-tvm finetune``: quantize, train through the quantizers, save, evaluate."""
    import torch

    from .compiler import quantize
    from .data import load_labelled_images
    from .finetune import (
        FinetuneConfig,
        finetune,
        finetune_checkpoint,
        finetune_record,
        finetune_settings,
        finetuned_accuracy,
        format_finetuned_accuracy,
    )

    progress = _progress_printer()
    output = _checked_output(args.output)
    json_output = _checked_output(args.json) if args.json else None
    if args.distillation < 0:
        raise UsageError(f"--distillation {args.distillation} is negative: use 0 or more")
    if args.calib is None and Path(args.data).suffix == ".npz":
        args.calib = args.data
    model, spec, quant, _, calibration = _model_inputs(args)
    if quant.method == "gptq":
        raise UsageError(
            "finetune trains through a fixed ternarizer; gptq adapts to each layer's inputs: "
            "use --method exact (finetune's default) or twn, and compile the checkpoint with it"
        )
    training = load_labelled_images(args.data, spec, "calib", args.images)
    images, labels = (torch.cat(parts) for parts in zip(*training.batches(1024), strict=True))
    quantized = quantize(model, spec, quant, calibration, progress)
    config = FinetuneConfig(
        epochs=args.epochs,
        minutes=args.minutes,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        distillation=args.distillation,
    )
    progress(f"fine-tune on {training.count} images of {training.description}")
    result = finetune(model, quantized.layers, images, labels, config, progress, quant.method)
    settings = finetune_settings(config, quant)
    checkpoint = finetune_checkpoint(result, settings)
    write_atomically(output, lambda file: torch.save(checkpoint, file))
    print(
        f"fine-tuned {len(result.epochs)} epochs in {result.seconds / 60:.1f} min; wrote {output}"
    )
    accuracies = None
    if Path(args.data).suffix == ".npz":
        tuned = quantize(result.model, spec, quant, calibration)
        eval_images = load_labelled_images(args.data, spec, "eval", args.images)
        accuracies = finetuned_accuracy(
            model, quantized, tuned, eval_images, progress, progress_bar_printer(PROG, "images")
        )
        print(format_finetuned_accuracy(accuracies, eval_images))
    if json_output is not None:
        record = finetune_record(spec.name, training.description, settings, result, accuracies)
        write_text_atomically(json_output, json.dumps(record, indent=2) + "\n")
    return 0


def _data_defaults(args: argparse.Namespace, model, spec):
    """The defaults of the settings that fit the calibration data of ``--calib``
    (:func:`~fgq_tvm.config.data_defaults`) for ``model``."""
    from .data import has_real_calibration
    from .models import macs_per_image

    return data_defaults(has_real_calibration(args.calib, spec), macs_per_image(model, spec))


def _quant_fields(args: argparse.Namespace) -> dict[str, object]:
    """The :class:`QuantConfig` fields the options give, parsed; those that default by the
    calibration data are left out unless given."""
    if not 0 < args.percentile <= 100:
        raise UsageError(f"percentile {args.percentile} is out of range: use 0 < P <= 100")
    fields = {
        "scales": args.scales,
        "method": args.method,
        "first_last": args.first_last,
        "first_last_act_bits": parse_act_bits(args.first_last_act_bits),
        "calibration": args.calibration,
        "percentile": args.percentile,
        "batchnorm": args.batchnorm,
        "reconstruction": args.reconstruction,
        "overrides": tuple(parse_override(text) for text in args.layer),
    }
    given = {name: value for name, value in fields.items() if value is not None}
    if "group_size" in args:  # else a sweep's: each point has its own
        # None is a group size: all channels of a layer
        given["group_size"] = parse_group_size(args.group_size)
        given["act_bits"] = parse_act_bits(args.act_bits)
    return given


def parse_input_shape(text: str) -> tuple[int, int, int, int]:
    """Parse ``--input-shape N,C,H,W`` into four positive integers.

    Raises
    ------
    UsageError
        If the text is not four comma-separated positive integers.
    """
    parts = text.split(",")
    if len(parts) != 4 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise UsageError(
            f"input shape {text!r} is malformed: write four positive integers N,C,H,W, "
            "e.g. 1,3,224,224"
        )
    batch, channels, height, width = (int(part) for part in parts)
    return batch, channels, height, width


def _load_model(
    name: str, weights: str | None, input_shape: tuple[int, int, int, int] | None
) -> tuple[nn.Module, ModelSpec]:
    """The model and its spec, with ``input_shape`` checked by one forward pass."""
    from .models import build_model, with_input_shape

    model, spec = build_model(name, weights)
    if input_shape is None:
        return model, spec
    return model, with_input_shape(model, spec, input_shape)


def _progress_printer() -> Callable[[str], None]:
    """The stage printer of every command (:func:`~fgq_tvm.reporting.progress_printer`)."""
    return progress_printer(PROG)


def _print_outputs(output: Path) -> None:
    from .runtime import sidecar_path

    print(f"wrote {output} ({output.stat().st_size / 1024:.1f} KiB) and {sidecar_path(output)}")


def _run(args: argparse.Namespace) -> int:
    """``fgq-tvm run``: run a module on a .npy batch, print the top-1 classes, save logits."""
    return run_npy(args.module, args.input, args.output, args.allow_nonfinite, PROG)


def _bundle(args: argparse.Namespace) -> int:
    """``fgq-tvm bundle``: the module, the TVM runtime and the loader in a new folder."""
    from .bundle import write_bundle

    written = write_bundle(args.module, args.output)
    print(f"wrote {written.folder}: {', '.join(written.files)} ({written.size_mb:.1f} MB)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """``fgq-tvm bench``: compile, prepare the peers, time them, print and write the tables."""
    from . import bench

    progress = _progress_printer()
    group_size, act_bits = parse_group_size(args.group_size), parse_act_bits(args.act_bits)
    device = _device(args)
    default_peers = "none" if args.rpc_tracker else "all"
    peers = bench.parse_peers(default_peers) if args.peers is None else args.peers
    target = _target(args.target)
    out_dir = output_folder(Path(args.out) if args.out else bench.default_out_dir(target))
    model, spec = _load_model(args.model, args.weights, None)
    defaults = _data_defaults(args, model, spec)
    # the kernels timed do not depend on how the weights were fitted: no reconstruction
    fitting = defaults.quant_fields() | {"reconstruction": "off"}
    quant = QuantConfig(group_size=group_size, act_bits=act_bits, scales=args.scales, **fitting)
    options = bench.BenchOptions(
        peers, args.repeats, args.warmup, args.threads, args.ghz, Path(args.tuning_logs),
        args.batches, device,
    )  # fmt: skip
    if args.rpc_tracker:
        progress(f"time fgq-tvm alone on an RPC server under {device.name} (no peers there)")
    result, paths = bench.bench_model(
        model, spec, quant, target, options, out_dir, args.calib, args.calib_images, progress,
        warn=lambda warning: print(f"{PROG}: warning: {warning}", file=sys.stderr, flush=True),
    )  # fmt: skip
    print(bench.format_markdown(result))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


def _checked_output(text: str) -> Path:
    """The output path, refused before any work if it cannot be written
    (:func:`~fgq_tvm.reporting.output_file`)."""
    return output_file(Path(text))

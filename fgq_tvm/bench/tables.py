"""The bench's Markdown and files: the latency table (:func:`peer_rows`), the throughput table
(:func:`throughput_rows`), the per-layer table (:func:`layer_rows`), the report
(:func:`format_markdown`) and its files (:func:`write_results`, in :func:`default_out_dir`),
and the summary of several models (:func:`summary_markdown`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..reporting import output_folder, write_text_atomically
from ..target import target_key
from ..timing import ratio
from .results import FGQ, FGQ_TUNED, PEERS, SHORT_LABELS, BenchResult, to_json

if TYPE_CHECKING:
    from tvm.target import Target


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table.

    Parameters
    ----------
    header
        The column names.
    rows
        The cells, row by row (each as many as ``header``).

    Returns
    -------
    str
        The table's lines, without a final newline.
    """
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}{suffix}"


PEER_COLUMNS = (
    "runtime", "median ms", "min ms", "x PyTorch FP32", "x PyTorch int8",
    "rel. error vs FP32", "note",
)  # fmt: skip
LAYER_COLUMNS = (
    "layer",
    "op",
    "weights",
    "core",
    "input",
    "MMACs",
    "median ms",
    "GMAC/s",
    "% of peak",
    "% of AMX peak",
)


def peer_rows(result: BenchResult) -> list[list[str]]:
    """Rows of the latency table (:data:`PEER_COLUMNS`).

    Parameters
    ----------
    result
        A bench run.

    Returns
    -------
    list of list of str
        One row per runtime: medians, ratios to PyTorch FP32 and int8, the error and the note;
        the status instead of times where a runtime has none.
    """
    torch_fp32, torch_int8 = (result.median_ms_of(key) for key in ("torch", "torch-int8"))
    rows = []
    for peer in result.peers:
        if peer.status != "ok":
            rows.append([peer.label, peer.status, "", "", "", "", peer.note])
            continue
        rows.append([
            peer.label, _number(peer.median_ms), _number(peer.min_ms),
            _number(ratio(peer.median_ms, torch_fp32), suffix="x"),
            _number(ratio(peer.median_ms, torch_int8), suffix="x"),
            f"{peer.rel_error:.1e}" if peer.rel_error is not None else "", peer.note,
        ])  # fmt: skip
    return rows


def throughput_columns(result: BenchResult) -> list[str]:
    """The header of the throughput table: the runtime, then images per second and the ratio
    to ONNX Runtime int8 at each batch of ``result.batches``."""
    columns = ["runtime"]
    for batch in result.batches:
        columns += [f"batch {batch} images/s", f"batch {batch} x ORT int8"]
    return columns


def throughput_rows(result: BenchResult) -> list[list[str]]:
    """Rows of the throughput table (:func:`throughput_columns`).

    Parameters
    ----------
    result
        A bench run with larger batches (``result.batches``).

    Returns
    -------
    list of list of str
        One row per runtime: images per second and the ratio of that to ONNX Runtime int8's
        (above 1: more images per second) at each batch; the status where a runtime has no
        time.
    """
    rows: dict[str, list[str]] = {}
    for batch, peers in result.batches.items():
        reference = next((peer for peer in peers if peer.key == "ort-int8"), None)
        reference_rate = reference.images_per_s(batch) if reference else None
        for peer in peers:
            row = rows.setdefault(peer.key, [peer.label])
            rate = peer.images_per_s(batch)
            if rate is None:
                row += [peer.status, ""]
            else:
                row += [_number(rate, 1), _number(ratio(rate, reference_rate), suffix="x")]
    return list(rows.values())


def layer_rows(result: BenchResult) -> list[list[str]]:
    """Rows of the per-layer table (:data:`LAYER_COLUMNS`), then a total row.

    Parameters
    ----------
    result
        A bench run.

    Returns
    -------
    list of list of str
        One row per quantized layer (its shares of the peaks empty where the clock is unknown
        or AMX was not measured), then ``**all layers**``.
    """
    peaks = (result.peak_gmacs, result.amx_peak_gmacs)
    rows = []
    for layer in result.layers:
        rate = layer.gmacs_per_s()
        rows.append([
            layer.name, layer.op, layer.weights, layer.core, "x".join(map(str, layer.input_shape)),
            _number(layer.macs / 1e6, 1), _number(layer.median_ms, 3), _number(rate, 1),
            *_shares(rate, peaks),
        ])  # fmt: skip
    macs = sum(layer.macs for layer in result.layers)
    seconds = sum(layer.median_ms for layer in result.layers)
    rate = macs / (seconds * 1e6) if seconds else None
    rows.append(["**all layers**", "", "", "", "", _number(macs / 1e6, 1), _number(seconds, 3),
                 _number(rate, 1), *_shares(rate, peaks)])  # fmt: skip
    return rows


def _shares(rate: float | None, peaks: tuple[float | None, ...]) -> list[str]:
    """``rate`` in percent of each of ``peaks`` (empty where either is unknown)."""
    return [_number(100 * ratio(rate, peak), 1) if peak and rate else "" for peak in peaks]


def format_markdown(result: BenchResult) -> str:
    """The markdown report: set-up, latency table, size, per-layer kernel table.

    Parameters
    ----------
    result
        A bench run.

    Returns
    -------
    str
    """
    quant = result.quantization
    env = result.environment
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    loads = ", ".join(_number(value) for value in env["load_average_1min"])
    peak = result.peak_gmacs
    peak_text = (
        f"{result.macs_per_cycle} MACs/cycle/core x {result.threads} cores x "
        f"{result.ghz:.2f} GHz ({result.ghz_source}) = {peak:.0f} GMAC/s"
        if peak
        else "unknown: the clock is unknown, pass --ghz"
    )
    fgq = result.peer(FGQ)
    fgq_rate = ratio(
        sum(layer.macs for layer in result.layers) / 1e6, fgq.median_ms if fgq else None
    )
    lines = [
        f"# {result.model}: fgq-tvm against its peers",
        "",
        f"Batch 1, {result.threads} threads per runtime, target `{result.target}`, "
        f"{_machine(env)}. fgq-tvm: N={quant['group_size']}, "
        f"{quant['act_bits']}-bit activations, {quant['scales']} group scales, "
        f"first/last layer {quant['first_last']}. "
        f"Calibration: {result.calibration}. Median of {result.repeats} runs after "
        f"{result.warmup} warm-up runs, on the same input, interleaved: in each round every "
        "runtime makes one untimed and one timed run after a pause; "
        f"{env['date']}; load average {loads} (start, end); {versions}.",
        "",
        "`x PyTorch FP32` and `x PyTorch int8` are latency ratios (above 1: slower). The "
        "relative error is max|y - y_fp32| / max|y_fp32| of the logits on the timed input (the "
        "weights may be random: this is no accuracy measurement).",
        "",
        markdown_table(PEER_COLUMNS, peer_rows(result)),
        "",
        f"Size: the fgq-tvm `.so` is {result.so_bytes / 1e6:.2f} MB against "
        f"{result.fp32_param_bytes / 1e6:.2f} MB of FP32 parameters "
        f"({_number(ratio(result.so_bytes, result.fp32_param_bytes))}x); compiled in "
        f"{result.compile_s:.1f} s.",
        "",
        *_throughput_section(result),
        "## Quantized layers, each kernel timed standalone",
        "",
        f"int8 VNNI peak: {peak_text}. AMX int8 peak: {_amx_peak_text(result)}. Whole model "
        f"through fgq-tvm: {_number(fgq_rate, 1)} GMAC/s.",
        "",
        markdown_table(LAYER_COLUMNS, layer_rows(result)),
    ]
    return "\n".join(lines) + "\n"


def _amx_peak_text(result: BenchResult) -> str:
    """The measured AMX peak and how it was measured, or why it was not."""
    if result.amx_peak_gmacs is None:
        return result.amx_peak_source
    return f"{result.amx_peak_gmacs:.0f} GMAC/s, {result.amx_peak_source}"


def _machine(env: dict) -> str:
    """Where the run timed: this machine's CPU, or the remote device fgq-tvm ran on."""
    here = f"{env['cpu']} ({env['cpu_count']} CPUs)"
    if "device" not in env:
        return here
    return f"on the RPC server under {env['device']}, timed by its clock (built on {here})"


def _throughput_section(result: BenchResult) -> list[str]:
    """The throughput table's lines, or none without larger batches."""
    if not result.batches:
        return []
    return [
        "## Throughput at larger batches",
        "",
        "Each batch on a random input of its own, every runtime prepared for it again (fgq-tvm "
        "compiles the same quantized model for that input shape), timed like batch 1 in rounds "
        "of their own; images per second from the median.",
        "",
        markdown_table(throughput_columns(result), throughput_rows(result)),
        "",
    ]


def target_text(target: Target) -> str:
    """A target as users write it: ``llvm -mcpu=znver4 -mattr=+avx2``.

    Parameters
    ----------
    target
        The target.

    Returns
    -------
    str
    """
    words = [str(target.kind.name)]
    for key in ("mtriple", "mcpu", "mabi"):
        value = target.attrs.get(key)
        if value:
            words.append(f"-{key}={value}")
    features = target.attrs.get("mattr")
    if features:
        words.append("-mattr=" + ",".join(str(feature) for feature in features))
    return " ".join(words)


def default_out_dir(target: Target) -> Path:
    """Where ``fgq-tvm bench`` writes its results by default.

    Parameters
    ----------
    target
        The target benched.

    Returns
    -------
    Path
        ``benchmarks/results/<target key>`` (relative to the working directory).
    """
    return Path("benchmarks") / "results" / target_key(target)


def write_results(result: BenchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<out_dir>/<model>.md`` (:func:`format_markdown`) and ``.json``
    (:func:`~fgq_tvm.bench.results.to_json`).

    Parameters
    ----------
    result
        A bench run.
    out_dir
        The folder; created where missing.

    Returns
    -------
    markdown, data
        The paths of both files.

    Raises
    ------
    FGQError
        ``out_dir`` exists and is not a folder, or cannot be created.
    """
    output_folder(out_dir)
    markdown, data = out_dir / f"{result.model}.md", out_dir / f"{result.model}.json"
    write_text_atomically(markdown, format_markdown(result))
    write_text_atomically(data, json.dumps(to_json(result), indent=2) + "\n")
    return markdown, data


def summary_markdown(results: Sequence[dict]) -> str:
    """One table of the median latencies of several models, from their JSON results.

    Parameters
    ----------
    results
        Dicts written by :func:`write_results` (:func:`~fgq_tvm.bench.results.to_json`), one
        per model.

    Returns
    -------
    str
        A markdown table: one row per model, one column per runtime (ms), ``n/a`` or the
        status where a runtime has no time, and a footnote per distinct set-up.
    """
    keys = [FGQ, FGQ_TUNED, *PEERS]
    header = ["model", *(f"{SHORT_LABELS[key]} ms" for key in keys), "fgq-tvm / PyTorch FP32"]
    rows = []
    for data in sorted(results, key=lambda data: data["model"]):
        peers = {peer["key"]: peer for peer in data["peers"]}
        cells = [_summary_cell(peers.get(key)) for key in keys]
        fgq_ratio = peers.get(FGQ, {}).get("ratio_to_torch_fp32")
        rows.append([data["model"], *cells, _number(fgq_ratio, suffix="x")])
    setups = sorted(
        {
            f"target `{data['target']}`, {data['threads']} threads, median of "
            f"{data['repeats']} runs, {data['environment']['cpu']}"
            for data in results
        }
    )
    notes = "\n".join(f"- {setup}" for setup in setups)
    return f"{markdown_table(header, rows)}\n\nBatch 1; measured with:\n{notes}\n"


def _summary_cell(peer: dict | None) -> str:
    if peer is None:
        return "not measured"
    if peer["status"] != "ok":
        return peer["status"]
    return _number(peer["median_ms"])

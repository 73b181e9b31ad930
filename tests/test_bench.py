"""Tests of ``fgq-tvm bench``: the statistics and table helpers on synthetic numbers, the
peers' "not installed" and "n/a" rows, the command-line error path, and one smoke run on the
CIFAR ResNet-20 with only the cheap peers (marked slow: it compiles the model, about 25 s).
"""

import json
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
from helpers import fgq_tvm

from fgq_tvm import bench, timing
from fgq_tvm.bench import BenchResult, LayerResult, PeerResult, tables
from fgq_tvm.bench.peers import PREPARE, prepare_fgq_tuned, prepared, relative_error
from fgq_tvm.errors import FGQError, UsageError
from fgq_tvm.target import parse_target


def synthetic_result(ghz: float | None = 2.0) -> BenchResult:
    """A result with known times: fgq 10 ms, PyTorch FP32 20 ms, PyTorch int8 5 ms."""
    peers = [
        PeerResult("fgq", bench.LABELS["fgq"], "ok", "compiled", [9.0, 10.0, 11.0], 0.5),
        PeerResult("fgq-tuned", bench.LABELS["fgq-tuned"], "n/a", "no tuning database"),
        PeerResult("torch", bench.LABELS["torch"], "ok", "", [30.0, 20.0, 19.0], 0.0),
        PeerResult("torch-int8", bench.LABELS["torch-int8"], "ok", "", [5.0], 0.01),
        PeerResult("ort", bench.LABELS["ort"], "not installed", "pip install"),
    ]
    layers = [
        LayerResult("conv1", "conv2d", "int8", "bitplane", (1, 3, 8, 8), 2_000_000, 0.1),
        LayerResult("fc", "linear", "int8", "bitplane", (1, 64, 1, 1), 64_000, 0.002),
    ]
    return BenchResult(
        model="toy",
        target="llvm -mcpu=znver4",
        target_key="llvm-znver4",
        quantization={"group_size": 4, "act_bits": 8, "scales": "float", "first_last": "int8"},
        threads=2,
        repeats=3,
        warmup=1,
        calibration="8 random normal images (fixed seed)",
        peers=peers,
        layers=layers,
        so_bytes=1_000_000,
        fp32_param_bytes=4_000_000,
        compile_s=1.5,
        ghz=ghz,
        ghz_source="--ghz",
        environment={
            "cpu": "Example CPU",
            "cpu_count": 2,
            "load_average_1min": [0.5, 0.75],
            "versions": {"fgq_tvm": "0.1.0"},
            "date": "2026-01-01 00:00 UTC",
        },
    )


# --- helpers --------------------------------------------------------------------------------


def test_median_of_odd_and_even_counts():
    assert timing.median([3.0, 1.0, 2.0]) == 2.0
    assert timing.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        timing.median([])


def test_ratio_is_none_without_a_usable_reference():
    assert timing.ratio(10.0, 20.0) == 0.5
    assert timing.ratio(None, 20.0) is None
    assert timing.ratio(10.0, None) is None
    assert timing.ratio(10.0, 0.0) is None


def test_relative_error():
    assert relative_error([[1.0, -2.0]], [[1.0, -4.0]]) == 0.5
    assert relative_error([1.0, 2.0], [1.0]) == float("inf")
    assert relative_error([float("nan")], [1.0]) == float("inf")


def test_parameter_bytes():
    from torch import nn

    assert bench.fp32_parameter_bytes(nn.Linear(3, 2)) == (3 * 2 + 2) * 4


def test_parse_peers():
    assert bench.parse_peers("all") == bench.PEERS
    assert bench.parse_peers("none") == ()
    assert bench.parse_peers("ort, torch,torch") == ("torch", "ort")
    with pytest.raises(UsageError, match="'onnx'"):
        bench.parse_peers("torch,onnx")


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"peers": ("torch", "onnx")}, "unknown peers 'onnx'"),
        ({"repeats": 0}, "repeats must be an integer of at least 1, got 0"),
        ({"warmup": -1}, "warmup must be an integer of at least 0"),
        ({"threads": 1.5}, "threads must be an integer of at least 1"),
        ({"ghz": 0.0}, "clock must be a positive number"),
        ({"ghz": float("nan")}, "clock must be a positive number"),
    ],
)
def test_bench_options_refuse_what_cannot_be_timed(options, problem):
    with pytest.raises(UsageError, match=problem):
        bench.BenchOptions(**options)


def test_runtimes_are_timed_in_interleaved_rounds():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = timing.time_rounds(runs, repeats=3, warmup=2, settle_s=0)
    assert {name: len(values) for name, values in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for values in times.values() for t in values)
    assert calls == ["a", "a", "b", "b"] + ["a", "a", "b", "b"] * 3  # warm-up, then rounds


# --- tables ---------------------------------------------------------------------------------


def test_peer_rows_give_medians_and_ratios():
    rows = {row[0]: row for row in tables.peer_rows(synthetic_result())}
    assert rows[bench.LABELS["fgq"]][1:5] == ["10.00", "9.00", "0.50x", "2.00x"]
    assert rows[bench.LABELS["torch"]][1:5] == ["20.00", "19.00", "1.00x", "4.00x"]
    assert rows[bench.LABELS["fgq-tuned"]][1] == "n/a"
    assert rows[bench.LABELS["ort"]][1] == "not installed"
    assert all(len(row) == len(tables.PEER_COLUMNS) for row in rows.values())


def test_throughput_rows_give_images_per_second_against_onnx_runtime_int8():
    result = synthetic_result()
    result.batches = {
        8: [
            PeerResult("fgq", bench.LABELS["fgq"], "ok", "", [20.0, 19.0, 21.0]),
            PeerResult("ort-int8", bench.LABELS["ort-int8"], "ok", "", [40.0]),
            PeerResult("torch", bench.LABELS["torch"], "failed", "RuntimeError: boom"),
        ],
        32: [
            PeerResult("fgq", bench.LABELS["fgq"], "ok", "", [64.0]),
            PeerResult("ort-int8", bench.LABELS["ort-int8"], "ok", "", [128.0]),
            PeerResult("torch", bench.LABELS["torch"], "ok", "", [320.0]),
        ],
    }
    assert tables.throughput_columns(result)[1:3] == ["batch 8 images/s", "batch 8 x ORT int8"]
    rows = {row[0]: row[1:] for row in tables.throughput_rows(result)}
    assert rows[bench.LABELS["fgq"]] == ["400.0", "2.00x", "500.0", "2.00x"]
    assert rows[bench.LABELS["ort-int8"]] == ["200.0", "1.00x", "250.0", "1.00x"]
    assert rows[bench.LABELS["torch"]] == ["failed", "", "100.0", "0.40x"]
    data = bench.to_json(result)
    assert data["batches"][32][0]["images_per_s"] == 500.0
    assert "## Throughput at larger batches" in bench.format_markdown(result)
    assert "Throughput" not in bench.format_markdown(synthetic_result())


def test_parse_batches():
    assert bench.parse_batches("8,32") == (8, 32)
    assert bench.parse_batches("32, 8,32") == (32, 8)
    assert bench.parse_batches("none") == ()
    for text in ("1", "0", "eight", "512", "8,,32"):
        with pytest.raises(UsageError, match="give batches of 2 to 256 images"):
            bench.parse_batches(text)


def test_layer_rows_give_mac_rates_against_the_peaks():
    rows = tables.layer_rows(synthetic_result(ghz=2.0))  # peak 64 x 2 x 2 = 256 GMAC/s
    assert rows[0][5:] == ["2.0", "0.100", "20.0", "7.8", ""]  # AMX not measured
    assert rows[-1][0] == "**all layers**"
    assert rows[-1][5:7] == ["2.1", "0.102"]
    no_clock = tables.layer_rows(synthetic_result(ghz=None))
    assert no_clock[0][-2:] == ["", ""]
    amx = replace(synthetic_result(ghz=None), amx_peak_gmacs=1000.0, amx_peak_source="measured")
    assert tables.layer_rows(amx)[0][-2:] == ["", "2.0"]
    data = bench.to_json(amx)
    assert data["layers"][0]["fraction_of_amx_peak"] == pytest.approx(0.02)
    assert "AMX int8 peak: 1000 GMAC/s, measured." in bench.format_markdown(amx)
    assert "AMX int8 peak: not measured." in bench.format_markdown(synthetic_result())


def test_json_and_markdown_carry_the_same_numbers():
    result = synthetic_result()
    data = bench.to_json(result)
    fgq = data["peers"][0]
    assert fgq["median_ms"] == 10.0 and fgq["ratio_to_torch_fp32"] == 0.5
    assert fgq["ratio_to_torch_int8"] == 2.0
    assert data["peers"][1]["median_ms"] is None
    assert data["peak_gmacs_per_s"] == 256.0
    assert data["layers"][0]["gmacs_per_s"] == pytest.approx(20.0)
    assert data["size_ratio"] == 0.25
    json.dumps(data)
    markdown = bench.format_markdown(result)
    assert "| " + " | ".join(tables.PEER_COLUMNS) + " |" in markdown
    assert "| " + " | ".join(tables.LAYER_COLUMNS) + " |" in markdown
    assert "= 256 GMAC/s" in markdown and "(0.25x)" in markdown


def test_write_results_refuses_a_file_as_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FGQError, match="cannot create"):
        bench.write_results(synthetic_result(), tmp_path / "file" / "sub")
    markdown, data = bench.write_results(synthetic_result(), tmp_path / "new")
    assert markdown.name == "toy.md" and json.loads(data.read_text())["model"] == "toy"


# --- peers that cannot run ------------------------------------------------------------------


def test_missing_onnxruntime_reads_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    for key in ("ort", "ort-int8"):
        row = prepared(key, lambda key=key: PREPARE[key](None))
        assert (row.key, row.status) == (key, "not installed")
        assert "fgq-tvm[bench]" in row.note


def test_tuned_row_is_not_available_without_a_database(tmp_path):
    setup = SimpleNamespace(target=parse_target("llvm -mcpu=znver4"), tuning_logs=tmp_path)
    row = prepared("fgq-tuned", lambda: prepare_fgq_tuned(setup))
    assert row.status == "n/a" and "llvm-znver4" in row.note


def test_a_failing_peer_is_reported_not_raised():
    def broken():
        raise RuntimeError("exporter broke\nmore detail")

    row = prepared("torch-int8", broken)
    assert (row.status, row.note) == ("failed", "RuntimeError: exporter broke")


# --- command line ---------------------------------------------------------------------------


def test_bad_peers_value_is_one_usage_error(tmp_path):
    result = fgq_tvm("bench", "cifar_resnet20", "--peers", "torch,tensorrt", "--out", tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fgq-tvm: error: "), result.stderr
    assert "'tensorrt'" in lines[0] and "torch-int8" in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_bench_smoke_run_writes_both_tables(tmp_path):
    result = fgq_tvm(
        "bench", "cifar_resnet20", "--repeats", "2", "--warmup", "1", "--peers", "torch",
        "--calib-images", "8", "--ghz", "2.5", "--out", tmp_path, "--batches", "4",
        "--tuning-logs", tmp_path / "no-tuning-logs",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    markdown = (tmp_path / "cifar_resnet20.md").read_text()
    data = json.loads((tmp_path / "cifar_resnet20.json").read_text())
    assert "| " + " | ".join(tables.PEER_COLUMNS) + " |" in markdown
    assert "| " + " | ".join(tables.LAYER_COLUMNS) + " |" in markdown
    assert markdown in result.stdout
    assert [peer["key"] for peer in data["peers"]] == ["fgq", "fgq-tuned", "torch"]
    fgq, tuned, torch_fp32 = data["peers"]
    assert fgq["status"] == torch_fp32["status"] == "ok" and tuned["status"] == "n/a"
    assert len(fgq["times_ms"]) == 2 and fgq["median_ms"] > 0
    assert torch_fp32["ratio_to_torch_fp32"] == 1.0 and torch_fp32["rel_error"] == 0.0
    assert fgq["ratio_to_torch_int8"] is None
    assert data["peak_gmacs_per_s"] == data["macs_per_cycle"] * 2 * 2.5 and data["threads"] == 2
    assert data["so_bytes"] > 0 and data["fp32_param_bytes"] > data["so_bytes"] / 10
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert len(layers) == 20 and layers["linear"]["input_shape"] == [1, 64, 1, 1]
    assert layers["layer2.0.conv2"]["input_shape"] == [1, 32, 16, 16]
    assert all(layer["gmacs_per_s"] > 0 for layer in layers.values())
    batch_fgq, batch_tuned, batch_torch = data["batches"]["4"]
    assert batch_fgq["status"] == batch_torch["status"] == "ok" and batch_tuned["status"] == "n/a"
    assert batch_fgq["rel_error"] < 0.5 and batch_fgq["images_per_s"] > 0
    assert "| runtime | batch 4 images/s | batch 4 x ORT int8 |" in markdown


def test_summary_has_one_row_per_model():
    first = bench.to_json(synthetic_result())
    second = {**first, "model": "another", "peers": first["peers"][:1]}
    summary = bench.summary_markdown([first, second])
    lines = summary.splitlines()
    assert lines[0].startswith("| model | fgq-tvm ms | fgq-tvm tuned ms | PyTorch FP32 ms |")
    assert lines[2].startswith("| another | 10.00 | not measured |")
    assert lines[3] == (
        "| toy | 10.00 | n/a | 20.00 | 5.00 | not installed | not measured | not measured | 0.50x |"
    )
    assert summary.count("target `llvm -mcpu=znver4`") == 1

"""What ``fgq-tvm bench`` measures: the runtimes it names (:data:`PEERS`, :data:`LABELS`), one
row per runtime (:class:`PeerResult`) and per quantized layer (:class:`LayerResult`), the whole
run (:class:`BenchResult`) and its JSON form (:func:`to_json`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..cpu_features import VNNI_MACS_PER_CYCLE, vnni_peak_gmacs
from ..timing import median, ratio

PEERS = ("torch", "torch-int8", "ort", "ort-int8", "tvm-fp32")
"""Peers that ``--peers`` can select, in table order (fgq-tvm's own rows always come first)."""
FGQ = "fgq"
FGQ_TUNED = "fgq-tuned"
LABELS = {
    FGQ: "fgq-tvm (default schedules)",
    FGQ_TUNED: "fgq-tvm tuned",
    "torch": "PyTorch FP32 eager",
    "torch-int8": "PyTorch int8 (FX graph mode, x86, eager)",
    "ort": "ONNX Runtime FP32",
    "ort-int8": "ONNX Runtime int8 (static QDQ, per-channel)",
    "tvm-fp32": "TVM FP32 (MetaSchedule)",
}
SHORT_LABELS = {
    FGQ: "fgq-tvm",
    FGQ_TUNED: "fgq-tvm tuned",
    "torch": "PyTorch FP32",
    "torch-int8": "PyTorch int8",
    "ort": "ORT FP32",
    "ort-int8": "ORT int8",
    "tvm-fp32": "TVM FP32",
}
NOT_INSTALLED = "not installed"
NOT_AVAILABLE = "n/a"


@dataclass
class PeerResult:
    """One row of the latency table.

    Attributes
    ----------
    key
        ``"fgq"``, ``"fgq-tuned"`` or one of :data:`PEERS`.
    label
        The runtime as the table names it.
    status
        ``"ok"``, ``"not installed"``, ``"n/a"`` or ``"failed"``.
    note
        How it was built, or why it has no time.
    times_ms
        Every timed run, in milliseconds (empty unless ``status == "ok"``).
    rel_error
        ``max |y - y_fp32| / max |y_fp32|`` of its logits against PyTorch FP32 on the timed
        input.
    """

    key: str
    label: str
    status: str
    note: str = ""
    times_ms: list[float] = field(default_factory=list)
    rel_error: float | None = None

    @property
    def median_ms(self) -> float | None:
        """The median of :attr:`times_ms` (None without times)."""
        return median(self.times_ms) if self.times_ms else None

    @property
    def min_ms(self) -> float | None:
        """The fastest of :attr:`times_ms` (None without times)."""
        return min(self.times_ms) if self.times_ms else None

    def images_per_s(self, batch: int) -> float | None:
        """Throughput at ``batch`` images per run: ``batch`` over :attr:`median_ms`, per second
        (None without times)."""
        return batch / (self.median_ms / 1e3) if self.median_ms else None


@dataclass
class LayerResult:
    """One quantized layer's kernel, timed standalone.

    Attributes
    ----------
    name, op
        The layer's name in the model and its operator (``conv2d`` or ``linear``).
    weights
        Its weight encoding (``ternary N=4``, ``int8``...).
    core
        The kernel core that computes it.
    input_shape
        Its NCHW input shape.
    macs
        Multiply-accumulates of one call.
    median_ms
        The median time of one call, in milliseconds.
    """

    name: str
    op: str
    weights: str
    core: str
    input_shape: tuple[int, ...]
    macs: int
    median_ms: float

    def gmacs_per_s(self) -> float:
        """The kernel's rate: :attr:`macs` per :attr:`median_ms`, in GMAC/s."""
        return self.macs / (self.median_ms * 1e6)


@dataclass
class BenchResult:
    """Everything one bench run measured (see :func:`to_json` for the file format).

    Attributes
    ----------
    model, target, target_key
        The model's name, the target as users write it and its folder name.
    quantization
        fgq-tvm's quantization, as the sidecar records it.
    threads, repeats, warmup
        Threads of every runtime, timed and untimed runs.
    calibration
        Where the calibration images came from.
    peers, layers
        The latency rows at batch 1 (fgq-tvm's first) and the per-layer kernel rows.
    so_bytes, fp32_param_bytes
        Size of fgq-tvm's ``.so`` and of the model's parameters as float32.
    compile_s
        fgq-tvm's compile time, in seconds.
    ghz, ghz_source
        The clock of the int8 peak (None where unknown) and where it came from.
    environment
        CPU, versions, thread counts, load average and date (see
        :func:`~fgq_tvm.bench.describe_environment`).
    macs_per_cycle
        int8 MACs per cycle per core of the target's CPU
        (:func:`~fgq_tvm.cpu_features.vnni_macs_per_cycle`).
    batches
        ``batch -> rows`` of the same runtimes timed at larger batches (throughput), each
        batch in its own interleaved rounds.
    amx_peak_gmacs, amx_peak_source
        The AMX int8 peak of :attr:`threads` cores in GMAC/s, measured by fgq-tvm's
        microbenchmark (:func:`~fgq_tvm.bench.amx_peak.measure_amx_peak`), and how; None, and
        why not, where it was not measured.
    """

    model: str
    target: str
    target_key: str
    quantization: dict
    threads: int
    repeats: int
    warmup: int
    calibration: str
    peers: list[PeerResult]
    layers: list[LayerResult]
    so_bytes: int
    fp32_param_bytes: int
    compile_s: float
    ghz: float | None
    ghz_source: str
    environment: dict
    macs_per_cycle: int = VNNI_MACS_PER_CYCLE
    batches: dict[int, list[PeerResult]] = field(default_factory=dict)
    amx_peak_gmacs: float | None = None
    amx_peak_source: str = "not measured"

    def peer(self, key: str) -> PeerResult | None:
        """The row of the runtime ``key``, or None where it was not measured."""
        return next((peer for peer in self.peers if peer.key == key), None)

    def median_ms_of(self, key: str) -> float | None:
        """The median time of the runtime ``key``, or None where it has none."""
        peer = self.peer(key)
        return peer.median_ms if peer else None

    @property
    def peak_gmacs(self) -> float | None:
        """The int8 peak of :attr:`threads` cores at :attr:`ghz`, in GMAC/s (None where the
        clock is unknown)."""
        if not self.ghz:
            return None
        return vnni_peak_gmacs(self.ghz, self.threads, self.macs_per_cycle)


def to_json(result: BenchResult) -> dict:
    """The JSON form of a result: its fields plus medians, ratios, MAC rates and the peak.

    Parameters
    ----------
    result
        A bench run.

    Returns
    -------
    dict
        Plain data for :func:`json.dumps`.
    """
    data = asdict(result)
    torch_fp32, torch_int8 = (result.median_ms_of(key) for key in ("torch", "torch-int8"))
    for row, peer in zip(data["peers"], result.peers, strict=True):
        row["median_ms"] = peer.median_ms
        row["min_ms"] = peer.min_ms
        row["ratio_to_torch_fp32"] = ratio(peer.median_ms, torch_fp32)
        row["ratio_to_torch_int8"] = ratio(peer.median_ms, torch_int8)
    for batch, rows in result.batches.items():
        for row, peer in zip(data["batches"][batch], rows, strict=True):
            row["median_ms"] = peer.median_ms
            row["images_per_s"] = peer.images_per_s(batch)
    peak = result.peak_gmacs
    for row, layer in zip(data["layers"], result.layers, strict=True):
        row["gmacs_per_s"] = layer.gmacs_per_s()
        row["fraction_of_peak"] = ratio(layer.gmacs_per_s(), peak)
        row["fraction_of_amx_peak"] = ratio(layer.gmacs_per_s(), result.amx_peak_gmacs)
    data["peak_gmacs_per_s"] = peak
    data["size_ratio"] = ratio(result.so_bytes, result.fp32_param_bytes)
    return data

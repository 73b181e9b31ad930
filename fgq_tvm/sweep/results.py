"""A sweep's results: the append-only record of every point, and the tables and plot made
from it.

``points.jsonl`` gets one line per point as it finishes (or fails), appended whole under a lock
(:class:`~fgq_tvm.jsonlines.JSONLines`): a sweep killed at any moment loses only the point in
progress, and a rerun reads which points are done. ``sweep.md``, ``sweep.json``, ``sweep.csv``
and ``sweep.png`` (top-1 drop against latency: the trade-off a user picks from) are made anew
from it after each point, each written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from ..jsonlines import JSONLines
from ..reporting import write_atomically, write_text_atomically
from .points import PointResult, SweepPoint

POINTS = "points.jsonl"
OUTPUTS = ("sweep.md", "sweep.json", "sweep.csv", "sweep.png")
COLUMNS = (
    ("point", lambda r: r.point.label),
    ("target", lambda r: r.point.target),
    ("device", lambda r: r.point.device),
    ("latency (ms)", lambda r: _number(r.latency_ms, 3)),
    ("spread (ms)", lambda r: _number(r.spread_ms, 3)),
    ("top-1 (%)", lambda r: _number(r.top1 and 100 * r.top1, 2)),
    ("drop (points)", lambda r: _number(r.drop, 2)),
    ("module (KiB)", lambda r: _number(r.module_bytes and r.module_bytes / 1024, 1)),
    ("tuned kernels", lambda r: "" if r.error else f"{r.tuned_kernels}/{r.kernels}"),
    ("seconds", lambda r: _number(r.seconds, 0)),
    ("error", lambda r: r.error or ""),
)


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


class SweepResults:
    """The results of a sweep in ``folder``: those of earlier runs, read when opened, and those
    added since.

    Attributes
    ----------
    skipped
        ``file:line: reason`` of each unreadable line of ``points.jsonl`` (not used).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lines = JSONLines(folder / POINTS)
        self.skipped: list[str] = []
        self.latest: dict[str, PointResult] = {}
        for number, value in self.lines.read(self.skipped):
            try:
                result = PointResult.from_json(value)
            except (TypeError, ValueError) as error:
                self.skipped.append(f"{self.lines.path}:{number}: {error}")
                continue
            self.latest[result.point.key] = result

    def done(self, point: SweepPoint) -> bool:
        """Whether the point was measured (a failed point is tried again)."""
        result = self.latest.get(point.key)
        return result is not None and result.done

    def add(self, result: PointResult) -> None:
        """Append ``result`` to ``points.jsonl``."""
        self.lines.append(result.to_json())
        self.latest[result.point.key] = result

    def write_outputs(self, points: Sequence[SweepPoint]) -> list[Path]:
        """Write the tables and the plot of ``points`` (those with a result, in order)."""
        results = [self.latest[p.key] for p in points if p.key in self.latest]
        paths = [self.folder / name for name in OUTPUTS]
        markdown, data, table, plot = paths
        write_text_atomically(markdown, format_markdown(results))
        document = [result.to_json() | {"drop": result.drop} for result in results]
        write_text_atomically(data, json.dumps(document, indent=1) + "\n")
        write_text_atomically(table, format_csv(results))
        plot_tradeoff(results, plot)
        return paths


def format_markdown(results: Sequence[PointResult]) -> str:
    """A Markdown table, one row per point."""
    lines = [
        "# Sweep",
        "",
        "Latency: median of the rounds on the device, batch of the module. Drop: top-1 of the "
        "compiled module against the full-precision model on the same images.",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    for result in results:
        lines.append("| " + " | ".join(cell(result) for _, cell in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def format_csv(results: Sequence[PointResult]) -> str:
    """The same table as CSV."""
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow([name for name, _ in COLUMNS])
    for result in results:
        writer.writerow([cell(result) for _, cell in COLUMNS])
    return text.getvalue()


def plot_tradeoff(results: Sequence[PointResult], path: Path) -> None:
    """A PNG of top-1 drop against latency, one marker per measured point, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    measured = [r for r in results if r.latency_ms is not None and r.drop is not None]
    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=120)
    for device in sorted({r.point.device for r in measured}):
        on_device = [r for r in measured if r.point.device == device]
        axes.scatter([r.latency_ms for r in on_device], [r.drop for r in on_device], label=device)
        for result in on_device:
            axes.annotate(result.point.label, (result.latency_ms, result.drop), fontsize=7)
    axes.set_xlabel("latency (ms, median)")
    axes.set_ylabel("top-1 drop (points)")
    axes.set_title("accuracy against speed" if measured else "no point with both yet", fontsize=9)
    axes.grid(alpha=0.3)
    if measured:
        axes.legend(fontsize=7)
    figure.tight_layout()
    write_atomically(path, lambda file: figure.savefig(file, format="png"))
    pyplot.close(figure)

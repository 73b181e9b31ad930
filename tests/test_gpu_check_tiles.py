"""benchmarks/gpu_check.py's tile search on a machine without a GPU: a variant that fails, or a
process that dies, costs only the rest of its layer; the other layers are still measured and
the table says what failed. (The GPU part, gemm_tiles.run, is replaced by a stand-in that
fails where the manifest says so.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
STAND_IN = """

def run(folder, start=0, write=print):  # the stand-in for the GPU part
    import os

    for entry in json.loads((folder / MANIFEST).read_text())[start:]:
        if entry["layer"] == "dies":
            os._exit(9)
        rows = []
        for symbol in entry["variants"]:
            row = {"layer": entry["layer"], "tiles": symbol}
            if symbol == "faults":
                write([*rows, {**row, "error": "an illegal memory access was encountered"}])
                raise VariantFault(entry["layer"] + " " + symbol)
            rows.append({**row, "ms": 1.0, "tops": 2.0, "agrees": True, "vs_default": 1.0})
        write(rows)
"""


def test_the_tile_search_goes_on_after_a_failing_variant_and_a_dying_process(tmp_path, capsys):
    folder = tmp_path / "gpu_check"
    (folder / "gemm_tiles").mkdir(parents=True)
    shutil.copy2(BENCHMARKS / "gpu_check.py", folder)
    (folder / "gemm_tiles.py").write_text((BENCHMARKS / "gemm_tiles.py").read_text() + STAND_IN)
    manifest = [
        {"layer": "first", "variants": ["t64", "t32"]},
        {"layer": "second", "variants": ["t64", "faults", "t128"]},
        {"layer": "dies", "variants": ["t64"]},
        {"layer": "last", "variants": ["t64"]},
    ]
    (folder / "gemm_tiles" / "gemm_tiles.json").write_text(json.dumps(manifest))
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(
            "gpu_check_under_test", folder / "gpu_check.py"
        )
        gpu_check = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gpu_check)
        gpu_check._tile_search(folder, tmp_path / "results")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("gemm_tiles", None)
    rows = json.loads((tmp_path / "results" / "gemm-tiles.json").read_text())
    measured = [(row["layer"], row["tiles"]) for row in rows if "error" not in row]
    assert measured == [("first", "t64"), ("first", "t32"), ("second", "t64"), ("last", "t64")]
    failed = {row["layer"]: row["error"] for row in rows if "error" in row}
    assert failed == {
        "second": "an illegal memory access was encountered",
        "dies": "its process ended before any variant ran",
    }
    table = (tmp_path / "results" / "gemm-tiles.md").read_text()
    assert "| second | faults | failed: an illegal memory access was encountered |" in table
    printed = capsys.readouterr().out
    assert "a variant failed: second faults" in printed
    assert "its process ended with exit code 9" in printed

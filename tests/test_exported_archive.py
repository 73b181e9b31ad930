"""fgq_tvm.exported_archive: ``.pt2`` files are read without running code from them.

Each crafted archive is a real ``torch.export.save`` file of a tiny CNN with one member
replaced or added, the way an attacker would build it: a pickle whose loading creates a marker
file. ``torch.export.load`` alone runs it (checked first, so the crafted archive is known to
be live); fgq-tvm must refuse it with one line and leave no marker.
"""

from __future__ import annotations

import builtins
import json
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from fgq_tvm.errors import FGQError
from fgq_tvm.exported_archive import archive_problem, load_exported_program


class _CreatesFile:
    """Unpickling this object opens (creates) ``marker``: code run by a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    """A ``.pt2`` of a small CNN, written by ``torch.export.save``."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )
    program = torch.export.export(model.eval(), (torch.zeros(1, 3, 8, 8),))
    path = tmp_path_factory.mktemp("pt2") / "plain.pt2"
    torch.export.save(program, path)
    return path


def rewritten(source: Path, target: Path, change: Callable[[str, bytes], bytes | None], extra=()):
    """A copy of the archive ``source`` at ``target``: each member's bytes passed through
    ``change(inner name, data)`` (``None``: kept), and ``extra`` ``(inner name, bytes)`` added."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        root = original.namelist()[0].split("/", 1)[0]
        for info in original.infolist():
            data = original.read(info)
            copy.writestr(info, change(info.filename.split("/", 1)[1], data) or data)
        for name, data in extra:
            copy.writestr(f"{root}/{name}", data)
    return target


def _malicious_sample_inputs(marker: Path):
    """The example inputs replaced: torch tries its safe unpickler, then the unsafe one."""
    payload = pickle.dumps(_CreatesFile(marker))
    return lambda name, data: payload if name.startswith("data/sample_inputs/") else None, ()


def _malicious_pickled_weight(marker: Path):
    """One weight declared pickled (as tensor subclasses are): torch unpickles it unsafely."""
    payload = pickle.dumps(_CreatesFile(marker))

    def change(name: str, data: bytes) -> bytes | None:
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            config["config"]["0.weight"]["use_pickle"] = True
            return json.dumps(config).encode()
        return payload if name == "data/weights/weight_0" else None

    return change, ()


def _malicious_opaque_constant(marker: Path):
    """An "opaque object" constant: torch reads it with ``pickle.loads``."""
    entry = {
        "path_name": "opaque_obj_0",
        "is_param": False,
        "use_pickle": True,
        "tensor_meta": None,
    }
    config = json.dumps({"config": {"secret": entry}}).encode()

    def change(name: str, data: bytes) -> bytes | None:
        return config if name == "data/constants/model_constants_config.json" else None

    return change, [("data/constants/opaque_obj_0", pickle.dumps(_CreatesFile(marker)))]


ATTACKS = {
    "sample_inputs": _malicious_sample_inputs,
    "pickled_weight": _malicious_pickled_weight,
    "opaque_constant": _malicious_opaque_constant,
}


def _torch_export_load_runs_it(path: Path, marker: Path) -> bool:
    """Whether plain ``torch.export.load`` creates ``marker`` (in a subprocess: it may fail)."""
    code = f"import torch; torch.export.load({str(path)!r})"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    found = marker.exists()
    marker.unlink(missing_ok=True)
    return found


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_pickled_code_in_an_archive_never_runs(plain, tmp_path, attack):
    marker = tmp_path / "code-ran"
    change, extra = ATTACKS[attack](marker)
    crafted = rewritten(plain, tmp_path / f"{attack}.pt2", change, extra)
    assert _torch_export_load_runs_it(crafted, marker), "the crafted archive is not live"
    with pytest.raises(FGQError, match="refusing exported program .*code") as info:
        load_exported_program(crafted)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_unsafe_unpickling_is_refused_even_where_the_archive_looks_plain(plain, tmp_path):
    """The example inputs are not declared anywhere: only the weights-only unpickler that
    fgq-tvm imposes on torch.export.load stops them."""
    marker = tmp_path / "code-ran"
    change, extra = _malicious_sample_inputs(marker)
    crafted = rewritten(plain, tmp_path / "inputs.pt2", change, extra)
    assert archive_problem(crafted) is None
    with pytest.raises(FGQError, match="pickled objects other than tensors"):
        load_exported_program(crafted)
    assert not marker.exists() and torch.load.__name__ == "load"


def test_compiled_aotinductor_code_is_refused(plain, tmp_path):
    crafted = rewritten(
        plain,
        tmp_path / "aoti.pt2",
        lambda name, data: None,
        [("data/aotinductor/model/m.so", b"")],
    )
    assert "AOTInductor" in archive_problem(crafted)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_and_damaged_archives_are_one_line(plain, tmp_path, keep):
    data = plain.read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FGQError, match="not an intact .pt2") as info:
        load_exported_program(cut)
    assert "\n" not in str(info.value)


def test_a_damaged_member_is_named(plain, tmp_path):
    damaged = rewritten(plain, tmp_path / "damaged.pt2", lambda name, data: None)
    data = bytearray(damaged.read_bytes())
    with zipfile.ZipFile(damaged) as archive:
        member = next(i for i in archive.infolist() if i.filename.endswith("weight_0"))
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data[start] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert "weight_0 is damaged" in archive_problem(damaged)


def test_a_plain_archive_loads(plain):
    program = load_exported_program(plain)
    x = torch.randn(1, 3, 8, 8)
    assert program.module()(x).shape == (1, 10)

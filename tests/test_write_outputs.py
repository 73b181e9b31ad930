"""How compile puts a module and its sidecar in place (fgq_tvm.compiler._write_outputs).

Concurrent compiles to one output leave a consistent pair; a pair mixed by writers that do not
lock (an older fgq-tvm) is refused by ``load``; temporaries of a killed compile are removed by the
next compile to the same output. Writers export fixed bytes (those of a tiny real module, see
helpers.tiny_executable) instead of compiling a model.
"""

import hashlib
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import pytest
from helpers import tiny_executable, tiny_sidecar

import fgq_tvm
from fgq_tvm import compiler
from fgq_tvm.errors import FGQError
from fgq_tvm.runtime import sidecar_path


class BytesExecutable:
    """Stands in for a TVM executable: exports fixed bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def export_library(self, path: str, options: list[str] | None = None) -> None:
        Path(path).write_bytes(self.data)


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> bytes:
    """The bytes of a real (tiny) fgq-tvm module."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.so"
    tiny_executable().export_library(str(path))
    return path.read_bytes()


def write(output: Path, data: bytes, model: str) -> dict:
    """Write ``data`` as the module ``output``, with the tiny module's sidecar naming ``model``."""
    sidecar = {**tiny_sidecar(Path(os.devnull)), "model": model}
    return compiler._write_outputs(output, BytesExecutable(data), sidecar)


def pause_between_renames(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Stop the first writer that renames a file after that rename (its sidecar's) until the
    second event is set; the first event says it stopped."""
    paused, resume = threading.Event(), threading.Event()
    replace = os.replace

    def replace_and_pause(source, destination) -> None:
        replace(source, destination)
        if not paused.is_set():
            paused.set()
            assert resume.wait(30)

    monkeypatch.setattr(compiler.os, "replace", replace_and_pause)
    return paused, resume


def write_while_paused(output: Path, first: bytes, second: bytes, monkeypatch) -> bool:
    """Start writer A (``first``), pause it between its renames, start writer B (``second``),
    resume A after half a second and wait for both; True if B had finished before A resumed."""
    paused, resume = pause_between_renames(monkeypatch)
    with ThreadPoolExecutor(2) as pool:
        writer_a = pool.submit(write, output, first, "A")
        assert paused.wait(30)
        writer_b = pool.submit(write, output, second, "B")
        time.sleep(0.5)  # long enough for B to write both files if nothing stops it
        finished_early = writer_b.done()
        resume.set()
        writer_a.result()
        writer_b.result()
    return finished_early


def test_concurrent_writers_leave_a_consistent_pair(tmp_path, monkeypatch, library):
    output = tmp_path / "m.so"
    second = library + b"\0"  # another module: ELF ignores trailing bytes
    assert not write_while_paused(output, library, second, monkeypatch)  # B waited for A's lock
    info = json.loads(sidecar_path(output).read_text())
    assert output.read_bytes() == second and info["model"] == "B"
    assert info["module_sha256"] == hashlib.sha256(second).hexdigest()
    assert fgq_tvm.load(output).info == info
    assert sorted(path.name for path in tmp_path.iterdir()) == [".m.so.lock", "m.so", "m.so.json"]


def test_a_pair_mixed_by_writers_without_the_lock_is_refused(tmp_path, monkeypatch, library):
    # writers that do not lock (another fgq-tvm, a file system without flock) can interleave
    monkeypatch.setattr(compiler, "_locked_output", lambda output: nullcontext())
    output = tmp_path / "m.so"
    assert write_while_paused(output, library, library + b"\0", monkeypatch)
    assert output.read_bytes() == library
    assert json.loads(sidecar_path(output).read_text())["model"] == "B"
    message = f"module {output} does not match its sidecar (written by another compile?): compile"
    with pytest.raises(FGQError, match="^" + re.escape(message) + " it again$"):
        fgq_tvm.load(output)


class HangingExecutable:
    """Stands in for a TVM executable whose export never ends; says when it starts on ``pipe``."""

    def __init__(self, pipe: int) -> None:
        self.pipe = pipe

    def export_library(self, path: str, options: list[str] | None = None) -> None:
        os.write(self.pipe, b"exporting")
        time.sleep(300)


def kill_while_exporting(output: Path) -> None:
    """Start writing ``output`` in a child process and SIGKILL it during the export."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: never returns into pytest
        try:
            compiler._write_outputs(output, HangingExecutable(write_end), {})
        finally:
            os._exit(1)
    os.close(write_end)
    try:
        assert os.read(read_end, 100) == b"exporting"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(read_end)


def test_temporaries_of_a_killed_compile_are_removed(tmp_path, library):
    output = tmp_path / "m.so"
    kill_while_exporting(output)
    left = [path for path in tmp_path.iterdir() if path.name != ".m.so.lock"]
    assert [path.stat().st_size for path in left] == [0]
    assert re.fullmatch(r"\.m\.so\.\w+\.so", left[0].name)
    (tmp_path / ".m.so.json.k1ll3d_x.json").write_text("{}")  # its sidecar, had it got there
    others = [".m.so.notes", ".n.so.abcd1234.so", "m.so.abcd1234.so", ".m.so.a.b.so"]
    for name in others:
        (tmp_path / name).write_bytes(b"not fgq-tvm's")
    write(output, library, "B")
    expected = sorted([".m.so.lock", "m.so", "m.so.json", *others])
    assert sorted(path.name for path in tmp_path.iterdir()) == expected
    assert fgq_tvm.load(output).info["model"] == "B"

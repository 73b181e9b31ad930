"""Progress bars and result files written whole (fgq_tvm.reporting)."""

from __future__ import annotations

import pytest

from fgq_tvm.errors import FGQError
from fgq_tvm.reporting import progress_bar, write_text_atomically


def test_progress_bar_fills_in_twentieths():
    assert progress_bar(0, 7) == "[--------------------] 0/7"
    assert progress_bar(4, 19) == "[####----------------] 4/19"
    assert progress_bar(7, 7) == "[####################] 7/7"


def test_files_are_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "result.json"
    write_text_atomically(path, "{}\n")
    assert path.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(FGQError, match=r"cannot write .*missing/result.json \(No such file"):
        write_text_atomically(tmp_path / "missing" / "result.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

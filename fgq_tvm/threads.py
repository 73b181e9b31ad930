"""How many threads PyTorch and the TVM runtime use: one setting for benchmarks and tuning."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def thread_settings(threads: int) -> Iterator[None]:
    """Run PyTorch and TVM with ``threads`` threads (TVM reads ``TVM_NUM_THREADS``, and
    processes started inside, such as MetaSchedule's runners, inherit it)."""
    import torch

    previous_torch = torch.get_num_threads()
    previous_env = os.environ.get("TVM_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous_torch)
        if previous_env is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = previous_env

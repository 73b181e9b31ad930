"""TVMScript parsed with cheap stack records: the records are inspect.stack's, and TVMScript
parses the same under them."""

from __future__ import annotations

import inspect

import tvm
from tvm.script import tirx as T

from fgq_tvm.schedules.tvmscript_parsing import _stack, cheap_stacks


def test_the_records_are_those_of_inspect_stack():
    def records():
        return inspect.stack(), _stack()

    expected, cheap = records()
    assert len(cheap) == len(expected)
    for want, got in zip(expected, cheap, strict=True):
        assert (got.frame, got.filename, got.lineno, got.function) == (
            want.frame,
            want.filename,
            want.lineno,
            want.function,
        )
        if want.code_context is not None and want.code_context[0].strip():
            assert got.code_context == want.code_context


def test_tvmscript_parses_the_same_and_stack_is_restored():
    def parse():
        scale = 3  # a captured variable: found through the stack records

        @T.prim_func(s_tir=True, private=True)
        def triple(x: T.Buffer((4,), "int32"), y: T.Buffer((4,), "int32")):
            for i in range(4):
                y[i] = x[i] * scale

        return triple

    with cheap_stacks():
        assert inspect.stack is _stack
        cheap = parse()
    assert inspect.stack is not _stack
    tvm.ir.assert_structural_equal(cheap, parse())

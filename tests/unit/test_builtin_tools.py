"""The builtin arithmetic tools: their answers, their errors, and results formatted as Go's ``%v`` does."""

from __future__ import annotations

import pytest

from kubechain.tools.builtin import ToolError, go_format_float, run_builtin


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (5.0, "5"),
        (3.5, "3.5"),
        (1e6, "1e+06"),
        (1234567.0, "1.234567e+06"),
        (123456.0, "123456"),
        (0.0001, "0.0001"),
        (1e-5, "1e-05"),
        (-2.5, "-2.5"),
    ],
)
def test_go_float_formatting(value: float, text: str) -> None:
    assert go_format_float(value) == text


def test_builtins() -> None:
    assert run_builtin("add", {"a": 2, "b": 3}) == "5"
    assert run_builtin("divide", {"a": 7, "b": 2}) == "3.5"
    assert run_builtin("multiply", {"a": "4", "b": 2.5}) == "10"
    with pytest.raises(ToolError, match="division by zero"):
        run_builtin("divide", {"a": 1, "b": 0})
    with pytest.raises(ToolError, match="must be a number"):
        run_builtin("add", {"a": "x", "b": 1})

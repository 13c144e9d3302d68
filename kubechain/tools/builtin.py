"""The original's builtin arithmetic tools, formatting results as Go's ``%v`` does (2+3 → "5")."""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any


class ToolError(Exception):
    """A tool ran and failed; the message goes back to the LLM. ``detail``: the status detail, where the
    original shows one that differs from the error (``Division by zero``)."""

    def __init__(self, message: str, *, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


def go_format_float(value: float) -> str:
    """strconv.FormatFloat(v, 'g', -1, 64): shortest digits, exponent iff exp < -4 or exp >= 6."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    decimal = Decimal(repr(value)).normalize()
    sign, digits, exponent = decimal.as_tuple()
    assert isinstance(exponent, int)
    text_digits = "".join(str(d) for d in digits)
    exp10 = len(text_digits) + exponent - 1
    prefix = "-" if sign else ""
    if exp10 < -4 or exp10 >= 6:
        mantissa = text_digits[0] + ("." + text_digits[1:] if len(text_digits) > 1 else "")
        return f"{prefix}{mantissa}e{'-' if exp10 < 0 else '+'}{abs(exp10):02d}"
    return prefix + format(abs(decimal), "f")


def _operand(arguments: dict[str, Any], key: str) -> float:
    if key not in arguments:
        raise ToolError(f"missing argument {key!r}")
    value = arguments[key]
    if isinstance(value, bool):
        raise ToolError(f"argument {key!r} must be a number, got a boolean")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer too large for a float
        raise ToolError(f"argument {key!r} must be a number, got {value!r}") from None


def run_builtin(name: str, arguments: dict[str, Any]) -> str:
    a, b = _operand(arguments, "a"), _operand(arguments, "b")
    if name == "add":
        result = a + b
    elif name == "subtract":
        result = a - b
    elif name == "multiply":
        result = a * b
    elif name == "divide":
        if b == 0:
            raise ToolError("division by zero", detail="Division by zero")
        result = a / b
    else:
        raise ToolError(f'unsupported builtin function "{name}"')
    return go_format_float(result)

"""A tool call's deadline under its claim: how a call its claim's time left ended says so."""

from __future__ import annotations


def cut_short_note(timeout_s: float, own_timeout_s: float, own: str = "the tool's own timeout") -> str:
    """What a call's timeout error adds when its ``timeout_s`` was its claim's time left (the claim was
    written late), shorter than ``own_timeout_s``: the claim ended it, not the tool's slowness; "" when the
    call had its own."""
    if timeout_s >= own_timeout_s:
        return ""
    return f" (cut short to end within its claim; {own} is {own_timeout_s:g}s)"

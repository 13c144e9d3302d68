"""What the MCP manager hands back: tool results and errors (no SDK imports here)."""

from __future__ import annotations

from dataclasses import dataclass

from kubechain.tools.builtin import ToolError

# The largest message read from an MCP server (a tool's result, a tool list): the SDK reads one whole
# however large (a stdio line quadratically), and a few hundred MB would take the worker down.
MAX_MESSAGE_SETTING = "KUBECHAIN_MCP_MAX_MESSAGE_BYTES"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def describe_size(size: int) -> str:
    """``size`` bytes as people say it: 4 MiB, 256 KiB, 100 bytes."""
    for unit, scale in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} bytes"


class MCPError(ToolError):
    """An MCP server could not be reached, or a request to it failed.

    A :class:`ToolError`, so a tool-call executor that reports ``ToolError`` messages back to the LLM
    reports this one too. The message never contains secret values.
    """


class UnusableSecret(MCPError):
    """A Secret the server's spec takes a value from (an env var, a header) could not be used: missing, a
    key missing, not readable, or a value no header can carry. ``secret_name``: that Secret, recorded in the
    MCPServer's status.unusableSecret when its validation meets this."""

    def __init__(self, message: str, secret_name: str = "") -> None:
        super().__init__(message)
        self.secret_name = secret_name


@dataclass(frozen=True)
class MCPToolResult:
    """A tools/call result flattened to text; ``is_error`` mirrors the result's ``isError``."""

    text: str
    is_error: bool = False

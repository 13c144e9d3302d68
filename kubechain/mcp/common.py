"""What the MCP manager hands back: tool results and errors (no SDK imports here)."""

from __future__ import annotations

from dataclasses import dataclass

from kubechain.tools.builtin import ToolError


class MCPError(ToolError):
    """An MCP server could not be reached, or a request to it failed.

    A :class:`ToolError`, so a tool-call executor that reports ``ToolError`` messages back to the LLM
    reports this one too. The message never contains secret values.
    """


@dataclass(frozen=True)
class MCPToolResult:
    """A tools/call result flattened to text; ``is_error`` mirrors the result's ``isError``."""

    text: str
    is_error: bool = False

"""An MCP server's tool list as it leaves the worker: in the MCPServer's status and every LLM request,
without the server's secrets, which it may describe its tools with (a connection string, a default)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from kubechain.models import MCPTool
from kubechain.redaction import Scrubber

log = logging.getLogger("kubechain.mcp")


def scrubbed_tools(tools: Iterable[Any], scrub: Scrubber, server: str) -> list[MCPTool]:
    """A server's listed tools as they leave the worker (the MCPServer's status, every LLM request): a
    server may describe its tools with values from its environment, secrets among them."""
    kept: list[MCPTool] = []
    for tool in tools:
        if scrub.in_name(tool.name):
            log.warning("MCP server %s: tool %r left out: its name holds a secret", server, scrub(tool.name))
        else:
            kept.append(_scrubbed_tool(tool, scrub))
    return kept


def _scrubbed_tool(tool: Any, scrub: Scrubber) -> MCPTool:
    """The tool with its name as it is, the LLM calls it by (cut, a name names nothing on the server;
    two names cut alike would be one), and the rest scrubbed."""
    return MCPTool(
        name=tool.name,
        description=scrub(tool.description) if tool.description else tool.description,
        input_schema=_scrubbed_schema(tool.input_schema, scrub),
    )


def _scrubbed_schema(schema: dict[str, Any] | None, scrub: Scrubber) -> dict[str, Any] | None:
    """The schema scrubbed as JSON text (keys, defaults, examples, numbers alike). A secret may have stood
    where JSON or JSON Schema needs something else (a number, a type, a pattern): then a schema that takes
    any arguments stands in, so the tool can still be offered (its server checks what it is sent)."""
    if schema is None:
        return None
    text = json.dumps(schema, ensure_ascii=False)
    scrubbed = scrub(text)
    if scrubbed == text:
        return schema
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        cleaned = json.loads(scrubbed)
        if isinstance(cleaned, dict):
            validator_for(cleaned).check_schema(cleaned)
            return cleaned
    except (ValueError, RecursionError, SchemaError):
        pass
    return {"type": "object"}

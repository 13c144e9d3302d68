"""An MCP server's tool list as it leaves the worker: in the MCPServer's status and every LLM request,
without the server's secrets, which it may describe its tools with (a connection string, a default)."""

from __future__ import annotations

import json
import logging
import re
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


# Keywords whose value maps names (of properties, of definitions) to schemas.
NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# Keywords whose strings are names, not prose: a property (required), a value the LLM sends back (enum,
# const), a type, a reference.
NAME_KEYWORDS = frozenset(
    {
        "required",
        "dependentRequired",
        "enum",
        "const",
        "type",
        "format",
        "$ref",
        "$dynamicRef",
        "$id",
        "$anchor",
        "$schema",
    }
)


class _Dropped:
    """A value that cannot be shown: the keyword holding it goes."""


_DROPPED = _Dropped()


def _scrubbed_schema(schema: dict[str, Any] | None, scrub: Scrubber) -> dict[str, Any] | None:
    """The schema walked (scrubbed as JSON text, a secret in a number made the whole of it invalid):
    prose (descriptions, titles, defaults, examples, patterns) is scrubbed; names (keys, and see
    NAME_KEYWORDS) are kept whole as a tool's name is, or left out with what they name (see
    ``Scrubber.in_name``); a number, a boolean or a null that holds a secret costs its keyword alone, as
    does a pattern left no regular expression. A schema still invalid (a default cut to the wrong type)
    becomes one that takes any arguments, so the tool can still be offered: its server checks what it is
    sent."""
    if schema is None:
        return None
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    try:
        cleaned = _walk(schema, scrub, names=False)
        if cleaned == schema:
            return schema
        if isinstance(cleaned, dict):
            validator_for(cleaned).check_schema(cleaned)
            return cleaned
    except (RecursionError, SchemaError):
        pass
    return {"type": "object"}


def _walk(node: Any, scrub: Scrubber, *, names: bool) -> Any:
    """``node`` (a schema, or a value in one) scrubbed, or _DROPPED; ``names``: its strings are names."""
    if isinstance(node, dict):
        kept: dict[str, Any] = {}
        for key, value in node.items():
            if scrub.in_name(key):
                continue
            if not names and key in NAMED_SCHEMAS and isinstance(value, dict):
                cleaned: Any = {
                    name: _walk(schema, scrub, names=False)
                    for name, schema in value.items()
                    if not scrub.in_name(name)
                }
            else:
                cleaned = _walk(value, scrub, names=names or key in NAME_KEYWORDS)
            if cleaned is _DROPPED:
                continue
            if key == "pattern" and isinstance(cleaned, str) and cleaned != value and not _compiles(cleaned):
                continue
            kept[key] = cleaned
        return kept
    if isinstance(node, list):
        items = [_walk(item, scrub, names=names) for item in node]
        if names:  # a name that cannot be shown is left out of its list, and an emptied list goes
            items = [item for item in items if item is not _DROPPED]
            return items if items or not node else _DROPPED
        return _DROPPED if any(item is _DROPPED for item in items) else items
    if isinstance(node, str):
        if names:
            return _DROPPED if scrub.in_name(node) else node
        return scrub(node)
    text = json.dumps(node)  # a number, a boolean, a null
    return _DROPPED if scrub(text) != text else node


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True

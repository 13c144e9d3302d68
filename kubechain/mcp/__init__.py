"""MCP client sessions for workers: :class:`MCPManager` (the MCP SDK is imported only when it starts)."""

from kubechain.mcp.common import MCPError, MCPToolResult, UnusableSecret
from kubechain.mcp.manager import MCPManager
from kubechain.mcp.secrets import SecretNotResolvable, kube_secret_resolver
from kubechain.mcp.spec import ResolvedSpec, SecretResolver, command_problem, resolve_spec, validate_spec

__all__ = [
    "MCPError",
    "MCPManager",
    "MCPToolResult",
    "ResolvedSpec",
    "SecretNotResolvable",
    "SecretResolver",
    "UnusableSecret",
    "command_problem",
    "kube_secret_resolver",
    "resolve_spec",
    "validate_spec",
]

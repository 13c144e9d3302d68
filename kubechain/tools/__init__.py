"""Tool executors: builtin arithmetic, external HTTP APIs (MCP lives in kubechain.mcp)."""

"""Cutting secrets out of text that leaves the worker: values in their many forms, and URLs."""

from __future__ import annotations

import pytest

from kubechain.redaction import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://mcp.example.com/mcp", "https://mcp.example.com/mcp"),
        ("https://user:tok3n@mcp.example.com/mcp", "https://mcp.example.com/mcp"),
        (
            "https://server.example.ai/x/mcp?api_key=s3cret&profile=p1",
            "https://server.example.ai/x/mcp?api_key=***&profile=***",
        ),
        ("http://127.0.0.1:8000/mcp?debug", "http://127.0.0.1:8000/mcp?debug"),
    ],
)
def test_a_servers_url_is_shown_without_credentials_or_query_values(url: str, shown: str) -> None:
    assert redact_url(url) == shown

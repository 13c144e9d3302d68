"""How long a server asks to wait before trying again (kubechain.retry_after)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),  # OpenAI's finer header first
        ({"retry-after": "20"}, 20.0),
        ({"retry-after": "Wed, 02 Dec 2026 08:02:00 GMT"}, 120.0),  # an HTTP date
        ({"retry-after": "soon"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_reads_every_form_providers_send(
    headers: dict[str, str] | None, expected: float | None
) -> None:
    from email.utils import parsedate_to_datetime

    from kubechain.retry_after import retry_after_s

    now = parsedate_to_datetime("Wed, 02 Dec 2026 08:00:00 GMT").timestamp()
    assert retry_after_s(headers, now) == expected

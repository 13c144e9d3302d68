"""Who holds a coordination.k8s.io/v1 Lease (pure): leader election and ``kubechain up`` read it alike."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from kubechain.statemachines.transition import parse_timestamp


def lease_holder(spec: Mapping[str, Any], now: datetime, default_duration_s: float = 15.0) -> str | None:
    """The Lease's holder, if it renewed (or acquired) it within the Lease's duration; else None (free,
    released, or its holder stopped renewing and another may take over)."""
    holder = spec.get("holderIdentity")
    renewed = parse_timestamp(spec.get("renewTime")) or parse_timestamp(spec.get("acquireTime"))
    if not holder or renewed is None:
        return None
    duration = timedelta(seconds=float(spec.get("leaseDurationSeconds") or default_duration_s))
    return str(holder) if now - renewed < duration else None

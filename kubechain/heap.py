"""Garbage-collector settings for the long-running processes (watcher, worker).

Both import large libraries (Celery, the OpenAI SDK, OpenTelemetry, pydantic models) whose objects live as
long as the process, and Python's cyclic collector re-examines all of them in every full collection. In
the hello benchmark a worker spent ~3.5 % of its CPU in the collector, most of it in a handful of full
collections of ~110 ms each. Freezing the heap once start-up is done takes those objects out of the
collector's sight (they are still freed by reference counting, as anything without cycles always is), and
a larger youngest-generation threshold makes young collections, and the older ones they trigger, rarer.
"""

from __future__ import annotations

import gc

# Allocations (minus deallocations) between young collections; CPython's default is 700.
YOUNG_THRESHOLD = 10_000


def freeze_startup_heap(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collect once, freeze what survives and raise the young-generation threshold. Call it when the
    process has imported and built what it keeps (and, with prefork, before children are forked: frozen
    objects are not touched again, so their pages stay shared)."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)

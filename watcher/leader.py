"""Leader election over a coordination.k8s.io/v1 Lease (controller-runtime's defaults: 15 s / 2 s).

Replicas all watch and keep their caches warm; only the holder of the Lease enqueues work. A standby takes
over once the holder has not renewed for the lease duration. A holder that stopped acting for a while
(renewals late or failing) and renews its own Lease again resumes: no other replica led meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubechain.kube.client import KubeClient
from kubechain.kube.errors import AlreadyExists, Conflict, KubeAPIError, NotFound
from kubechain.settings import LEASE_RETRY_PERIOD_S
from kubechain.statemachines.lease import lease_holder

log = logging.getLogger(__name__)

# A Lease last renewed this long (plus its duration) ago by our clock is taken at first sight: no
# replica's clock is that far off, and a restarted watcher need not wait out a long-dead holder.
STALE_AT_FIRST_SIGHT_S = 300.0


def _micro(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: float = 15.0,
        retry_period_s: float = LEASE_RETRY_PERIOD_S,
        on_started_leading: Callable[[], None] | None = None,
        on_stopped_leading: Callable[[], None] | None = None,
        on_resumed_leading: Callable[[], None] | None = None,
        clock: Callable[[], datetime] | None = None,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        """``clock`` (wall time) only stamps the Lease; durations (the renew deadline, a holder's expiry)
        are timed on ``monotonic``, so an NTP step cannot make two replicas lead at once. A test that gives
        only ``clock`` times both on it.

        ``on_started_leading``: this process leads for the first time, or took the Lease over (created it,
        or it named another holder or none, even if the answer to that write was lost): what was sent
        before is unknown to it. ``on_resumed_leading``:
        it renewed its own Lease after a lapse in which it stopped acting (and dropped work): the Lease
        named it throughout, so no other replica led meanwhile."""
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.retry_period_s = retry_period_s
        self._on_started = on_started_leading
        self._on_stopped = on_stopped_leading
        self._on_resumed = on_resumed_leading
        self._clock = clock or (lambda: datetime.now(UTC))
        if monotonic is None:
            monotonic = time.monotonic if clock is None else (lambda: self._clock().timestamp())
        self._monotonic = monotonic
        self._leading = False
        self._last_renew: float | None = None  # monotonic
        # The Lease named this replica when it last read or wrote it: not acting meanwhile is a lapse (it
        # may renew and resume), not a loss to another replica.
        self._lease_ours = False
        # Another holder's Lease as last seen (holder, renewTime, resourceVersion), and when, by our clock.
        self._observed_record: tuple[Any, Any, Any] | None = None
        self._observed_at: float | None = None  # monotonic
        self._ignored_in_lapse = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        if not self._leading or self._last_renew is None:
            return False
        # Stop acting as leader before another replica may take over (renew deadline < duration).
        return self._monotonic() - self._last_renew < self.lease_duration_s * 0.66

    def note_ignored(self, forget: Callable[[], None] | None = None) -> bool:
        """The caller dropped work because this replica was not acting. True if the Lease is still its
        own (a lapse): then its next renewal resumes even if no step began inside the lapse, and what it
        dropped must not count as sent: ``forget`` forgets it, before the lapse is noted (noted first, a
        renewal and the resync it brings could run before the forgetting, and hold the work back)."""
        if not self._lease_ours:
            return False
        if forget is not None:
            forget()
        self._ignored_in_lapse.set()
        return True

    def try_acquire_or_renew(self) -> str | None:
        """None if this replica does not hold the Lease; else the holder it named before this write (""
        if none, or the Lease was created)."""
        now = self._clock()
        spec = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration_s),
            "renewTime": _micro(now),
        }
        try:
            lease = self.kube.get_lease(self.namespace, self.name)
        except NotFound:
            if self._stop.is_set():
                return None  # stopping: never take (or re-take) the Lease on the way out
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": _micro(now), "leaseTransitions": 0},
            }
            # Not ours until the create is answered: if its answer is lost, the next step reads this
            # replica as holder and must still count it as new (see step()).
            self._lease_ours = False
            try:
                self.kube.create_lease(self.namespace, body)
            except AlreadyExists:
                return None
            return ""
        current: dict[str, Any] = lease.get("spec") or {}
        holder = current.get("holderIdentity")
        if holder != self.identity:
            # (before the takeover's write: if its answer is lost, the Lease was not ours before it)
            self._lease_ours = False
            if holder and not self._expired_as_observed(lease, now):
                return None  # another replica holds it and keeps renewing
            spec["acquireTime"] = _micro(now)
            spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
        else:
            spec["acquireTime"] = current.get("acquireTime") or _micro(now)
            spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0)
        lease["spec"] = spec
        if self._stop.is_set():
            # A step that began before stop() and read the Lease after stop() released it would take it
            # back for a process on its way out; the standby would wait out a whole duration.
            return None
        try:
            self.kube.replace_lease(self.namespace, self.name, lease)
        except Conflict:
            return None
        return str(holder or "")

    def _expired_as_observed(self, lease: dict[str, Any], now: datetime) -> bool:
        """Whether another holder's Lease has expired, timed on this replica's clock from when it last saw
        the Lease change (client-go's rule): the holder's renewTime comes from the holder's clock, and a
        skew between the two would delay a takeover (standby behind) or start one while the holder still
        renews (standby ahead)."""
        spec: dict[str, Any] = lease.get("spec") or {}
        record = (
            spec.get("holderIdentity"),
            spec.get("renewTime"),
            (lease.get("metadata") or {}).get("resourceVersion"),
        )
        duration_s = float(spec.get("leaseDurationSeconds") or self.lease_duration_s)
        observed_now = self._monotonic()
        if record != self._observed_record:
            first_sight = self._observed_record is None
            self._observed_record, self._observed_at = record, observed_now
            # At first sight, a Lease whose holder stopped renewing longer ago than any plausible skew
            # need not be watched for a whole duration more.
            stale_since = now - timedelta(seconds=STALE_AT_FIRST_SIGHT_S)
            return first_sight and lease_holder(spec, stale_since, self.lease_duration_s) is None
        return self._observed_at is not None and observed_now - self._observed_at >= duration_s

    def step(self) -> None:
        # The lease counts from the renewTime written, which is taken before the request; a slow
        # answer must not extend how long this replica believes it still leads.
        attempted_at = self._monotonic()
        # Whether the Lease named this replica before this step: a write whose answer was lost (a
        # takeover, a create) leaves it named as holder, and the next step must not take that for its own
        # Lease renewed after a lapse (another replica may have led in between).
        was_ours = self._lease_ours
        previous_holder: str | None = None
        try:
            previous_holder = self.try_acquire_or_renew()
        except KubeAPIError as exc:
            log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
        except Exception:  # noqa: BLE001 - e.g. a credential refresh failing: the thread must go on
            log.exception("lease %s/%s: unexpected error", self.namespace, self.name)
        acquired = previous_holder is not None
        new_leader = lapse_noticed = False
        if acquired:
            new_leader = self._last_renew is None or previous_holder != self.identity or not was_ours
            self._last_renew = attempted_at
            self._lease_ours = True
            # Cleared only if seen set: a drop noted between the two is left for the next step.
            lapse_noticed = self._ignored_in_lapse.is_set()
            if lapse_noticed:
                self._ignored_in_lapse.clear()
        if new_leader:
            self._leading = True
            log.info("became leader", extra={"lease": self.name, "identity": self.identity})
            self._notify(self._on_started)
        elif acquired and (lapse_noticed or not self._leading):
            # Renewed its own Lease after a lapse in which it stopped acting and dropped work (an event, a
            # resync tick, an unsent message: each notes it and is left to the resync). No other replica
            # led meanwhile, so what it sent before is still known: an ordinary resync, not a new
            # leader's, which re-sent everything unfinished at every lapse, more load on an API server
            # that was already slow. A lapse in which nothing was dropped (renewals slower than the renew
            # deadline) needs none.
            self._leading = True
            log.info("leading again after a lapse", extra={"lease": self.name, "identity": self.identity})
            self._notify(self._on_resumed)
        elif not acquired and self._leading and not self.is_leader:
            self._leading = False
            log.warning("lost leadership", extra={"lease": self.name, "identity": self.identity})
            self._notify(self._on_stopped)

    def _notify(self, callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:  # noqa: BLE001 - a failing callback must not end leader election
            log.exception("lease %s/%s: leadership callback failed", self.namespace, self.name)

    def run(self) -> None:
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.retry_period_s)

    @property
    def thread(self) -> threading.Thread | None:
        """The renewal loop's thread once started (the watcher's /healthz checks it)."""
        return self._thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="leader-election", daemon=True)
        self._thread.start()

    def stop(self, release: bool = True) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if release and self._leading:
            try:
                lease = self.kube.get_lease(self.namespace, self.name)
                if (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                    lease["spec"]["holderIdentity"] = None
                    lease["spec"]["renewTime"] = None
                    self.kube.replace_lease(self.namespace, self.name, lease)
            except KubeAPIError:
                pass
        self._leading = False
        self._lease_ours = False

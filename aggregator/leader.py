"""Active/standby coordination of aggregator replicas: a lease row in storage names the one that leads.

Any number of replicas may serve one deployment (one database), but the rounds of a cohort live in the memory
of the process that runs them, so exactly one replica at a time may coordinate them. That replica holds the
cohort's lease (:meth:`~fedfer.aggregator.storage.base.Storage.acquire_lease`: an owner id and an expiry) and
renews it every ``ttl / 3``; the others are standbys that ask for it about once a second and get it only once
it expired (the leader died or lost the database) or was released (the leader stopped cleanly).

A leader that cannot renew before its own expiry, or finds another owner in the row, has lost the lease and
must stop coordinating at once. Storage fences a leader that has not noticed yet: every round change is a
compare-and-set on the round's version, and a new leader bumps that version before it resumes the round, so
the old leader's next write fails (:class:`~fedfer.aggregator.storage.base.ConflictError`).

The expiry is compared with each replica's own clock: replicas must keep their clocks in step (NTP) to well
within the TTL.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable

from fedfer.aggregator.storage import Storage, StorageError
from fedfer.security.errors import FedferError, ValidationError

__all__ = ["LeaderLease", "LeadershipLostError", "LeaseExpiredError", "new_replica_id"]

_log = logging.getLogger(__name__)


class LeadershipLostError(FedferError):
    """This replica no longer holds the coordinator lease (another replica leads, or renewal kept failing)."""


class LeaseExpiredError(LeadershipLostError):
    """Renewals failed (storage unavailable, say a full disk) until this replica's lease ran out, and no other
    replica was seen holding it: this replica must stop leading, but may lead again once storage is back."""


def new_replica_id() -> str:
    """A fresh id for this process: host name plus 32 random bits (two processes never share one)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-.")[:40] or "host"
    return f"{host}-{secrets.token_hex(4)}"


class LeaderLease:
    """This replica's claim on coordinating one cohort, held as the storage lease ``coordinator/<cohort>``.

    Args:
        storage: the deployment's storage (shared by every replica).
        cohort: the cohort whose rounds the lease guards.
        owner: this replica's id (default: :func:`new_replica_id`).
        ttl_s: how long a lease lasts without renewal; a standby takes over at most this long after the
            leader died. It must exceed the longest time the event loop can be busy with one computation.
        clock: seconds since the epoch (a seam for tests; production uses :func:`time.time`).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        cohort: str = "default",
        owner: str | None = None,
        ttl_s: float = 15.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float) or not 0.3 <= ttl_s < math.inf:
            raise ValidationError("lease ttl_s must be a number >= 0.3")
        self._storage = storage
        self.name = f"coordinator/{cohort}"
        self.owner = owner if owner is not None else new_replica_id()
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._expires = 0.0  # by our own clock: when the lease we last secured runs out
        self._renewed = -math.inf
        self._holder: str | None = None

    def __repr__(self) -> str:
        return f"LeaderLease(name={self.name!r}, owner={self.owner!r}, ttl_s={self.ttl_s})"

    @property
    def renew_s(self) -> float:
        """How often the holder renews."""
        return self.ttl_s / 3

    @property
    def retry_s(self) -> float:
        """How often a standby asks for the lease (soon after a release, at most a second)."""
        return min(1.0, self.renew_s)

    @property
    def held(self) -> bool:
        """True while the lease this replica last secured has not run out (by its own clock)."""
        return self._clock() < self._expires

    def try_acquire(self) -> bool:
        """Take the lease if it is free or expired, or renew it if this replica holds it.

        Returns:
            Whether this replica holds the lease now. A storage failure counts as not holding it (a standby
            just tries again; a leader keeps its current lease until it runs out, see :meth:`keep`).
        """
        now = self._clock()
        try:
            record = self._storage.acquire_lease(
                self.name,
                owner=self.owner,
                now=dt.datetime.fromtimestamp(now, dt.UTC),
                ttl=dt.timedelta(seconds=self.ttl_s),
            )
        except StorageError as exc:
            _log.warning("coordinator lease: storage unavailable (%s)", type(exc).__name__)
            return False
        if record.owner != self.owner:
            if record.owner != self._holder:
                _log.info("standby: replica %s holds the coordinator lease", record.owner)
            self._holder = record.owner
            self._expires = 0.0
            return False
        if self._holder != self.owner:
            _log.info("replica %s acquired the coordinator lease", self.owner)
        self._holder = self.owner
        self._expires = now + self.ttl_s
        self._renewed = now
        return True

    def keep(self) -> None:
        """Renew the lease when a renewal is due; call at least every :attr:`renew_s` while leading.

        Raises:
            LeadershipLostError: another replica holds the lease.
            LeaseExpiredError: renewals failed (storage unavailable) until the lease ran out.
        """
        if self._clock() - self._renewed < self.renew_s:
            return
        if self.try_acquire():
            return
        if self._holder != self.owner:
            self._expires = 0.0
            raise LeadershipLostError("lost the coordinator lease")
        if not self.held:
            raise LeaseExpiredError("the coordinator lease ran out while storage was unavailable")

    def release(self) -> None:
        """Give the lease up (clean shutdown), so a standby can take over without waiting for the expiry."""
        self._expires = 0.0
        self._renewed = -math.inf
        try:
            if self._storage.release_lease(self.name, owner=self.owner):
                _log.info("replica %s released the coordinator lease", self.owner)
        except StorageError as exc:
            _log.warning("coordinator lease not released (%s); it expires by itself", type(exc).__name__)
        self._holder = None

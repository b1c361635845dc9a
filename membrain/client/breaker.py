"""Per-endpoint circuit breaker with exponential backoff.

Closed: requests flow. After a failure the breaker opens for ``base_s * 2**(n-1)`` seconds
(capped at ``max_s``), during which requests to that endpoint are not attempted at all (their
keys are misses). When the backoff has passed, exactly one caller is let through as a probe
(half-open); it pings the server and, on success, closes the breaker; on failure the backoff
doubles.

This is Membrain's one circuit breaker. It guards two scopes: each endpoint inside
``membrain.Client`` (connect failures, timeouts), and the remote tier as a whole in
``membrain.tiers.remote.RemoteTier`` (any exception a backend raises), so a broken remote costs
one failed call per backoff period, not one per request. Slow calls that succeed are successes:
the client's deadline already bounds them.
"""

from __future__ import annotations

import threading
import time


class CircuitBreaker:
    def __init__(self, base_s: float = 0.05, max_s: float = 5.0) -> None:
        if base_s <= 0 or max_s < base_s:
            raise ValueError("breaker backoff needs 0 < base_s <= max_s")
        self.base_s = base_s
        self.max_s = max_s
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        self._probing = False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._failures > 0

    @property
    def failures(self) -> int:
        with self._lock:
            return self._failures

    def retry_in(self) -> float:
        """Seconds until a probe is allowed (0 when closed or due)."""
        with self._lock:
            return max(0.0, self._open_until - time.monotonic()) if self._failures else 0.0

    def allows_attempt(self) -> bool:
        """Whether a call now would be admitted (closed, or a probe is due); takes nothing."""
        with self._lock:
            return self._failures == 0 or (not self._probing and time.monotonic() >= self._open_until)

    def admit(self) -> str:
        """``"closed"``: go ahead. ``"probe"``: go ahead, but ping first and report the outcome.
        ``"open"``: do not contact the endpoint."""
        with self._lock:
            if self._failures == 0:
                return "closed"
            if self._probing or time.monotonic() < self._open_until:
                return "open"
            self._probing = True
            return "probe"

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._open_until = 0.0
            self._probing = False

    def failure(self, probe: bool = False) -> None:
        """Record a failed call. Only the first failure after closing, and failed probes,
        lengthen the backoff: calls that were already in flight when the endpoint went down
        fail together and must not escalate it once each."""
        with self._lock:
            if self._failures and not probe:
                return
            self._failures += 1
            backoff = min(self.max_s, self.base_s * (2 ** min(self._failures - 1, 30)))
            self._open_until = time.monotonic() + backoff
            self._probing = False

    def release_probe(self) -> None:
        """A probe slot taken but not used (e.g. the caller's deadline had already passed)."""
        with self._lock:
            self._probing = False

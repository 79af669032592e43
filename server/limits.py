"""The exchange's limits per call and per site, so that one site cannot starve the others.

- SiteSlots: at most `per_site` calls of one site at a time, and one upload (the server has a
  few worker threads: a site holding all of them with trickling uploads stopped every other site).
- Watchdog: a call is cancelled once it has run `total_s`, or made no progress for `idle_s`
  (a client that stalls mid-stream would otherwise hold a worker thread and a temporary file).
The server as a whole refuses calls beyond `maximum_concurrent_rpcs` (server/exchange.py: serve).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc


class SiteSlots:
    """Per-site call slots; take() aborts the call with RESOURCE_EXHAUSTED when none is free."""

    def __init__(self, per_site: int):
        self.per_site = per_site
        self._calls: Counter[str] = Counter()
        self._uploading: set[str] = set()
        self._lock = threading.Lock()

    def take(self, context, site: str, *, upload: bool = False) -> Callable[[], None]:
        """Hold a slot of `site` until the call ends (released by the call's termination callback).
        Returns the release, for a handler that is done before gRPC ends the call: the callback
        runs after the reply has reached the client, which may already be making its next call."""
        with self._lock:
            if upload and site in self._uploading:
                busy = f"site {site!r} already has an upload in progress; one at a time"
            elif self._calls[site] >= self.per_site:
                busy = f"site {site!r} already has {self.per_site} calls in progress; the limit per site"
            else:
                busy = None
                self._calls[site] += 1
                if upload:
                    self._uploading.add(site)
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)

        held = [True]

        def release() -> None:  # once, whoever calls it first
            with self._lock:
                if not held[0]:
                    return
                held[0] = False
                self._calls[site] -= 1
                if upload:
                    self._uploading.discard(site)

        if not context.add_callback(release):  # the call has already ended
            release()
        return release


class Watchdog:
    """Cancels `context`'s call after `total_s` seconds, or after `idle_s` without touch()."""

    def __init__(self, context, *, total_s: float, idle_s: float):
        self._context, self._total_s, self._idle_s = context, total_s, idle_s
        self._start = self._last = time.monotonic()
        self._done = threading.Event()
        if not context.add_callback(self._done.set):
            self._done.set()
        threading.Thread(target=self._watch, name="exchange-watchdog", daemon=True).start()

    def touch(self) -> None:
        """The call made progress (a chunk received or sent)."""
        self._last = time.monotonic()

    def _watch(self) -> None:
        tick = max(0.05, min(1.0, self._idle_s / 4, self._total_s / 4))
        while not self._done.wait(tick):
            now = time.monotonic()
            if now - self._start > self._total_s or now - self._last > self._idle_s:
                self._context.cancel()  # ends the request stream; the store removes what it received
                return

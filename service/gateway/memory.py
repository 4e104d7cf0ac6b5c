"""Why a burst left the gateway 186 MB larger, and what bounds it.

Measured (``bench/results/chaos.md``): after three bursts of 1,000 streams, the memory
Python itself holds (``tracemalloc``) is back where it was (~20 MB); what stays is native
heap -- gRPC core's per-call buffers and the HTTP/2 state of a thousand concurrent calls,
plus the Python objects of the requests -- freed by their owners but kept by glibc's
allocator as its high-water mark. Nothing leaks; the peak was never bounded. So:

* the peak is bounded: admission (``service.gateway.admission``) refuses calls above the
  pools' bounds before they start upstream work, and ``max_concurrent_rpcs`` refuses calls
  above a transport-level cap before the gateway allocates anything for them;
* what the peak left is given back: once no call is in flight, :class:`HeapTrimmer` asks
  glibc to return free heap pages to the system (``malloc_trim``), at most every few
  seconds and only after traffic.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or ``None`` where there is none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    if trim is None:
        return None
    return lambda: trim(0)


class HeapTrimmer:
    """Returns free heap to the system when the gateway falls idle after traffic.

    Args:
        busy: the number of calls in flight now.
        served: the number of calls started so far.
        interval_s: how often to look.
    """

    def __init__(
        self, busy: Callable[[], int], served: Callable[[], int], interval_s: float = 5.0
    ) -> None:
        self.busy = busy
        self.served = served
        self.interval_s = interval_s
        self.trim = _malloc_trim()
        self.trims = 0
        self._trimmed_at = 0

    async def run(self) -> None:
        if self.trim is None:
            logger.info("no malloc_trim here: the heap keeps its high-water mark")
            return
        while True:
            await asyncio.sleep(self.interval_s)
            served = self.served()
            if served != self._trimmed_at and self.busy() == 0:
                self._trimmed_at = served
                await asyncio.to_thread(self.trim)
                self.trims += 1

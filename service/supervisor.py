"""``saliency-serve serve``: the gateway in front of a TorchServe it supervises.

When TorchServe's Java process exits without being asked to, the gateway reports
NOT_SERVING at once (the API answers UNAVAILABLE, which clients may retry), and then,
by ``--on-backend-exit``:

* ``restart`` (the default: ``make serve`` on a laptop or a VM, where nothing else would
  bring it back): TorchServe is started again after a backoff -- 1 s, doubling up to 30 s,
  back to 1 s once a start has lived 5 minutes -- so a crash loop costs little CPU.
* ``exit``: the gateway drains and the process exits with status 1. For a container:
  one process per container, and the kubelet (or systemd) is the supervisor, with its
  own backoff, restart count and events that an operator sees; a process that hides its
  restarts from them hides a crash loop too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.gateway.server import Gateway, GatewayConfig, describe, start_gateway
from service.launcher import TorchServe

logger = logging.getLogger(__name__)
POLICIES = ("restart", "exit")


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts: ``first`` doubling up to ``limit``; a start that lived
    ``reset_after_s`` starts the sequence again."""

    first_s: float = 1.0
    limit_s: float = 30.0
    reset_after_s: float = 300.0

    def next(self, previous: float | None, lived_s: float) -> float:
        if previous is None or lived_s >= self.reset_after_s:
            return self.first_s
        return min(previous * 2, self.limit_s)


class Supervisor:
    """Watches one TorchServe for the gateway in front of it.

    Args:
        torchserve: started and ready.
        policy: ``restart`` or ``exit`` (see the module docstring).
        say: where progress lines go (the console).
    """

    def __init__(
        self,
        torchserve: TorchServe,
        policy: str,
        backoff: Backoff | None = None,
        poll_s: float = 0.25,
        say: Callable[[str], None] = print,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.torchserve = torchserve
        self.policy = policy
        self.backoff = backoff or Backoff()
        self.poll_s = poll_s
        self.say = say
        self.restarts = 0

    async def watch(self, gateway: Gateway) -> int:
        """Return 1 when TorchServe exited and the policy is ``exit``; restart it otherwise
        (until cancelled)."""
        delay: float | None = None
        started = time.monotonic()
        while True:
            await asyncio.sleep(self.poll_s)
            if self.torchserve.alive():
                continue
            await gateway.backend_down()
            code = self.torchserve.process.returncode if self.torchserve.process else None
            if self.policy == "exit":
                self.say(f"TorchServe exited (status {code}); stopping (--on-backend-exit exit)")
                return 1
            delay = self.backoff.next(delay, time.monotonic() - started)
            self.say(f"TorchServe exited (status {code}); restarting it in {delay:g} s")
            await asyncio.sleep(delay)
            await self._restart()
            started = time.monotonic()

    async def _restart(self) -> None:
        await asyncio.to_thread(self.torchserve.stop)  # workers it left behind, ports
        await asyncio.to_thread(self.torchserve.start)
        self.restarts += 1
        try:  # short looks, so that a signal during the restart is not kept waiting
            while not await asyncio.to_thread(self.torchserve.check_started):
                await asyncio.sleep(0.5)
        except RuntimeError as exc:  # it died again while starting: the loop backs off
            self.say(f"TorchServe did not come back: {exc}")
            return
        self.say("TorchServe is back")


async def serve(config: GatewayConfig, supervisor: Supervisor, drain_s: float) -> int:
    """Run the gateway until SIGINT/SIGTERM (then 0) or a backend exit under ``exit`` (1).

    Either way the gateway stops taking calls and lets those in flight finish, for up to
    ``drain_s`` seconds, before it returns (and the caller stops TorchServe).
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway = await start_gateway(config)
    print(describe(config, gateway), flush=True)
    watcher = asyncio.create_task(supervisor.watch(gateway))
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        status = watcher.result() if watcher in done else 0
    finally:
        for task in (watcher, stopper):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        print(f"draining calls in flight (up to {drain_s:g} s)...", flush=True)
        await gateway.stop(grace=drain_s)
        print("gateway stopped", flush=True)
    return status

"""Closed-loop clients (each sends its next call when the last one answered), and the
statuses and latencies they saw."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from service.client import AsyncSaliencyClient, SaliencyClient

CHEAP_METHODS = ("grad_cam", "vanilla_gradient", "smoothgrad")


@dataclass
class Tally:
    """Statuses per RPC, and (start time, seconds) of each OK call."""

    codes: dict[str, Counter[str]] = field(default_factory=dict)
    timings: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, rpc: str, code: str, started: float, seconds: float, details: str) -> None:
        with self.lock:
            self.codes.setdefault(rpc, Counter())[code] += 1
            if code == "OK":
                self.timings.setdefault(rpc, []).append((started, seconds))
            else:
                self.errors.append(f"{rpc} {code}: {details[:160]}")

    def percentile(self, rpc: str, q: float, since: float = 0.0, until: float = 1e18) -> float:
        values = [s for t, s in self.timings.get(rpc, []) if since <= t < until]
        return float(np.percentile(values, q)) if values else float("nan")

    def total(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for counted in self.codes.values():
            out.update(counted)
        return out


def _timed(
    tally: Tally, rpc: str, call: Callable[..., object], *args: object, **kw: object
) -> None:
    started = time.monotonic()
    try:
        call(*args, **kw)
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""  # type: ignore[attr-defined]
    else:
        code, details = "OK", ""
    tally.add(rpc, code, started, time.monotonic() - started, details)


def run_clients(
    address: str, images: Sequence[bytes], clients: int, seconds: float, tally: Tally
) -> None:
    """``clients`` threads alternating Explain (a cheap method) and Predict for ``seconds``."""
    stop = threading.Event()

    def loop(index: int) -> None:
        with SaliencyClient(address) as client:
            turn = index
            while not stop.is_set():
                image = images[turn % len(images)]
                method = CHEAP_METHODS[turn % len(CHEAP_METHODS)]
                _timed(tally, "Explain", client.explain, image, methods=[method], timeout=120)
                _timed(tally, "Predict", client.predict, image, timeout=60)
                turn += clients

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(180)


def stream_burst(
    address: str, image: bytes, calls: int, method: str = "vanilla_gradient"
) -> Counter[str]:
    """Status names of ``calls`` ExplainStream calls of ``method`` started at once."""

    async def one(client: AsyncSaliencyClient) -> str:
        try:
            async for _ in client.explain_stream(image, methods=[method], timeout=300):
                pass
        except grpc.aio.AioRpcError as err:
            return err.code().name
        return "OK"

    async def burst() -> list[str]:
        async with AsyncSaliencyClient(address) as client:
            return await asyncio.gather(*(one(client) for _ in range(calls)))

    return Counter(asyncio.run(burst()))

"""The supervisor's decisions, on stand-ins (the real TorchServe killed under `serve`:
``tests/integration/test_faults.py``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.supervisor import Backoff, Supervisor


class FakeTorchServe:
    """Alive until :meth:`die`; ``start`` brings it back after ``failed_starts`` failures."""

    def __init__(self, failed_starts: int = 0) -> None:
        self.is_alive = True
        self.failed_starts = failed_starts
        self.events: list[str] = []
        self.process: Any = None

    def die(self) -> None:
        self.is_alive = False

    def alive(self) -> bool:
        return self.is_alive

    def stop(self) -> None:
        self.events.append("stop")

    def start(self) -> None:
        self.events.append("start")

    def check_started(self) -> bool:
        if self.failed_starts:
            self.failed_starts -= 1
            raise RuntimeError("TorchServe exited early")
        self.is_alive = True
        self.events.append("ready")
        return True


class FakeGateway:
    def __init__(self) -> None:
        self.downs = 0

    async def backend_down(self) -> None:
        self.downs += 1


def test_backoff_doubles_to_its_limit_and_resets_after_a_long_life() -> None:
    backoff = Backoff(first_s=1.0, limit_s=30.0, reset_after_s=300.0)
    delays = []
    delay = None
    for _ in range(7):
        delay = backoff.next(delay, lived_s=5.0)
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff.next(30.0, lived_s=301.0) == 1.0


def test_exit_policy_reports_down_and_returns_1() -> None:
    torchserve, gateway = FakeTorchServe(), FakeGateway()
    supervisor = Supervisor(torchserve, "exit", poll_s=0.01, say=lambda _: None)  # type: ignore[arg-type]

    async def scenario() -> int:
        watch = asyncio.create_task(supervisor.watch(gateway))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert not watch.done()  # alive: keeps watching
        torchserve.die()
        return await asyncio.wait_for(watch, 5)

    assert asyncio.run(scenario()) == 1
    assert gateway.downs == 1
    assert torchserve.events == []  # no restart: the process manager's job


def test_restart_policy_restarts_with_backoff_until_it_comes_back() -> None:
    torchserve, gateway = FakeTorchServe(failed_starts=1), FakeGateway()
    said: list[str] = []
    backoff = Backoff(first_s=0.01, limit_s=0.05)
    supervisor = Supervisor(torchserve, "restart", backoff, poll_s=0.01, say=said.append)  # type: ignore[arg-type]

    async def scenario() -> None:
        watch = asyncio.create_task(supervisor.watch(gateway))  # type: ignore[arg-type]
        torchserve.die()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if "ready" in torchserve.events:
                break
        watch.cancel()

    asyncio.run(scenario())
    # The first start died while starting; the second came back.
    assert torchserve.events == ["stop", "start", "stop", "start", "ready"]
    assert gateway.downs == 2
    assert supervisor.restarts == 2
    assert said[-1] == "TorchServe is back"
    assert "restarting it in 0.01 s" in said[0] and "restarting it in 0.02 s" in said[2]


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        Supervisor(FakeTorchServe(), "ignore")  # type: ignore[arg-type]

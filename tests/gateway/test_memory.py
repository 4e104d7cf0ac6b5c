"""The heap trimmer gives memory back only when the gateway is idle after traffic (the
burst figures before and after: ``bench/results/chaos.md``)."""

from __future__ import annotations

import asyncio

from service.gateway.memory import HeapTrimmer


def test_trims_once_per_idle_spell_after_traffic() -> None:
    state = {"busy": 0, "served": 0}
    trimmer = HeapTrimmer(lambda: state["busy"], lambda: state["served"], interval_s=0.01)
    trims: list[int] = []
    trimmer.trim = lambda: trims.append(state["served"])

    async def scenario() -> None:
        task = asyncio.create_task(trimmer.run())
        await asyncio.sleep(0.05)  # no traffic yet: nothing to give back
        state.update(busy=5, served=5)
        await asyncio.sleep(0.05)  # calls in flight: never in the middle of a burst
        state.update(busy=0)
        await asyncio.sleep(0.05)  # idle after traffic: once
        state.update(served=6)
        await asyncio.sleep(0.05)  # one more call, idle again: once more
        task.cancel()

    asyncio.run(scenario())
    assert trims == [5, 6]


def test_malloc_trim_is_found_on_glibc() -> None:
    import platform

    trimmer = HeapTrimmer(lambda: 0, lambda: 0)
    if platform.libc_ver()[0] == "glibc":
        assert trimmer.trim is not None
        trimmer.trim()  # callable: returns 0 or 1, never raises

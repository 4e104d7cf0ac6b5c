"""The precision guard keeps autocast only where the measured times say it is faster.

No test times anything: the timer is injected, and the decision must follow the times it
returns. The functions the guard hands the timer are run here too, to check that they are
what it claims to compare (a float32 gradient pass, and the same pass under autocast).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from service.runtime.optimize.precision import choose_precision

SHAPE = (2, 3, 8, 8)


class Recorder(nn.Module):
    """A tiny conv net that records, per call, whether autocast was on and its input grad."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return self.conv(x).mean(dim=(2, 3))


def timer_returning(times: list[float]) -> tuple[Callable[..., list[float]], list[int]]:
    """A timer that runs each function once (as a real one would) and returns ``times``."""
    calls: list[int] = []

    def timer(fns: Sequence[Callable[[], None]], device: torch.device) -> list[float]:
        calls.append(len(fns))
        for fn in fns:
            fn()
        return list(times)

    return timer, calls


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_autocast_slower_than_float32_falls_back_and_logs_both_times(
    precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = Recorder()
    timer, calls = timer_returning([0.51, 8.3])  # float32, then autocast: the case
    with caplog.at_level(logging.WARNING, logger="service.runtime.optimize.precision"):
        choice = choose_precision(model, SHAPE, precision, timer=timer)
    assert calls == [2]
    assert (choice.asked, choice.chosen) == (precision, "float32")
    assert (choice.float32_seconds, choice.reduced_seconds) == (0.51, 8.3)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert f"{precision} asked, float32 used" in record.getMessage()
    assert "8.3000 s" in record.getMessage() and "0.5100 s" in record.getMessage()
    # What was compared: the first pass in float32, the second under that autocast.
    dtype = getattr(torch, precision)
    assert model.seen[0][0] is False
    assert model.seen[1] == (True, dtype)


def test_autocast_faster_than_float32_is_kept(caplog: pytest.LogCaptureFixture) -> None:
    timer, _ = timer_returning([0.40, 0.25])
    with caplog.at_level(logging.INFO, logger="service.runtime.optimize.precision"):
        choice = choose_precision(Recorder(), SHAPE, "bfloat16", timer=timer)
    assert choice.chosen == "bfloat16"
    assert "bfloat16 kept" in caplog.records[0].getMessage()


def test_a_tie_is_not_a_gain() -> None:
    timer, _ = timer_returning([0.3, 0.3])
    assert choose_precision(Recorder(), SHAPE, "bfloat16", timer=timer).chosen == "float32"


def test_float32_asked_times_nothing() -> None:
    timer, calls = timer_returning([1.0, 2.0])
    choice = choose_precision(Recorder(), SHAPE, "float32", timer=timer)
    assert choice.chosen == "float32" and calls == [] and choice.float32_seconds is None


def test_autocast_that_fails_on_the_device_falls_back() -> None:
    def failing(fns: Sequence[Callable[[], None]], device: torch.device) -> list[float]:
        raise RuntimeError("this device has no kernel for that dtype")

    choice = choose_precision(Recorder(), SHAPE, "float16", timer=failing)
    assert choice.chosen == "float32" and "autocast failed" in choice.reason


def test_an_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision(Recorder(), SHAPE, "int8")

"""ONNX Runtime settings chosen by measurement: the decision follows the measured times.

Every test injects the timings (``measure``) and the clock, so nothing here depends on how
fast this machine is; what the real sessions compute is checked in test_onnx_forward.py.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service.engine.engine import Engine
from service.runtime.ort_choice import (
    CHUNK_CANDIDATES,
    ENV,
    MARGIN,
    ROUNDS,
    SESSION_ROWS,
    Measure,
    OrtSettings,
    choose_ort_settings,
    session_candidates,
)
from service.runtime.ort_shared import SHARED_FILE, choose_for_model
from tests.runtime.tiny import tiny_classifier

DEFAULT = OrtSettings(threads=2, chunk=32)
CHUNKS = {DEFAULT.chunk, *CHUNK_CANDIDATES}


def scripted(
    per_row: dict[str, float], chunk_per_row: dict[int, float], calls: list[tuple[str, int]]
) -> Measure:
    """A measure whose seconds per row are ``per_row[label]`` while the options are compared
    (SESSION_ROWS rows, the default's chunk) and ``chunk_per_row[rows]`` while the chunk is
    (the settings' chunk = the rows run)."""

    def measure(settings: OrtSettings, rows: int) -> float:
        calls.append((settings.label(), rows))
        if settings.chunk == rows:
            return chunk_per_row[rows] * rows
        assert rows == SESSION_ROWS
        return per_row[settings.label()] * rows

    return measure


def labels() -> list[str]:
    return [s.label() for s in session_candidates(DEFAULT)]


def test_the_fastest_options_and_chunk_win() -> None:
    default, extended, parallel, half = labels()
    calls: list[tuple[str, int]] = []
    per_row = {default: 10e-3, extended: 8e-3, parallel: 9e-3, half: 12e-3}
    chunks = {8: 12e-3, 16: 7e-3, 32: 8e-3, 64: 7.5e-3}
    choice = choose_ort_settings(DEFAULT, scripted(per_row, chunks, calls))
    assert choice.settings == dataclasses.replace(DEFAULT, optimization="extended", chunk=16)
    assert choice.session_times == per_row
    assert choice.chunk_times == chunks
    # Every candidate timed ROUNDS times, in turn; the chunks with the options chosen.
    phase = len(session_candidates(DEFAULT)) * ROUNDS
    assert [label for label, _ in calls[:4]] == labels()
    assert calls[:phase] == calls[:4] * ROUNDS
    assert all(label == extended for label, _ in calls[phase:])
    assert len(calls) == phase + len(chunks) * ROUNDS
    assert "chunk 16" in choice.reason() and "8.00 ms/row" in choice.reason()


def test_a_gain_within_the_margin_keeps_the_default() -> None:
    default, extended, parallel, half = labels()
    near = 1 - MARGIN / 2  # faster, but by less than the margin
    per_row = {default: 10e-3, extended: 10e-3 * near, parallel: 11e-3, half: 12e-3}
    chunks = {8: 12e-3, 16: 8e-3 * near, 32: 8e-3, 64: 9e-3}
    choice = choose_ort_settings(DEFAULT, scripted(per_row, chunks, []))
    assert choice.settings == DEFAULT


def test_the_budget_stops_starting_candidates() -> None:
    now = [0.0]
    calls: list[tuple[str, int]] = []

    def measure(settings: OrtSettings, rows: int) -> float:
        calls.append((settings.label(), rows))
        now[0] += 10.0  # every timing takes 10 s of the budget
        return 1e-3 * rows if settings.optimization == "extended" else 2e-3 * rows

    choice = choose_ort_settings(DEFAULT, measure, budget_s=15.0, clock=lambda: now[0])
    # default at 0 s, extended at 10 s; at 20 s nothing new starts (the chunk phase keeps
    # its default, the one candidate every phase measures).
    assert [label for label, _ in calls] == [*labels()[:2], labels()[1]]
    assert choice.settings == dataclasses.replace(DEFAULT, optimization="extended")
    assert list(choice.chunk_times) == [DEFAULT.chunk]
    assert choice.seconds == 30.0


def test_pinned_settings_skip_the_measuring() -> None:
    def measure(settings: OrtSettings, rows: int) -> float:
        raise AssertionError("pinned settings must not be measured")

    choice = choose_ort_settings(
        DEFAULT, measure, pinned="threads=1, optimization=basic, parallel=1, chunk=48"
    )
    assert choice.pinned
    assert choice.settings == OrtSettings(threads=1, optimization="basic", parallel=True, chunk=48)
    assert ENV in choice.reason()
    # Keys left out keep the default's values.
    assert choose_ort_settings(DEFAULT, measure, pinned="chunk=8").settings == (
        dataclasses.replace(DEFAULT, chunk=8)
    )


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("chunk=0", "chunk must be a positive integer"),
        ("threads=two", "threads must be a positive integer"),
        ("optimization=max", "optimization must be one of"),
        ("parallel=yes", "parallel must be 0 or 1"),
        ("batch=8", "unknown key 'batch'"),
    ],
)
def test_a_bad_pinned_value_is_named(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        OrtSettings.parse(text, DEFAULT)


def test_forward_only_methods_run_at_the_forward_chunk() -> None:
    """The engine sends the ONNX forward ``forward_chunk_size`` rows per call (not the
    gradient chunk), and the map is the same as with any other chunk."""
    model = tiny_classifier()
    sizes: list[int] = []

    def forward(pixels: np.ndarray) -> np.ndarray:
        sizes.append(pixels.shape[0])
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = {}
    for forward_chunk in (5, 7):
        sizes.clear()
        engine = Engine(
            model,
            input_shape=(3, 16, 16),
            forward_numpy=forward,
            chunk_size=3,
            forward_chunk_size=forward_chunk,
        )
        maps[forward_chunk] = engine.explain(image, [0], "rise", {"n_masks": 20}).maps
        # 20 masked copies in full chunks (and the image itself, once, unmasked)
        assert max(sizes) == forward_chunk
        assert sizes.count(forward_chunk) == 20 // forward_chunk
    torch.testing.assert_close(maps[5], maps[7], rtol=1e-5, atol=1e-6)


def test_choose_for_model_times_real_sessions_or_takes_the_pin(
    model_path: tuple[torch.nn.Module, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = model_path[1]
    monkeypatch.delenv(ENV, raising=False)
    choice = choose_for_model(path, (3, 16, 16), DEFAULT)
    assert not choice.pinned
    assert choice.settings in [
        dataclasses.replace(s, chunk=c) for s in session_candidates(DEFAULT) for c in CHUNKS
    ]
    assert len(choice.session_times) >= 1 and DEFAULT.chunk in choice.chunk_times
    assert all(t > 0 for t in [*choice.session_times.values(), *choice.chunk_times.values()])
    monkeypatch.setenv(ENV, "chunk=8,parallel=1")
    pinned = choose_for_model(path, (3, 16, 16), DEFAULT)
    assert pinned.pinned and pinned.settings == dataclasses.replace(DEFAULT, chunk=8, parallel=True)


def test_a_models_other_workers_take_its_first_workers_choice(
    model_path: tuple[torch.nn.Module, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One server, one answer: the first load measures and records; later loads of the same
    model folder (another worker, a restarted one) read the record, measuring nothing; a
    record that does not parse is measured again and replaced; the pin still wins."""
    original = tmp_path / "model.onnx"  # a folder of its own, as TorchServe extracts one
    shutil.copyfile(model_path[1], original)
    monkeypatch.delenv(ENV, raising=False)
    first = choose_for_model(original, (3, 16, 16), DEFAULT)
    record = original.parent / SHARED_FILE
    assert not first.shared_from and record.read_text() == first.settings.pin()
    # A record naming settings no measurement would pick here proves it is read, not redone.
    odd = OrtSettings(threads=1, optimization="extended", parallel=True, chunk=24)
    record.write_text(odd.pin())
    second = choose_for_model(original, (3, 16, 16), DEFAULT)
    assert second.settings == odd and second.shared_from == str(record)
    assert not second.session_times and not second.chunk_times  # nothing was timed
    assert "first worker" in second.reason()
    record.write_text("threads=many")
    third = choose_for_model(original, (3, 16, 16), DEFAULT)
    assert not third.shared_from and third.chunk_times
    assert record.read_text() == third.settings.pin()
    monkeypatch.setenv(ENV, "chunk=8")
    assert choose_for_model(original, (3, 16, 16), DEFAULT).settings.chunk == 8


def test_pin_round_trips_through_parse() -> None:
    for settings in (
        DEFAULT,
        OrtSettings(threads=1, optimization="extended", parallel=True, chunk=8),
    ):
        assert OrtSettings.parse(settings.pin(), OrtSettings(threads=7)) == settings


def test_each_candidate_keeps_its_least_time_over_the_rounds() -> None:
    """A burst of load during one candidate's first timing does not lose it the choice."""
    extended = labels()[1]
    seen: dict[str, int] = {}

    def measure(settings: OrtSettings, rows: int) -> float:
        label = settings.label() if settings.chunk != rows else f"chunk {rows}"
        seen[label] = seen.get(label, 0) + 1
        burst = 4.0 if (label == extended and seen[label] == 1) else 1.0
        per_row = 8e-3 if label == extended else 10e-3
        return burst * per_row * rows

    choice = choose_ort_settings(DEFAULT, measure)
    assert choice.settings.optimization == "extended"
    assert choice.session_times[extended] == pytest.approx(8e-3)

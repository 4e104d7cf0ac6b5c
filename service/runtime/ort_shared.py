"""A model's ONNX Runtime settings, chosen once per server and shared by its workers.

:mod:`service.runtime.ort_choice` measures; this module decides who measures. Different
session options or rows per run round differently in the last bits, and RISE's stopping
rule or a float16 map can turn that into a visibly different answer, so every worker of a
model in one TorchServe uses the settings its first worker measured.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from service.runtime.ort_choice import (
    ENV,
    OrtChoice,
    OrtSettings,
    choose_ort_settings,
    session_timer,
)

logger = logging.getLogger(__name__)

SHARED_FILE = "ort_settings.txt"  # a model's choice, beside its ONNX file


def choose_for_model(path: Path, input_shape: Sequence[int], default: OrtSettings) -> OrtChoice:
    """:func:`choose_ort_settings` on the CPU for the model at ``path``, pinned by
    ``$SALIENCY_ORT_SETTINGS`` when set; logs the choice and the timings it rests on.

    The first worker of a model to load measures and records its choice in
    :data:`SHARED_FILE` beside the model; the model's other workers (and a restarted one)
    read it instead of measuring. Different session options or rows per run round
    differently in the last bits, and RISE's stopping rule or a float16 map can turn that
    into a visibly different answer: one server gives one answer to a seeded request,
    whichever worker takes it. A model folder that cannot be written is measured alone.
    """
    pinned = os.environ.get(ENV)
    if pinned:
        choice = choose_ort_settings(default, session_timer(path, input_shape), pinned=pinned)
    else:
        choice = _shared_choice(path, input_shape, default)
    logger.info("ONNX Runtime settings for %s: %s", path.parent.name, choice.reason())
    return choice


def _shared_choice(path: Path, input_shape: Sequence[int], default: OrtSettings) -> OrtChoice:
    record = path.parent / SHARED_FILE
    try:
        lock = open(path.parent / (SHARED_FILE + ".lock"), "a")  # noqa: SIM115 - held below
    except OSError as exc:
        logger.warning("ONNX Runtime choice not shared (%s): measured by this worker alone", exc)
        return choose_ort_settings(default, session_timer(path, input_shape))
    with lock:
        # Held while measuring: a second worker waits (at most the budget and a round)
        # rather than measuring beside the first, which would also slow both timings.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.exists():
            try:
                settings = OrtSettings.parse(record.read_text(), default)
                return OrtChoice(settings, shared_from=str(record))
            except ValueError as exc:  # a record from another version: measure again
                logger.warning("ignoring %s: %s", record, exc)
        choice = choose_ort_settings(default, session_timer(path, input_shape))
        partial = record.with_suffix(".tmp")
        partial.write_text(choice.settings.pin())
        partial.replace(record)
        return choice

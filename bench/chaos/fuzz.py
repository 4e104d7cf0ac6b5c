"""A seeded fuzzer of the public API: what a careless or hostile client can send.

Every case is drawn from one ``random.Random(seed)``: raw request bytes, random field
values (model names up to 20,000 characters, top-k and targets up to 2^32 - 1, enum
numbers nobody registered, seeds), method, mask and score parameters drawn from the
server's own ``GetModelInfo`` (the registries' ``Param`` specs: in bounds, on them, past
them, NaN, infinities, 1e309, 2^31, huge strings, wrong types, unknown names) and images
(:mod:`bench.chaos.images`). :func:`verdict` says what is wrong with an answer.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from bench.chaos.images import Images
from service._proto.saliency.v1 import saliency_pb2 as pb

SERVICE = "/saliency.v1.ExplainService/"
FORBIDDEN = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS"}
"""Codes a request must never get: a fault of the server (or a worker it killed)."""
MAX_DETAILS = 1100
"""The protocol's message bound (1000 characters and a short suffix)."""
MAX_ECHO = 250
"""Longest run of one repeated character of our huge inputs that may come back (~200)."""
HUGE = 100_000


@dataclass(frozen=True)
class Case:
    """One call: the RPC, the bytes sent, and what they are (for a failure's message)."""

    rpc: str
    payload: bytes
    what: str


@dataclass(frozen=True)
class Outcome:
    case: Case
    code: str
    details: str
    seconds: float


def _number_values(info: pb.ParamInfo, rng: random.Random) -> tuple[list[str], list[str]]:
    low = info.minimum if info.HasField("minimum") else -1e6
    high = info.maximum if info.HasField("maximum") else 1e6
    # Inside the bounds, mostly near the bottom: the cost of most parameters grows with
    # their value, and a run of mostly expensive requests measures the deadline, not us.
    inside = low + (high - low) * rng.random() ** 4
    if info.type == "int":
        valid = [info.default, str(int(low)), str(int(inside))]
        hostile = [str(int(high) + 1), str(2**31), str(-(2**63)), "1.5", repr(low - 1)]
    else:
        valid = [info.default, repr(low), repr(inside), repr(high)]
        hostile = [repr(low - 1), repr(high + 1)]
    return valid, [*hostile, "nan", "inf", "-inf", "1e309", "", "x" * HUGE, "0x10", " 3 "]


def param_value(info: pb.ParamInfo, rng: random.Random, hostile: bool) -> str:
    """A value for parameter ``info``: a valid one, or (``hostile``) one that is not."""
    if info.type in ("int", "float"):
        valid, bad = _number_values(info, rng)
    elif info.type == "bool":
        valid, bad = ["true", "false"], ["1", "maybe", "", "T" * HUGE]
    else:
        valid = list(info.choices) or [info.default]
        bad = ["", "no-such-choice", "\u00e9\u4e2d\U0001f600", "y" * HUGE]
    return rng.choice(bad if hostile else valid)


class Fuzzer:
    """Draws :class:`Case` objects.

    Args:
        info: the server's ``ModelInfo`` (methods, masks and scores with their params).
        images: encoded images the model can read.
        seed: the generator's seed; the same seed draws the same cases.
        hostility: the chance that any one field of a request is hostile; at 0.1 about a
            third of the requests have no hostile field and are served, beside the rest.
    """

    def __init__(
        self, info: pb.ModelInfo, images: Sequence[bytes], seed: int, hostility: float = 0.1
    ) -> None:
        self.info = info
        self.rng = random.Random(seed)
        self.images = Images(images, self.rng)
        self.hostility = hostility

    def cases(self, count: int) -> list[Case]:
        return [self.case() for _ in range(count)]

    def pick(self, valid: Sequence[Any], hostile: Sequence[Any]) -> Any:
        return self.rng.choice(hostile if self.rng.random() < self.hostility else valid)

    def case(self) -> Case:
        roll = self.rng.random()
        if roll < 0.08:
            rpc = self.rng.choice(["Explain", "ExplainStream", "Predict", "GetModelInfo"])
            data = self.rng.randbytes(self.rng.randrange(0, 3000))
            return Case(rpc, data, f"{len(data)} random bytes")
        if roll < 0.25:
            request = pb.PredictRequest(
                model=self._model(), image=self.images.draw(), top_k=self._count()
            )
            return Case("Predict", request.SerializeToString(), "predict")
        if roll < 0.28:
            info = pb.GetModelInfoRequest(model=self._model())
            return Case("GetModelInfo", info.SerializeToString(), "info")
        rpc = "ExplainStream" if self.rng.random() < 0.3 else "Explain"
        request = self._explain()
        asked = {c.method for c in request.methods}
        names = [m.name for m in self.info.methods if m.method in asked]
        return Case(rpc, request.SerializeToString(), f"methods {names or 'unregistered'}")

    def _model(self) -> str:
        hostile = ["no-such-model", "m" * 20_000, "../../etc", "\x00"]
        return str(self.pick(["", "", self.info.model.name], hostile))

    def _count(self) -> int:
        return int(self.pick([0, 1, 1, 2, 3], [21, 1000, 2**32 - 1]))

    def _params(self, infos: Sequence[pb.ParamInfo]) -> dict[str, str]:
        rng = self.rng
        chosen = {
            p.name: param_value(p, rng, rng.random() < self.hostility)
            for p in infos
            if rng.random() < 0.5
        }
        if rng.random() < self.hostility / 2:
            chosen[rng.choice(["no_such_param", "k" * 20_000, ""])] = "1"
        return chosen

    def _explain(self) -> pb.ExplainRequest:
        rng = self.rng
        methods = []
        for _ in range(int(self.pick([0, 1, 1, 1, 2, 3], [40]))):
            if rng.random() < self.hostility / 3:
                methods.append(pb.MethodRequest(method=rng.choice([0, 999, 2**31 - 1])))  # type: ignore[arg-type]
                continue
            entry = rng.choice(list(self.info.methods))
            methods.append(pb.MethodRequest(method=entry.method, params=self._params(entry.params)))
        mask = rng.choice(list(self.info.masks))
        scores = [s.score for s in self.info.scores if rng.random() < 0.15]
        return pb.ExplainRequest(
            model=self._model(),
            image=self.images.draw(),
            top_k=self._count(),
            target_classes=self.pick([[], [], [0], [3, 9]], [[10], [2**32 - 1], [0] * 40]),
            methods=methods,
            mask=pb.MaskOptions(
                kind=self.pick([mask.kind], [77]),
                params=self._params(mask.params),
                percentile=self.pick([0.0, 0.0, 50.0], [-1.0, math.nan, math.inf]),
            ),
            map_encoding=self.pick([0, 1, 2], [9]),
            seed=rng.choice([0, 1, 2**64 - 1]),
            scores=scores + self.pick([[]], [[0], [99]]),
        )


def call(channel: grpc.Channel, case: Case, timeout: float) -> Outcome:
    """Send ``case`` as it is (no client-side parsing) and read every part of the answer."""
    path = SERVICE + case.rpc
    start = time.monotonic()
    try:
        if case.rpc == "ExplainStream":
            for _ in channel.unary_stream(path)(case.payload, timeout=timeout):
                pass
        else:
            channel.unary_unary(path)(case.payload, timeout=timeout)
    except grpc.RpcError as err:
        code, details = err.code().name, err.details() or ""  # type: ignore[attr-defined]
    else:
        code, details = "OK", ""
    return Outcome(case, code, details, time.monotonic() - start)


def _longest_run(text: str) -> int:
    best = run = 0
    for previous, current in zip(" " + text, text, strict=False):
        run = run + 1 if current == previous else 1
        best = max(best, run)
    return best


def verdict(outcome: Outcome) -> str | None:
    """What is wrong with an answer, or ``None``."""
    if outcome.code in FORBIDDEN:
        return f"{outcome.code}: {outcome.details[:300]!r}"
    if len(outcome.details) > MAX_DETAILS:
        return f"a message of {len(outcome.details)} characters"
    if _longest_run(outcome.details) > MAX_ECHO:
        return f"an echo of {_longest_run(outcome.details)} repeated characters"
    return None

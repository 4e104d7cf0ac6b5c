"""The seeded fuzz run of ``make test``: a few hundred hostile requests against the real
stack (``bench.chaos.fuzz``; the >= 5,000-request run is in ``make bench``).

No answer may be INTERNAL, UNKNOWN or UNAVAILABLE, carry an unbounded message or echo a
huge input; no worker may die; and a normal request is served after. It runs on the
scratch stack: what it finds (a worker it kills) must fail this test, not the ones after it.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from bench.chaos.fuzz import Fuzzer, call, verdict
from bench.chaos.processes import listed_workers, worker_pids
from service.client import SaliencyClient
from service.protocol.limits import MAX_MESSAGE_BYTES
from service.stack import Stack

pytestmark = pytest.mark.integration
SEED = 20251130
COUNT = 300
TIMEOUT_S = 2.0  # every call has a deadline: no call can hang the run
CLIENTS = 8


def test_fuzzed_requests_get_clear_statuses_and_serving_goes_on(
    scratch_stack: Stack, samples: list[tuple[bytes, int, object]]
) -> None:
    torchserve, address = scratch_stack.torchserve, scratch_stack.gateway.address
    workers = listed_workers(torchserve)
    with SaliencyClient(address) as client:
        cases = Fuzzer(client.model_info(), [s[0] for s in samples], SEED).cases(COUNT)
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        with (
            grpc.insecure_channel(address, options=options) as channel,
            ThreadPoolExecutor(CLIENTS) as pool,
        ):
            outcomes = list(pool.map(lambda case: call(channel, case, TIMEOUT_S), cases))
        problems = [
            f"{o.case.rpc} ({o.case.what}): {problem}"
            for o in outcomes
            if (problem := verdict(o)) is not None
        ]
        assert problems == []
        # How many were OK or ran out of time depends on this machine's speed; that some
        # were refused for what they are does not (undecodable bytes, unknown names, NaN...).
        codes = Counter(o.code for o in outcomes)
        print(f"fuzz: {COUNT} calls, {dict(codes)}")
        assert codes["INVALID_ARGUMENT"] > 0
        # Serving goes on: a normal request, and every worker that was there is still there.
        data, label, _ = samples[0]
        reply = client.explain(data, methods=["grad_cam"], timeout=60)
        assert reply.predictions[0].index == label and reply.explanations
    # A worker that died was replaced by one with another pid, or (when TorchServe failed to
    # restart it) is still listed with its dead pid: either way not what was there.
    running = {name: worker_pids(torchserve, name) for name in torchserve.registered}
    assert listed_workers(torchserve) == workers == running

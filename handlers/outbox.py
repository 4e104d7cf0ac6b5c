"""Where a batch's replies go: only in the sequences TorchServe 0.12's frontend survives.

What follows was read in TorchServe 0.12.0's source (``GRPCJob.response``,
``BatchAggregator.sendResponse``, ``WorkerThread.run``, ``RestJob.responseInference``;
``ts/service.py``, ``ts/protocol/otf_message_handler.py``) and is tested against real
TorchServe in ``tests/integration/test_worker_safety.py``. The worker writes intermediate
messages (``send_intermediate_predict_response``: each request in one gets the header
``ts_stream_next: true``) and one final message (what ``handle`` returns, for every request
still in ``context.request_ids``). Any exception while the frontend hands a message to its
jobs ends ``WorkerThread.run``: the worker is killed and its batch answered "Worker died".

1. A ``StreamPredictions`` job reads ``headers.get("ts_stream_next").equals("false")`` on
   every part it gets: a part without the header is a NullPointerException. TorchServe
   writes "false" only where an earlier part wrote "true", so a stream that failed before
   its first part killed the worker (finding 1). Rule: the final reply of every request
   that came over gRPC carries ``ts_stream_next: false`` (a unary job never reads it). Not
   over HTTP, where any such header turns the reply into chunks, and "false" without a
   first chunk into a broken response.
2. A unary (``Predictions``) job completes its call on the first part it gets, whatever
   the header, and a second part is an IllegalStateException. A message holding a part
   marked "true" keeps the batch open; one without closes it, and what the worker writes
   afterwards is read as the next batch's answer. Rule: a unary gRPC request's reply may
   go *early*, alone in an intermediate message, if the request then leaves
   ``context.request_ids`` -- the dict ``ts/service.py`` writes the final message from -- so
   nothing answers it twice. A stream's last reply cannot go early ("false" would close
   the batch), nor an HTTP reply (a chunked response no last chunk would end). The worker
   cannot tell the two gRPC calls apart, so only a request that says it is unary
   (``stream`` = ``false``, as the gateway sends) goes early: the same early message would
   leave a ``StreamPredictions`` call without its end.
3. ``GRPCJob`` checks ``isCancelled()``, then writes: a call that its deadline closes in
   between is written anyway, "call is closed" (finding 6). The window is in the frontend;
   the worker stays out of it. Within :data:`GUARD_S` of a caller's deadline no part is
   written, no reply goes early, and a final message due then waits until ``GUARD_S`` after
   the deadline, when the frontend has long seen the call close (it then drops the reply;
   a caller that gave no gRPC deadline still gets it).
4. A request that the gateway marked cancelled (:mod:`service.serving.cancel`) gets no more
   parts, and the final message leaves it out: the gateway cancels the call after marking
   it, nobody reads the reply, and a reply never written races with nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.events import EventKind, event_kind, stream_part

GUARD_S = 0.25
"""Half-width of the quiet window around a caller's deadline. The frontend closes an
expired call within milliseconds; a quarter second is far beyond that and costs a batch
that holds an expiring request at most half a second more."""
STREAM_NEXT = "ts_stream_next"

Reply = bytes | str


@dataclass
class Slot:
    """One request of the batch, as the outbox must treat it.

    Attributes:
        index: its position in the batch (TorchServe's key in ``request_ids``).
        grpc: it came over TorchServe's gRPC API (an HTTP request carries its headers).
        stream: its caller reads parts (``stream`` = ``true``).
        unary: its caller said it makes a unary call (``stream`` = ``false``).
        deadline: the caller's deadline, ``time.monotonic()`` based, or ``None``.
        cancelled: True once the gateway marked it cancelled.
        gone: its reply was sent early, or left out: the final message skips it.
        shown: explanations (by position) a stream part delivered, scores and all.
        frozen: a part could not go; no later part goes either, and the summary carries
            every explanation that was not shown.
    """

    index: int
    grpc: bool
    stream: bool
    unary: bool = False
    deadline: float | None = None
    cancelled: Callable[[], bool] = lambda: False
    gone: bool = False
    shown: set[int] = field(default_factory=set)
    frozen: bool = False
    explanations: int = 0  # explanation parts so far, sent or not

    def quiet(self, now: float) -> bool:
        """Within the window around the deadline where nothing may be written."""
        return self.deadline is not None and abs(now - self.deadline) < GUARD_S

    def writable(self, now: float) -> bool:
        """A part may go: not cancelled, and not at (or past) its deadline's window."""
        late = self.deadline is not None and now > self.deadline - GUARD_S
        return not late and not self.cancelled()


class Outbox:
    """The replies of one ``handle`` call, written only as the module docstring allows.

    Args:
        context: TorchServe's ``Context`` of the batch.
        slots: one per request, in batch order.
        send: writes one intermediate message (``send_intermediate_predict_response``).
        clock, sleep: ``time.monotonic`` and ``time.sleep`` (tests pass their own).
    """

    def __init__(
        self,
        context: Any,
        slots: Sequence[Slot],
        send: Callable[[dict[int, Reply], dict[int, str], str, int, Any], None],
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.context = context
        self.slots = list(slots)
        self.send = send
        self.clock = clock or time.monotonic
        self.sleep = sleep or time.sleep

    def part(self, index: int, part: pb.ExplainStreamResponse) -> None:
        """Send one stream part now if it may go, else freeze the stream (see ``Slot``)."""
        slot = self.slots[index]
        kind = event_kind(part)
        position = None
        if kind is EventKind.EXPLANATION:
            position, slot.explanations = slot.explanations, slot.explanations + 1
        elif kind is EventKind.SCORES:
            position = part.scores.explanation_index
        if not self._streams(slot):
            slot.shown.discard(position)  # type: ignore[arg-type]
            return
        self._send(index, part.SerializeToString())
        if kind is EventKind.EXPLANATION:
            slot.shown.add(position)  # type: ignore[arg-type]

    def progress(self, index: int, payload: bytes) -> None:
        """Send a part that the final reply need not repeat (a class visualisation's
        progress, an explanation's refinement) if it may go; else freeze the stream and
        drop it, as :meth:`part` does."""
        if self._streams(self.slots[index]):
            self._send(index, payload)

    def open(self, index: int) -> bool:
        """Whether a part of request ``index`` may go now; changes nothing (a sender asks
        before it builds a costly part)."""
        slot = self.slots[index]
        return not (slot.gone or not slot.stream or slot.frozen) and slot.writable(self.clock())

    def _streams(self, slot: Slot) -> bool:
        """Whether a part of ``slot`` may go now; freezes the stream when not."""
        if not self.open(slot.index):
            slot.frozen = True
            return False
        return True

    def summary(self, index: int, response: pb.ExplainResponse) -> bytes:
        """A stream's last part: the response without the explanations parts showed."""
        shown = self.slots[index].shown
        kept = [e for i, e in enumerate(response.explanations) if i not in shown]
        del response.explanations[:]
        response.explanations.extend(kept)
        return stream_part(EventKind.DONE, response).SerializeToString()

    def early(self, index: int, payload: Reply) -> bool:
        """Send a unary gRPC request's whole reply now, if it may go (rule 2); returns
        whether it went. One that does not go waits for the final message."""
        slot = self.slots[index]
        if slot.gone or not (slot.unary and slot.grpc) or not slot.writable(self.clock()):
            return False
        self._send(index, payload)
        self._leave(slot)
        return True

    def final(self, replies: Sequence[Reply | None]) -> list[Reply]:
        """The list ``handle`` returns: a reply per request, headers set (rule 1), the
        cancelled left out (rule 4), after waiting out any deadline's window (rule 3)."""
        for slot in self.slots:
            if not slot.gone and slot.cancelled():
                self._leave(slot)
        kept = [slot for slot in self.slots if not slot.gone]
        now = self.clock()
        held = [slot.deadline + GUARD_S for slot in kept if slot.quiet(now)]  # type: ignore[operator]
        if held:
            self.sleep(max(held) - now)
        for slot in kept:
            if slot.grpc:
                self.context.set_response_header(slot.index, STREAM_NEXT, "false")
        return [b"" if reply is None else reply for reply in replies]

    def _send(self, index: int, payload: Reply) -> None:
        request_id = self.context.request_ids[index]
        self.send(
            {index: payload},
            {index: request_id},
            "Intermediate Prediction success",
            200,
            self.context,
        )

    def _leave(self, slot: Slot) -> None:
        slot.gone = True
        self.context.request_ids.pop(slot.index, None)

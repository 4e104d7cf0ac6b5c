"""End to end over gRPC (gateway -> TorchServe -> engine) against the engine in process.

Run ``python -m bench.e2e`` (``make bench`` runs it too). It builds the default model's
archive, starts a real TorchServe on free loopback ports and the gateway in a background
asyncio thread, and measures, with Explain requests for ``vanilla_gradient`` on held-out
synthetic images:

* the in-process baseline: :class:`service.serving.pipeline.Explainer` over
  :func:`service.runtime.artifacts.load_bundle` on the same archive's files, batches of 1
  of 8 and of 16, one after another on every core (the bar compares with the best of them);
* throughput (requests/s) and latency at 1, 8 and 16 concurrent clients over gRPC, and
  the p50 overhead at 1 client in milliseconds; the client threads run in a process of
  their own (:mod:`bench.e2e.clients`), not in the gateway's, whose loop they would slow;
* the throughput bar: ``--rounds`` pairs of (in process at batch 16, gRPC at 8 clients)
  measured back to back, the median of the pairs' ratios (on a shared machine a figure
  taken minutes apart carries another load); each round also measures gRPC with the
  clients in the gateway's process, as this bench did before, reported beside it;
* CPU seconds per request by component (clients, gateway, TorchServe frontend, workers);
  ``--ts-setting KEY=VALUE`` adds a ``config.properties`` entry to compare runs;
* TorchServe's batch size, batch delay and worker count: a sweep, each configuration
  registered in turn on the same TorchServe through its management API, throughput at 8
  and 16 clients; dynamic batching is the default batch size against batch 1 (same
  workers) at 16 clients;
* the worker's resident memory over a sustained run (``--minutes``, 1 by default; 10 for
  the growth check of the issue), with its slope.

Every figure comes from this run. Writes ``bench/results/e2e.md``; exits 1 on a missed bar
only with ``--strict`` (so that ``bench.run`` goes on).
"""

from __future__ import annotations

from pathlib import Path

MODULE = "bench.e2e"
RESULTS = Path(__file__).resolve().parent.parent / "results" / "e2e.md"
MODEL = "shapes"
METHOD = "vanilla_gradient"
THROUGHPUT_BAR = 0.85  # e2e at 8 clients / in process (paired rounds, median)
BATCHING_BAR = 1.5  # 16 clients: the default batch size / batch 1
GROWTH_BAR_MIB = 10.0  # worker RSS growth over the sustained run counted as "no growth"
# Where CPU time goes on the served path; "clients" are the bench's callers, which a
# deployment does not run (they are measured in a process of their own).
COMPONENTS = ("clients", "gateway", "TorchServe frontend", "worker")

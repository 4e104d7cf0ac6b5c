"""The chaos runs. Each returns the lines of its section of ``bench/results/chaos.md`` and
the figures of the summary table (name -> (figure, bar, met))."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from bench.chaos.fuzz import Fuzzer, call, verdict
from bench.chaos.load import Tally, run_clients, stream_burst
from bench.chaos.processes import (
    PeakMemory,
    gateway_process,
    java_of,
    listed_workers,
    rss_mb,
    serve_process,
    serving,
    worker_pids,
)
from service.client import SaliencyClient
from service.launcher import TorchServe
from service.protocol.limits import MAX_MESSAGE_BYTES

Figures = dict[str, tuple[str, str, bool]]
Section = tuple[list[str], Figures]


def fuzz(torchserve: TorchServe, images: Sequence[bytes], count: int, seed: int) -> Section:
    with gateway_process(torchserve) as (_, address), SaliencyClient(address) as client:
        info = client.model_info(timeout=60)
        workers = listed_workers(torchserve)
        cases = Fuzzer(info, images, seed).cases(count)
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        start = time.monotonic()
        with (
            grpc.insecure_channel(address, options=options) as channel,
            ThreadPoolExecutor(8) as pool,
        ):
            outcomes = list(pool.map(lambda case: call(channel, case, 2.0), cases))
        wall = time.monotonic() - start
        problems = [f"{o.case.rpc} ({o.case.what}): {p}" for o in outcomes if (p := verdict(o))]
        try:
            served_after = bool(
                client.explain(images[0], methods=["grad_cam"], timeout=120).explanations
            )
        except grpc.RpcError as err:
            served_after = False
            problems.append(f"the normal Explain after the run: {err.code().name}")  # type: ignore[attr-defined]
        survived = {
            name: worker_pids(torchserve, name) for name in torchserve.registered
        } == workers
    codes = Counter(o.code for o in outcomes)
    lines = [
        f"{count} cases (seed {seed}), 8 clients, 2 s deadline each: {wall:.0f} s.",
        "",
        "| status | calls |",
        "|---|---:|",
        *(f"| {code} | {n} |" for code, n in codes.most_common()),
        "",
        f"Problems (INTERNAL/UNKNOWN/UNAVAILABLE, unbounded message, echo): {len(problems)}.",
        *(f"- {p}" for p in problems[:20]),
        f"Every worker that was there before is there after: {survived}; "
        f"a normal Explain after the run: {'OK' if served_after else 'failed'}.",
    ]
    figures = {
        f"fuzz: {count} requests, forbidden codes or bad messages": (
            str(len(problems)),
            "0",
            not problems,
        ),
        "fuzz: workers lost": ("0" if survived else "some", "0", survived),
    }
    return lines, figures


def worker_kill(torchserve: TorchServe, images: Sequence[bytes], seconds: float) -> Section:
    tally = Tally()
    killed: list[str] = []

    def killer() -> None:
        for at, pool in ((seconds * 0.2, "shapes"), (seconds * 0.5, "shapes--predict")):
            time.sleep(max(at - (time.monotonic() - began), 0))
            running = worker_pids(torchserve, pool)
            if not running:
                killed.append(f"no running {pool} worker to kill")
                continue
            os.kill(running[0], signal.SIGKILL)
            killed.append(f"{pool} worker {running[0]} at {time.monotonic() - began:.0f} s")

    with gateway_process(torchserve) as (_, address):
        began = time.monotonic()
        thread = threading.Thread(target=killer)
        thread.start()
        run_clients(address, images, clients=8, seconds=seconds, tally=tally)
        thread.join()
        time.sleep(15)  # a restart takes seconds; longer means TorchServe lost the worker
        restored = {pool: len(worker_pids(torchserve, pool)) for pool in torchserve.registered}
    errors = len(tally.errors)
    whole = all(n == 2 for n in restored.values())
    lines = [
        f"8 clients (Explain then Predict, in a loop) for {seconds:.0f} s; SIGKILL to "
        + "; ".join(killed)
        + ".",
        "",
        f"Calls: {dict(tally.total())}; client-visible errors: {errors}. Running workers "
        f"15 s after the run: {restored}.",
        *(f"- {e}" for e in tally.errors[:10]),
    ]
    return lines, {
        "worker kill under 8 clients: client-visible errors": (str(errors), "0", errors == 0),
        "worker kill under 8 clients: pools whole again 15 s after": (
            "yes" if whole else "no",
            "yes",
            whole and len(killed) == 2 and "no running" not in " ".join(killed),
        ),
    }


def burst(torchserve: TorchServe, image: bytes) -> Section:
    lines = [
        "| gateway | statuses of 3 x 1,000 streams | RSS before | peak | 15 s after |",
        "|---|---|---:|---:|---:|",
    ]
    figures: Figures = {}
    for label, flags in (
        ("before: no bound, heap kept", ("--max-in-flight-explain", "1000000", "--no-heap-trim")),
        ("now: bounded, heap trimmed", ()),
    ):
        with gateway_process(torchserve, *flags) as (process, address):
            stream_burst(address, image, 20)
            time.sleep(2)
            before, statuses = rss_mb(process), Counter[str]()
            peak = PeakMemory(process)
            with peak:
                for _ in range(3):
                    statuses.update(stream_burst(address, image, 1000))
            time.sleep(15)
            after = rss_mb(process)
        lines.append(
            f"| {label} | {dict(statuses)} | {before:.0f} MB | {peak.mb:.0f} MB | {after:.0f} MB |"
        )
        if label.startswith("now"):
            only = set(statuses) <= {"OK", "RESOURCE_EXHAUSTED"}
            figures["1,000-stream burst: statuses other than OK / RESOURCE_EXHAUSTED"] = (
                str(sum(n for c, n in statuses.items() if c not in ("OK", "RESOURCE_EXHAUSTED"))),
                "0",
                only,
            )
            figures["1,000-stream burst: gateway RSS growth that stays (MB)"] = (
                f"{after - before:+.0f}",
                "< 20",
                after - before < 20,
            )
    return lines, figures


def soak(torchserve: TorchServe, images: Sequence[bytes], minutes: float) -> Section:
    tally = Tally()
    samples: list[tuple[float, float]] = []
    with gateway_process(torchserve) as (process, address):
        began = time.monotonic()
        load = threading.Thread(target=run_clients, args=(address, images, 16, minutes * 60, tally))
        load.start()
        while load.is_alive():
            samples.append((time.monotonic() - began, rss_mb(process)))
            load.join(10)
    window = minutes * 60 / 5
    lines = [
        f"16 clients for {minutes:g} min (Explain with a cheap method, then Predict). "
        f"Calls: {dict(tally.total())}.",
        "",
        "| window | gateway RSS | Explain p50 / p99 | Predict p50 / p99 |",
        "|---|---:|---:|---:|",
    ]
    for i in range(5):
        lo, hi = began + i * window, began + (i + 1) * window
        rss = [m for t, m in samples if i * window <= t < (i + 1) * window] or [float("nan")]
        cells = [
            f"{tally.percentile(rpc, 50, lo, hi) * 1000:.0f} / "
            f"{tally.percentile(rpc, 99, lo, hi) * 1000:.0f} ms"
            for rpc in ("Explain", "Predict")
        ]
        span = f"{i * window / 60:.1f}-{(i + 1) * window / 60:.1f} min"
        lines.append(f"| {span} | {max(rss):.0f} MB | {cells[0]} | {cells[1]} |")
    first = [m for t, m in samples if t < window]
    last = [m for t, m in samples if t >= 4 * window]
    growth = max(last) - max(first)
    p99s = [
        tally.percentile("Explain", 99, began + i * window, began + (i + 1) * window)
        for i in range(5)
    ]
    steady = max(p99s[1:]) < 2 * min(p99s[1:])
    return lines, {
        f"{minutes:g} min at 16 clients: gateway RSS, last window - first (MB)": (
            f"{growth:+.0f}",
            "< 20",
            growth < 20,
        ),
        f"{minutes:g} min at 16 clients: Explain p99 across windows (max / min)": (
            f"{max(p99s[1:]) / min(p99s[1:]):.2f}",
            "< 2",
            steady,
        ),
        f"{minutes:g} min at 16 clients: errors": (str(len(tally.errors)), "0", not tally.errors),
    }


def java_kill_and_drain(model_store: Path, run_root: Path, image: bytes) -> Section:
    from bench.chaos.processes import free_port

    health = free_port()
    process, console, address = serve_process(model_store, run_root / "restart", "restart", health)
    health_address = f"127.0.0.1:{health}"
    try:
        while not serving(health_address):
            time.sleep(0.1)
        killed = time.monotonic()
        java_of(process.pid).kill()
        while serving(health_address):
            time.sleep(0.02)
        down = time.monotonic() - killed
        console.wait_for(r"TorchServe is back", 400)
        while not serving(health_address):
            time.sleep(0.1)
        back = time.monotonic() - killed
        with SaliencyClient(address) as client:
            predicted = bool(client.predict(image, timeout=60).predictions)
            # SIGTERM with calls in flight: each must finish.
            answers: list[str] = []

            def slow() -> None:
                try:
                    client.explain(
                        image, methods=[("sobol", {"grid_size": 8, "n_designs": 32})], timeout=300
                    )
                    answers.append("OK")
                except grpc.RpcError as err:
                    answers.append(err.code().name)  # type: ignore[attr-defined]

            threads = [threading.Thread(target=slow) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            for thread in threads:
                thread.join(300)
        drained = process.wait(300)
    finally:
        if process.poll() is None:
            process.kill()
    said = [line for _, line in console.seen if "TorchServe" in line and "restart" in line]
    process, console, _ = serve_process(model_store, run_root / "exit", "exit", free_port())
    killed = time.monotonic()
    java_of(process.pid).kill()
    code = process.wait(300)
    exited = time.monotonic() - killed
    lines = [
        "`saliency-serve serve --on-backend-exit restart`, Java SIGKILLed: health NOT_SERVING "
        f"after {down:.2f} s; the supervisor said {said[:1]}; SERVING again after {back:.0f} s "
        f"(a Predict then: {'OK' if predicted else 'failed'}).",
        f"SIGTERM with 4 Sobol explanations in flight: {dict(Counter(answers))}; "
        f"exit status {drained}.",
        f"`--on-backend-exit exit`, Java SIGKILLed: exit status {code} after {exited:.1f} s "
        "(the gateway drained first; a process manager restarts it).",
    ]
    return lines, {
        "Java kill: seconds to NOT_SERVING": (f"{down:.2f}", "< 2", down < 2),
        "Java kill (restart policy): back to SERVING (s)": (f"{back:.0f}", "comes back", predicted),
        "Java kill (exit policy): exit status": (str(code), "1", code == 1),
        "SIGTERM drain: in-flight calls that did not finish": (
            str(sum(a != "OK" for a in answers)),
            "0",
            answers == ["OK"] * 4 and drained == 0,
        ),
    }

"""``python -m bench.chaos``: the fault runs and the long fuzz run -> bench/results/chaos.md.

Runs, in order, against a TorchServe started here (default archive, 2 + 2 workers) with a
gateway process of their own: the fuzz run, a worker kill under 8 clients, 1,000-stream
bursts (before/after the memory fix), 10 minutes at 16 clients; then against
``saliency-serve serve`` processes: the Java kill under both supervision policies and a
SIGTERM drain. ``--quick`` shrinks every run (a smoke test of the suite, not figures).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
import time
from pathlib import Path

import cv2

from bench.chaos import runs
from bench.machine import cpu_model, write_report
from service.archive import build_default_archive
from service.models.synthetic import generate
from service.stack import running_torchserve

OUT = Path(__file__).resolve().parents[1] / "results" / "chaos.md"


def images(count: int = 8) -> list[bytes]:
    batch = generate(count, seed=424242)
    out = []
    for image in batch.images:
        ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        assert ok
        out.append(data.tobytes())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fuzz", type=int, default=5000)
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--keep", type=Path, help="keep TorchServe's run directories (logs) here")
    parser.add_argument(
        "--only",
        default="fuzz,kill,burst,soak,serve",
        help="comma-separated runs (a report of fewer runs is not the benchmark's)",
    )
    args = parser.parse_args()
    fuzz_count = 200 if args.quick else args.fuzz
    minutes = 1.0 if args.quick else args.soak_minutes
    chosen = set(args.only.split(","))
    samples = images()
    sections: list[tuple[str, list[str]]] = []
    figures: runs.Figures = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        tmp = args.keep or Path(scratch)
        store = Path(tmp) / "store"
        build_default_archive(store)
        with running_torchserve(store, {"shapes": "shapes.mar"}, Path(tmp) / "ts") as ts:
            for key, title, run in (
                ("fuzz", "Fuzz", lambda: runs.fuzz(ts, samples, fuzz_count, seed=20251130)),
                (
                    "kill",
                    "Worker kill under 8 clients",
                    lambda: runs.worker_kill(ts, samples, 20 if args.quick else 60),
                ),
                (
                    "burst",
                    "1,000-stream bursts and gateway memory (finding 15)",
                    lambda: runs.burst(ts, samples[0]),
                ),
                (
                    "soak",
                    f"{minutes:g} minutes at 16 clients",
                    lambda: runs.soak(ts, samples, minutes),
                ),
            ):
                if key not in chosen:
                    continue
                print(f"-- {title}", flush=True)
                lines, found = run()
                sections.append((title, lines))
                figures.update(found)
        if "serve" in chosen:
            print("-- Java kill, supervision, SIGTERM drain", flush=True)
            lines, found = runs.java_kill_and_drain(store, Path(tmp) / "serve", samples[0])
            sections.append(("Java kill, supervision and SIGTERM drain", lines))
            figures.update(found)
    report = [
        "# Chaos: faults, overload and hostile input against the real stack",
        "",
        f"`python -m bench.chaos{' --quick' if args.quick else ''}"
        f"{'' if len(chosen) == 5 else ' --only ' + args.only}` on "
        f"{dt.date.today().isoformat()}: {cpu_model()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {time.monotonic() - began:.0f} s in all. "
        "TorchServe with the default archive: 2 explain workers and 2 forward-only workers "
        "(batch 4) on the same cores as the gateway and the clients.",
        "",
        "| figure | measured | bar | met |",
        "|---|---:|---:|:---:|",
        *(
            f"| {name} | {value} | {bar} | {'yes' if met else '**no**'} |"
            for name, (value, bar, met) in figures.items()
        ),
    ]
    for title, lines in sections:
        report += ["", f"## {title}", "", *lines]
    write_report(args.out, [*report, ""])


if __name__ == "__main__":
    main()

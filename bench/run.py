"""`make bench`: every suite in one run, each writing its table to bench/results/."""

from __future__ import annotations

import runpy
import sys
import time

SUITES = (
    "quality",
    "perturbation",
    "fewer_forwards",
    "visualize",
    "concepts",
    "speed",
    "zoo_speed",
    "e2e",
    "chaos",
    "http",
    "anytime",
)


def main() -> None:
    chosen = sys.argv[1:] or list(SUITES)
    for suite in chosen:
        start = time.perf_counter()
        print(f"== bench.{suite}", flush=True)
        saved = sys.argv
        sys.argv = [f"bench.{suite}"]
        try:
            runpy.run_module(f"bench.{suite}", run_name="__main__")
        finally:
            sys.argv = saved
        print(f"== bench.{suite}: {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""What every benchmark shares: the machine's description, its OpenMP policy, the report file
and the command-line options of the timed suites."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path


def write_report(out: Path, lines: list[str]) -> None:
    """Write a results table to ``out`` (creating its folder) and echo it to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def bf16_units() -> str:
    """The CPU's bfloat16 instructions (what makes bfloat16 autocast faster than float32)."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    units = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return ", ".join(units) or "none (bfloat16 is emulated, slower than float32)"


def add_omp_policy_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "inherit"),
        default="passive",
        help="OpenMP wait policy of torch threads; passive keeps 2 threads fast beside other work",
    )


def rerun_with_omp_policy(module: str, policy: str, argv: list[str] | None) -> int | None:
    """Run ``module`` again in a fresh interpreter when OpenMP's wait policy must change.

    libgomp reads ``OMP_WAIT_POLICY`` once, when torch loads it, so the policy can only be
    set for a new process. Returns its exit code, or ``None`` when this process already
    runs with the policy asked for (or ``inherit``).
    """
    wanted = policy.upper()
    if policy == "inherit" or os.environ.get("OMP_WAIT_POLICY", "").upper() == wanted:
        return None
    env = {**os.environ, "OMP_WAIT_POLICY": wanted}
    command = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
    return subprocess.run(command, env=env, check=False).returncode


def parse_suite_args(
    parser: argparse.ArgumentParser, module: str, results: Path, argv: list[str] | None
) -> tuple[argparse.Namespace, int | None]:
    """Add the options every timed suite has, parse, and rerun under another OpenMP policy.

    The options: ``--out`` (the results file, ``results`` by default), ``--strict`` (exit 1
    when a bar is missed) and ``--omp-wait-policy``.

    Returns:
        ``(args, None)`` to measure in this process, or ``(args, exit code)`` of the
        fresh interpreter that ran ``module`` with the policy asked for.
    """
    parser.add_argument("--out", type=Path, default=results)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a bar is missed")
    add_omp_policy_argument(parser)
    args = parser.parse_args(argv)
    return args, rerun_with_omp_policy(module, args.omp_wait_policy, argv)


def exit_code(ok: bool, args: argparse.Namespace) -> int:
    """1 when a bar was missed under ``--strict``; else 0, so that ``bench.run`` goes on."""
    return 0 if ok or not args.strict else 1

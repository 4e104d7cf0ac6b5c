"""Speed of the gradient methods and the forwards, side by side with eager torch and Captum."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

from bench.machine import exit_code, parse_suite_args
from bench.speed import MODULE, RESULTS
from bench.speed.cases import default_case, resnet_case
from bench.speed.measure import run_case
from bench.speed.report import write
from service.runtime.onnx_forward import cpu_quota


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11, help="repeats of the fast measurements")
    parser.add_argument(
        "--slow-repeats", type=int, default=3, help="repeats of SmoothGrad and IG (seconds each)"
    )
    parser.add_argument("--models", default="resnet18,default", help="comma-separated")
    args, rerun = parse_suite_args(parser, MODULE, RESULTS, argv)
    if rerun is not None:
        return rerun
    torch.set_num_threads(cpu_quota())
    # Captum warns on every call that it set requires_grad on the inputs (and undoes it).
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
    makers = {"resnet18": resnet_case, "default": default_case}
    load_before = os.getloadavg()[0]
    results = [
        run_case(makers[key](), args.repeats, args.slow_repeats) for key in args.models.split(",")
    ]
    ok = write(
        results, args.out, args.repeats, args.slow_repeats, (load_before, os.getloadavg()[0])
    )
    return exit_code(ok, args)


if __name__ == "__main__":
    # Exit only on failure: bench.run runs suites in one process via runpy, and a
    # SystemExit(0) would end the run before the suites after this one.
    if code := main():
        sys.exit(code)

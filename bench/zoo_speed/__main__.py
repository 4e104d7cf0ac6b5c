"""`python -m bench.zoo_speed`: the zoo section of bench/results/speed.md."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from bench.machine import cpu_model, parse_suite_args
from bench.speed import RESULTS
from bench.speed.report import ZOO_SECTION, replace_section
from bench.zoo_speed import MODELS, MODULE
from bench.zoo_speed.gradients import gradient_lines, gradients
from bench.zoo_speed.perturbation import perturbation, perturbation_lines
from service.models.zoo import ZOO
from service.runtime.onnx_forward import cpu_quota


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(ZOO))
    parser.add_argument("--perturb-models", nargs="*", default=["efficientnet_b0"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4, help="SmoothGrad samples, IG steps")
    args, rerun = parse_suite_args(parser, MODULE, RESULTS, argv)
    if rerun is not None:
        return rerun
    torch.set_num_threads(cpu_quota())
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
    begin, load_before = time.perf_counter(), os.getloadavg()[0]
    runs = [gradients(name, args.samples, args.repeats) for name in args.models]
    load_mid = os.getloadavg()[0]
    tables = {name: perturbation(name, args.repeats) for name in args.perturb_models}
    minutes = (time.perf_counter() - begin) / 60
    command = "python -m bench.zoo_speed " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        ZOO_SECTION,
        "",
        f"- `{command.strip()}`, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
        f"{minutes:.1f} min in all; {cpu_model()}, torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={args.omp_wait_policy}; load average {load_before:.2f} at the start, "
        f"{load_mid:.2f} after the gradients, {os.getloadavg()[0]:.2f} at the end (other "
        "helpers share the 2 cores: compare the ratios, taken within one repeat)",
        "- random weights (seed 0), published configurations at 224 px, archived and loaded "
        "as a TorchServe worker loads them (`bench.zoo.served_full`: optimiser, chunk size, "
        "precision guard, ONNX forward); `load s` = archive load incl. those choices",
        f"- median of {args.repeats} interleaved repeats, after one warm-up for the fast group",
        "",
        *(gradient_lines(runs, args.samples) if runs else []),
        "",
    ]
    for name, (rows, gain) in tables.items():
        lines += [*perturbation_lines(name, rows, gain), ""]
    lines.append(
        "Quality is not in these tables: the weights are random, so the pointing game or "
        "deletion AUC would score noise; `bench/results/quality.md` has quality on the "
        "trained default model."
    )
    replace_section(args.out, ZOO_SECTION, lines)
    return 0


if __name__ == "__main__":
    # Exit only on failure: bench.run runs suites in one process via runpy.
    if code := main():
        sys.exit(code)

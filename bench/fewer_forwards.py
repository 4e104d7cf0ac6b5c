"""Forward-only methods, the fewer-forwards settings against the exhaustive ones, side by side.

Run ``python -m bench.fewer_forwards [--images 24]`` (``make bench`` runs it). In one
process, for occlusion (coarse to fine against every window), RISE (stopping once the
map's rank order holds against the fixed count of before), Sobol (a 7 x 7 grid and 4
designs against 8 x 8 and 32), LIME (250 samples against 1000) and KernelSHAP (250 paired
draws against 1000 independent ones), on the same images, with the forwards counted at
the model:

* the quality bench's held-out shapes on the default model: forwards per image, seconds
  per image, pointing game, deletion AUC, and the Spearman correlation of each new map
  with the exhaustive map of the same image;
* the zoo's two-halves models (``tests/engine/two_halves.py``: class ``t`` reads one image
  half only, by construction): the share of the map's positive mass on the class's half,
  and how often the maximum lies there;
* the forwards each setting costs at most at 224 px (the methods' own ``cost``);
* with ``--spread-seeds``, the quality bench again for Sobol with other seeds: its new
  default's 4 designs are noisy, and one seed's figures would hide it.

Bars (issue 13): at least 4x fewer forwards on the quality bench, pointing game within
0.02 and deletion AUC within 0.01 of the exhaustive setting (one-sided: a higher pointing
game or a lower deletion AUC is no miss). Writes
``bench/results/fewer_forwards.md``; exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from bench.machine import cpu_model, write_report
from bench.quality import HELD_OUT_SEED, TOLERANCE_PX, pointing_hits
from service.engine import perturb
from service.engine.registry import get_method
from service.engine.scores import compute_scores
from service.engine.types import ExplainContext, NumpyForward
from service.models.default import load_default_model
from service.models.synthetic import generate
from service.runtime.export import export_onnx
from service.runtime.onnx_forward import OnnxForward, cpu_quota

RESULTS = Path(__file__).resolve().parent / "results" / "fewer_forwards.md"
METHODS = ("occlusion", "rise", "sobol", "lime", "kernel_shap")
# Today's defaults before issue 13, reached through the new parameters.
EXHAUSTIVE: Mapping[str, Mapping[str, object]] = {
    "occlusion": {"coarse": 1},
    "rise": {"n_masks": 1024, "tolerance": 0.0},
    "sobol": {"grid_size": 8, "n_designs": 32, "tolerance": 0.0},
    "lime": {"n_samples": 1000},
    "kernel_shap": {"n_samples": 1000, "sampling": "independent"},
}
# The fewer-forwards setting: every method's defaults.
FEWER: Mapping[str, Mapping[str, object]] = {name: {} for name in METHODS}
SETTINGS = ("exhaustive", "fewer forwards")
FEWER_BAR, POINTING_BAR, DELETION_BAR = 4.0, 0.02, 0.01
CHUNK = 32


def explain_counted(
    forward: NumpyForward,
    name: str,
    setting: str,
    images: np.ndarray,
    targets: np.ndarray,
    seed: int = 0,
) -> tuple[np.ndarray, int, float]:
    """``(maps, forwards, seconds)`` of one method, image by image (``seed`` each)."""
    spec = get_method(name)
    overrides = EXHAUSTIVE[name] if setting == "exhaustive" else FEWER[name]
    params = spec.resolve_params(overrides, images.shape[1:])  # type: ignore[arg-type]
    rows: list[int] = []

    def counted(x: np.ndarray) -> np.ndarray:
        rows.append(len(x))
        return forward(x)

    maps, start = [], time.perf_counter()
    for image, target in zip(images, targets, strict=True):
        ctx = ExplainContext(
            model=None,
            forward_numpy=counted,
            generator=torch.Generator().manual_seed(seed),
            chunk_size=CHUNK,
        )
        x, t = torch.from_numpy(image[None]), torch.tensor([int(target)])
        maps.append(spec.fn(ctx, x, t, **params).maps.numpy()[0])
    return np.stack(maps), sum(rows), time.perf_counter() - start


def quality_rows(n_images: int, spread_seeds: list[int]) -> tuple[list[str], bool]:
    model, meta = load_default_model()
    shape = tuple(meta["input_size"])
    with tempfile.TemporaryDirectory() as tmp:
        forward = OnnxForward(
            export_onnx(model, shape, Path(tmp) / "model.onnx"),  # type: ignore[arg-type]
            intra_op_threads=cpu_quota(),
            max_batch=CHUNK,
        )
    data = generate(n_images, seed=HELD_OUT_SEED)
    pixels = data.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    def compared(name: str, seed: int) -> tuple[list[str], bool]:
        """Both settings of one method with one seed: a table row each, and the bars."""
        results = {}
        for setting in SETTINGS:
            maps, counted, seconds = explain_counted(
                forward, name, setting, pixels, data.labels, seed
            )
            deletion = compute_scores(
                forward, pixels, maps, data.labels, ["deletion_auc"], chunk_size=64
            )["deletion_auc"]
            hits = pointing_hits(maps, data.masks[:n_images], TOLERANCE_PX)
            results[setting] = (maps, counted / n_images, seconds / n_images, hits, deletion)
            print(f"{name} {setting} seed {seed}: {counted / n_images:.0f} forwards", flush=True)
        base, rows, ok = results["exhaustive"], [], True
        for setting in SETTINGS:
            maps, forwards, seconds, hits, deletion = results[setting]
            rho = np.mean(
                [perturb.rank_agreement(a, b) for a, b in zip(maps, base[0], strict=True)]
            )
            fewer = base[1] / forwards
            met = ""
            if setting != "exhaustive":
                bars = (
                    fewer >= FEWER_BAR,
                    hits.mean() >= base[3].mean() - POINTING_BAR,
                    deletion.mean() <= base[4].mean() + DELETION_BAR,
                )
                ok = all(bars)
                met = " / ".join("yes" if bar else "NO" for bar in bars)
            rows.append(
                f"| {name} | {setting} | {seed} | {forwards:.0f} | {seconds:.3f} "
                f"| {hits.mean():.3f} | {deletion.mean():.4f} | {rho:.3f} | {fewer:.1f}x "
                f"| {met} |"
            )
        return rows, ok

    header = [
        "| method | setting | seed | forwards / image | s / image | pointing game "
        "| deletion AUC | Spearman with exhaustive | fewer forwards | bars met |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines = [
        f"## Quality bench: default model `{meta['name']}`, {n_images} held-out images "
        f"(seed {HELD_OUT_SEED}), {shape[1]}x{shape[2]} px, target = true class",
        "",
        *header,
    ]
    ok = True
    for name in METHODS:
        rows, met = compared(name, 0)
        lines += rows
        ok &= met
    bars = (
        f"Bars met: >= {FEWER_BAR:.0f}x fewer forwards / pointing game at most {POINTING_BAR} "
        f"lower / deletion AUC at most {DELETION_BAR} higher than the exhaustive setting."
    )
    lines += ["", bars, ""]
    if spread_seeds:
        # Reported, not a bar: the bars are judged with seed 0 as before issue 13.
        lines += [
            "### Sobol with other seeds (the same images; both settings per seed)",
            "",
            *header,
            *(row for seed in spread_seeds for row in compared("sobol", seed)[0]),
            "",
        ]
    return lines, ok


def two_halves_rows(images: int, models: list[str]) -> list[str]:
    # Imported here: the construction lives with the tests that state its bounds.
    from tests.engine.two_halves import SIZE, half_scores, two_halves_engine

    lines = [
        f"## Two-halves check: tiny zoo models at {SIZE} px, {images} images x both classes",
        "",
        "Own-half share: positive mass on the half the class reads (1.0 = all). Max on own "
        "half: share of maps whose maximum lies there.",
        "",
        "| model | method | setting | forwards / map | own-half share | max on own half |",
        "|---|---|---|---:|---:|---:|",
    ]
    pictures = torch.rand(images, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for model_name in models:
        engine = two_halves_engine(model_name)
        model = engine.model

        def forward(x: np.ndarray, model: torch.nn.Module = model) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy()

        for name in METHODS:
            for setting in SETTINGS:
                shares, on_own, total = [], [], 0
                for target in (0, 1):
                    targets = np.full(images, target)
                    maps, forwards, _ = explain_counted(
                        forward, name, setting, pictures.numpy(), targets
                    )
                    total += forwards
                    for score in half_scores(torch.from_numpy(maps), target):
                        shares.append(score.own_fraction)
                        on_own.append(score.own_max > score.other_max)
                print(f"two halves {model_name} {name} {setting}", flush=True)
                lines.append(
                    f"| {model_name} | {name} | {setting} | {total / (2 * images):.0f} | "
                    f"{np.mean(shares):.3f} | {np.mean(on_own):.2f} |"
                )
    return [*lines, ""]


def cost_rows(size: int = 224) -> list[str]:
    lines = [
        f"## Forwards per image at {size} px, at most (the methods' stated cost)",
        "",
        "| method | exhaustive | fewer forwards | fewer |",
        "|---|---:|---:|---:|",
    ]
    for name in METHODS:
        spec = get_method(name)
        old, new = (
            spec.cost(spec.resolve_params(params), (3, size, size)).forwards
            for params in (EXHAUSTIVE[name], FEWER[name])
        )
        lines.append(f"| {name} | {old} | {new} | {old / new:.1f}x |")
    return [*lines, ""]


def run(
    n_images: int, halves_images: int, models: list[str], spread_seeds: list[int], out: Path
) -> bool:
    torch.set_num_threads(cpu_quota())
    start = time.perf_counter()
    quality, ok = quality_rows(n_images, spread_seeds)
    halves = two_halves_rows(halves_images, models)
    lines = [
        "# Fewer forwards: forward-only methods, fewer-forwards settings against exhaustive ones",
        "",
        f"Generated by `python -m bench.fewer_forwards --images {n_images} --halves-images "
        f"{halves_images} --halves-models {','.join(models)}"
        f"{' --spread-seeds ' + ','.join(map(str, spread_seeds)) if spread_seeds else ''}` on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {cpu_model()}, "
        f"{cpu_quota()} usable cores, chunk {CHUNK}, seed 0 per image. Exhaustive = the "
        "defaults before issue 13 (occlusion `coarse=1`; RISE `n_masks=1024, tolerance=0`; "
        "Sobol `grid_size=8, n_designs=32, tolerance=0`; LIME `n_samples=1000`; KernelSHAP "
        "`n_samples=1000, sampling=independent`); fewer forwards = today's defaults. "
        "Both settings run in this one process on the same images.",
        "",
        *quality,
        *halves,
        *cost_rows(),
        f"The run took {time.perf_counter() - start:.0f} s.",
        "",
    ]
    write_report(out, lines)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--halves-images", type=int, default=2)
    # One architecture by default: eager torch at 64 px took 4 minutes for ResNet-18 and
    # over 15 for EfficientNet-B0 (both settings, 2 loaded cores); any zoo name may be added.
    parser.add_argument("--halves-models", default="resnet18")
    # Off by default: each seed reruns Sobol's 2,112-forward setting (~2.5 min here).
    parser.add_argument("--spread-seeds", default="", help="e.g. 1,2: Sobol again, per seed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    models = args.halves_models.split(",")
    seeds = [int(seed) for seed in args.spread_seeds.split(",") if seed]
    return 0 if run(args.images, args.halves_images, models, seeds, args.out) else 1


if __name__ == "__main__":
    # Exit only on failure: bench.run runs suites in one process (see bench.perturbation).
    if code := main():
        sys.exit(code)

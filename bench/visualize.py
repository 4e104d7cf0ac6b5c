"""Class model visualisation of the default model: does it recognise its own images?

For every class and both registered visualisers (MACO and Simonyan's gradient ascent),
with their default parameters and seeds 0..S-1: the image the search returns, rounded to
8 bits as the service sends it, is classified by the model; the table gives the class's
probability and whether it is the top class. Writes ``bench/results/class_visualisation.md``
and ``bench/results/class_visualisation.png`` (seed 0: per class, the MACO image, its
transparency map, the gradient-ascent image and the same with its contrast stretched, as
its changes from the mean image are too faint to see otherwise: x127 / their 99th
percentile).

Run: ``python -m bench.visualize [--seeds 3]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bench.machine import cpu_model
from service.engine.types import ExplainContext
from service.engine.visualize import VISUALIZERS, Visualization, VisualizeRun
from service.models.default import load_default_model

RESULTS = Path(__file__).resolve().parent / "results"
BAR = 0.9


@dataclass(frozen=True)
class ClassResult:
    """One search: its result, the model's probability of the class on the 8-bit image,
    the model's top class there, and the seconds it took."""

    visualization: Visualization
    image: np.ndarray  # uint8 (H, W, 3)
    probability: float
    top: int
    seconds: float


def visualize_class(
    model: torch.nn.Module, meta: dict[str, Any], method: str, target: int, seed: int
) -> ClassResult:
    """``method`` with its defaults on ``target``, seeded, judged by ``model`` itself."""
    spec = VISUALIZERS.get(method)
    ctx = ExplainContext(model=model, generator=torch.Generator().manual_seed(seed))
    shape = tuple(meta["input_size"])
    run = VisualizeRun(ctx, target, shape, tuple(meta["mean"]), tuple(meta["std"]))  # type: ignore[arg-type]
    start = time.perf_counter()
    result = spec.fn(run, **spec.defaults)
    seconds = time.perf_counter() - start
    image = np.round(result.image.detach().numpy() * 255.0).astype(np.uint8)
    with torch.no_grad():
        logits = model(torch.from_numpy(image.astype(np.float32) / 255.0)[None]).double()
    probabilities = torch.softmax(logits, dim=1)[0]
    return ClassResult(
        result,
        image.transpose(1, 2, 0),
        float(probabilities[target]),
        int(probabilities.argmax()),
        seconds,
    )


def run(seeds: int) -> str:
    model, meta = load_default_model()
    labels = list(meta["labels"])
    methods = ["maco", "gradient_ascent"]
    results = {}
    for method in methods:
        for target in range(len(labels)):
            for seed in range(seeds):
                found = visualize_class(model, meta, method, target, seed)
                results[(method, target, seed)] = found
                print(
                    f"{method} {labels[target]} seed {seed}: p={found.probability:.3f}", flush=True
                )
    lines = [
        "# Class model visualisation of the default model",
        "",
        f"Machine: {cpu_model()}, torch threads: {torch.get_num_threads()}. Default "
        f"parameters, seeds 0..{seeds - 1}. p = the model's probability of the class on "
        "the 8-bit image the service returns; * = not the top class.",
        "",
        "| class | "
        + " | ".join(f"{m} p (seed {s})" for m in methods for s in range(seeds))
        + " |",
        "|---|" + "---:|" * (len(methods) * seeds),
    ]
    for target, label in enumerate(labels):
        cells = []
        for method in methods:
            for seed in range(seeds):
                found = results[(method, target, seed)]
                cells.append(f"{found.probability:.3f}{'' if found.top == target else '*'}")
        lines.append(f"| {target} {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for method in methods:
        found = [r for (m, _, _), r in results.items() if m == method]
        passed = sum(r.probability >= BAR for r in found)
        top = sum(r.top == t for (m, t, _), r in results.items() if m == method)
        mean_s = np.mean([r.seconds for r in found])
        lines.append(
            f"- {method}: p >= {BAR} in {passed} of {len(found)} searches, top class in "
            f"{top} of {len(found)}; {mean_s:.1f} s per search on average"
        )
    write_grid(results, labels)
    return "\n".join(lines) + "\n"


def write_grid(results: dict[tuple[str, int, int], ClassResult], labels: list[str]) -> None:
    columns = []
    for target, label in enumerate(labels):
        maco = results[("maco", target, 0)]
        ascent = results[("gradient_ascent", target, 0)]
        weights = maco.visualization.transparency
        assert weights is not None
        columns.append(
            cv2.vconcat(
                [
                    _caption(f"{label} {maco.probability:.2f}", maco.image.shape[1]),
                    maco.image,
                    _heat(weights.numpy()),
                    _caption(f"ascent {ascent.probability:.2f}", maco.image.shape[1]),
                    ascent.image,
                    _stretched(ascent.image),
                ]
            )
        )
    grid = cv2.hconcat(columns)
    cv2.imwrite(str(RESULTS / "class_visualisation.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def _caption(text: str, width: int) -> np.ndarray:
    strip = np.full((14, width, 3), 255, np.uint8)
    cv2.putText(strip, text, (2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    return strip


def _heat(values: np.ndarray) -> np.ndarray:
    span = float(values.max() - values.min()) or 1.0
    scaled = ((values - values.min()) / span * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)


def _stretched(image: np.ndarray) -> np.ndarray:
    centred = image.astype(np.float32) - image.reshape(-1, 3).mean(0)
    # The 99th percentile, not the maximum: a few saturated pixels would set the scale.
    scale = 127.0 / max(float(np.percentile(np.abs(centred), 99)), 1.0)
    return np.clip(128 + centred * scale, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = run(args.seeds)
    report += f"\nThe run took {(time.perf_counter() - start) / 60:.1f} minutes.\n"
    (RESULTS / "class_visualisation.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

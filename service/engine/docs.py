"""``docs/methods.md``, rendered from the four registries and the modules' own docstrings.

``python -m service.engine.docs`` prints the page; ``--write`` updates the file. A test
fails when the committed page differs: every fact on it (names, parameters, defaults,
bounds, conventions) comes from the code that implements it.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from service.engine.registry import MASKS, METHODS, SCORES, Member, MethodSpec, ScoreSpec
from service.engine.visualize import VISUALIZERS, VisualizerSpec
from service.protocol.cost import MIB
from service.protocol.limits import Limits
from service.protocol.params import Param, format_value

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "methods.md"

HEADER = """# Explanation methods, masks, scores and class visualisation

Generated from the registries (`service/engine/registry.py`) and the docstrings of the
modules that implement them, by `python -m service.engine.docs --write`; do not edit by
hand.

Every method takes a batch of float32 images `(B, C, H, W)` in `[0, 1]` and one target class
per image (default: the predicted class, never class 0), and returns float32 maps `(B, H, W)`
at input resolution. `torch` methods run on the model itself (eager or `torch.export`):
gradients with respect to the input (or, for CAM, the CAM layer's activations; for the
attention methods, the attention probabilities), or a forward that reads its attention;
`onnx` methods run forward passes only. CAM methods read the CAM layer `archive` found or
was given: a spatial map, or a ViT's patch tokens reshaped to their grid (class and
register tokens dropped); attention methods need self-attention layers, recorded at the
same time. `GetModelInfo` marks what a model cannot run `available: false`, with the
reason. Parameters are set per request (`MethodRequest.params`,
`MaskOptions.params`) as strings, parsed to their type and checked against their bounds.
"""


VISUALIZE_TEXT = """\
`VisualizeClass` (and `VisualizeClassStream`, with progress) returns, for a class, the
image that maximises its pre-softmax score, as an 8-bit RGB PNG at the model's input size,
with the model's logit and probability of the class on that PNG.
`VisualizeClassRequest.method` unset means `maco`. Seeded: the same request on the same
worker gives the same image (workers whose forwards round differently, e.g. with layouts
chosen at load, can give another image of the class: Adam amplifies tiny gradient
differences); a result is cached in the worker (a bounded LRU,
`service/serving/visualize.py`) under (model version, class, method, parameters, seed),
and a cached answer says `cached: true`. The search checks the deadline and cancellation
after every iteration. The default model gives its MACO image of every class p >= 0.999
(seeds 0-2), and makes the class its top one on 9 of its 10 gradient-ascent images, 8 with
p >= 0.9 (`bench/results/class_visualisation.md`)."""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rst_to_markdown(text: str) -> str:
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)  # :func:`x` -> `x`
    return text.replace("``", "`")


def _needs(spec: Member) -> str:
    needs = ["gradients" if getattr(spec, "needs_gradients", False) else "forward only"]
    if getattr(spec, "needs_layer", False):
        needs.append("CAM layer")
    if getattr(spec, "needs_attention", False):
        needs.append("attention layers")
    return ", ".join(needs)


def _params_table(members: Iterable[Member], what: str) -> list[str]:
    rows = [
        f"| {what} | parameter | type | default | accepted | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for member in members:
        for param in member.params:
            rows.append(
                f"| `{member.name}` | `{param.name}` | {param.kind} "
                f"| `{format_value(param.default)}` | {_cell(_accepted(param))} "
                f"| {_cell(param.doc)} |"
            )
    return rows


def _accepted(param: Param) -> str:
    if param.bounds_text():
        return param.bounds_text()
    return "any finite number" if param.kind in ("int", "float") else "any"


def _paper(member: Member) -> str:
    return f" [paper]({member.paper})" if member.paper else ""


def _conventions(members: Iterable[Member]) -> list[str]:
    """Each implementing module's docstring once, under its first line as a heading."""
    out: list[str] = []
    seen: set[str] = set()
    for member in members:
        module = sys.modules[member.fn.__module__]
        if module.__name__ in seen or not module.__doc__:
            continue
        seen.add(module.__name__)
        title, _, body = inspect.cleandoc(module.__doc__).partition("\n")
        names = ", ".join(f"`{m.name}`" for m in members if m.fn.__module__ == module.__name__)
        out += [f"### {_rst_to_markdown(title).rstrip('.')}", "", f"{names}.", ""]
        if body.strip():
            out += [_rst_to_markdown(body.strip()), ""]
    return out


COST_SHAPE = (3, 224, 224)


def _costs(members: Iterable[MethodSpec | ScoreSpec | VisualizerSpec]) -> list[str]:
    """Each member's cost with its defaults on a 224 px input, and how it is counted."""
    limits = Limits()
    shape = "x".join(map(str, COST_SHAPE))
    lines = [
        f"What one explanation (a method, per target), one score (per map) or one class "
        f"visualisation costs with its "
        f"defaults on a {shape} input, as the pipeline counts it before any work. A request's "
        f"sum must fit the per-request budget: {limits.max_forwards:,} forwards, "
        f"{limits.max_backward_rows:,} gradient rows and {limits.max_memory_bytes // MIB} MiB "
        "of parameter-shaped buffers by default (`SALIENCY_LIMIT_MAX_FORWARDS`, "
        "`SALIENCY_LIMIT_MAX_BACKWARD_ROWS`, `SALIENCY_LIMIT_MAX_MEMORY_BYTES`); above it the "
        "request is refused with `RESOURCE_EXHAUSTED`.",
        "",
        "| member | forwards | gradient rows | memory | counted as |",
        "|---|---|---|---|---|",
    ]
    for spec in members:
        cost = spec.cost(spec.defaults, COST_SHAPE)
        how = " ".join(inspect.cleandoc(spec.cost.__doc__ or "").split())
        lines.append(
            f"| `{spec.name}` | {cost.forwards:,} | {cost.backward_rows:,} "
            f"| {cost.memory_bytes / MIB:.1f} MiB | {_cell(_rst_to_markdown(how))} |"
        )
    return lines


def render() -> str:
    """The whole page as Markdown."""
    methods, masks, scores = METHODS.members(), MASKS.members(), SCORES.members()
    lines = ["## Methods", "", "| method | backend | needs | description |", "|---|---|---|---|"]
    for spec in methods:
        lines.append(
            f"| `{spec.name}` | {spec.backend} | {_needs(spec)} "
            f"| {_cell(spec.description)}{_paper(spec)} |"
        )
    lines += ["", "### Method parameters", "", *_params_table(methods, "method"), ""]
    lines += ["## Masks", "", "| mask | description |", "|---|---|"]
    lines += [f"| `{m.name}` | {_cell(m.description)}{_paper(m)} |" for m in masks]
    lines += ["", "### Mask parameters", "", *_params_table(masks, "mask"), ""]
    lines += ["## Scores", "", "| score | better | description |", "|---|---|---|"]
    lines += [
        f"| `{s.name}` | {'higher' if s.higher_is_better else 'lower'} "
        f"| {_cell(s.description)}{_paper(s)} |"
        for s in scores
    ]
    lines += ["", "### Score parameters", "", *_params_table(scores, "score"), ""]
    visualizers = VISUALIZERS.members()
    lines += ["## Class visualisation", "", VISUALIZE_TEXT, "", "| method | description |"]
    lines += [
        "|---|---|",
        *(f"| `{v.name}` | {_cell(v.description)}{_paper(v)} |" for v in visualizers),
    ]
    lines += ["", "### Visualisation parameters", "", *_params_table(visualizers, "method"), ""]
    lines += ["## Costs", "", *_costs([*methods, *scores, *visualizers]), ""]
    lines += ["## Conventions", "", "From the docstring of each module that implements them.", ""]
    lines += _conventions([*methods, *masks, *scores, *visualizers])
    return HEADER + "\n" + "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"write {DOC_PATH}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()

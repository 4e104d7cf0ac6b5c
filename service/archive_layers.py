"""What ``archive`` records about a model's layers: its CAM layer and its attention.

Chosen once, on the pixel-space module about to be exported, and written to ``model.json``
(``cam_layer``, ``attention``, ``unavailable``): every host then serves the same choice,
and ``GetModelInfo`` shows it. The user sees one line for each, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from service.engine.attention_info import AttentionInfo, find_attention
from service.engine.cam_layer import CamLayer
from service.engine.errors import UnsupportedMethodError
from service.engine.layer_finder import describe_layer, find_cam_layer
from service.runtime.artifacts import NOT_HOOKABLE

WRAPPER = "model."  # the pixel-space wrapper's attribute: "layer4" is "model.layer4" inside


@dataclass(frozen=True)
class Layers:
    """A model's CAM layer and attention, or why it has none."""

    cam_layer: CamLayer | None
    attention: AttentionInfo | None
    unavailable: dict[str, str] = field(default_factory=dict)  # "layer" / "attention": why

    def lines(self) -> list[str]:
        """What ``archive`` prints: which layer and why, how to override, what is missing."""
        cam, attention = self.cam_layer, self.attention
        if cam is None:
            first = f"CAM layer: none, so CAM methods are unavailable: {self.unavailable['layer']}"
        elif cam.chosen == "given":
            first = f"CAM layer: {cam.summary(WRAPPER)}, as given with --target-layer"
        else:
            first = (
                f"CAM layer: {cam.summary(WRAPPER)}, found automatically ({cam.how}); "
                "override with --target-layer"
            )
        if attention is None:
            why = self.unavailable["attention"]
            return [first, f"attention: none, so attention methods are unavailable: {why}"]
        return [first, f"attention: {attention.how}"]


def wrapped_name(module: nn.Module, name: str) -> str:
    """``name`` as a module of the pixel-space wrapper: ``layer4`` or ``model.layer4``."""
    names = dict(module.named_modules())
    if name not in names and f"{WRAPPER}{name}" in names:
        return f"{WRAPPER}{name}"
    return name


def choose_layers(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    target_layer: str | None,
    *,
    hookable: bool,
) -> Layers:
    """The CAM layer (the given one, checked, or the one found) and the attention.

    Args:
        module: the pixel-space model to be exported.
        input_shape: ``(C, H, W)``.
        target_layer: the user's CAM layer, or ``None`` to find it.
        hookable: whether its modules can be hooked (an eager module; not an exported
            program).

    Raises:
        InvalidInputError, UnsupportedMethodError: the given ``target_layer`` cannot be a
            CAM layer (the message says why).
    """
    if not hookable:
        return Layers(None, None, {"layer": NOT_HOOKABLE, "attention": NOT_HOOKABLE})
    unavailable: dict[str, str] = {}
    cam_layer: CamLayer | None = None
    if target_layer:
        cam_layer = describe_layer(module, wrapped_name(module, target_layer), input_shape)
    else:
        try:
            cam_layer = find_cam_layer(module, input_shape)
        except UnsupportedMethodError as error:
            unavailable["layer"] = str(error)
    attention: AttentionInfo | None = None
    try:
        attention = find_attention(module, input_shape, cam_layer)
    except UnsupportedMethodError as error:
        unavailable["attention"] = str(error)
    return Layers(cam_layer, attention, unavailable)

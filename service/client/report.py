"""A self-contained HTML report of one ``Explain`` call (``saliency-serve explain --html``).

One file, readable offline and safe to mail: every picture is inline as a ``data:`` URI,
the styles are inline, there is no script, and every text from the reply is escaped.
Pillow and the standard library only, like the rest of the client.
"""

from __future__ import annotations

import base64
import html
import io

import numpy as np
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.decode import decode_map, decode_mask
from service.client.overlay import draw_box, overlay
from service.protocol.names import MASKS, METHODS, SCORES

STYLE = """
body { font-family: system-ui, sans-serif; color: #1d2430; background: #f4f5f7; margin: 2rem; }
h1 { font-size: 1.3rem; margin: 0 0 0.2rem; }
.muted { color: #6b7482; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 10px; padding: 1rem;
  margin: 1rem 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
td, th { padding: 0.15rem 0.8rem 0.15rem 0; text-align: left; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 1rem; }
.pictures { display: flex; gap: 0.4rem; }
.pictures figure { margin: 0; flex: 1; }
.pictures img { width: 100%; image-rendering: pixelated; border-radius: 6px; }
figcaption { font-size: 0.78rem; color: #6b7482; text-align: center; }
"""


def png_data_uri(pixels: np.ndarray) -> str:
    """``data:image/png;base64,...`` of uint8 pixels (gray, RGB) or a bool mask."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _rows(pairs: list[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def _figure(uri: str, caption: str) -> str:
    text = html.escape(caption)
    return f'<figure><img src="{uri}" alt="{text}"><figcaption>{text}</figcaption></figure>'


def _explanation(image: np.ndarray, item: pb.Explanation) -> str:
    saliency = decode_map(item.map)
    heat = overlay(image, saliency) if saliency.shape == image.shape[:2] else None
    if heat is not None and item.HasField("box"):
        heat = draw_box(heat, item.box)
    span = float(saliency.max() - saliency.min()) or 1.0
    gray = np.round(255.0 * (saliency - saliency.min()) / span).astype(np.uint8)
    figures = [_figure(png_data_uri(heat), "overlay and box")] if heat is not None else []
    figures.append(_figure(png_data_uri(gray), "map"))
    if item.mask.png:
        figures.append(
            _figure(png_data_uri(decode_mask(item.mask)), f"{MASKS.label(item.mask.kind)} mask")
        )
    facts = [
        ("time", f"{item.seconds * 1000:.1f} ms"),
        ("map range", f"{item.map.value_min:.4g} .. {item.map.value_max:.4g}"),
    ]
    if item.HasField("box"):
        b = item.box
        facts.append(("box", f"({b.x_min}, {b.y_min}) - ({b.x_max}, {b.y_max})"))
    if item.HasField("completeness_error"):
        facts.append(("completeness error", f"{item.completeness_error:.4g}"))
    facts += [(SCORES.label(s.score), f"{s.value:.4f}") for s in item.scores]
    facts += [(f"param {k}", v) for k, v in sorted(item.params.items())]
    title = (
        f"{METHODS.label(item.method)} &rarr; {html.escape(item.target_label or str(item.target))}"
    )
    return (
        f"<section><h2>{title}</h2><div class='pictures'>{''.join(figures)}</div>"
        f"<table>{_rows(facts)}</table></section>"
    )


def html_report(image: np.ndarray, reply: pb.ExplainResponse, title: str) -> str:
    """The report of ``reply`` for ``image`` (uint8 ``(H, W, 3)`` RGB, as sent).

    Args:
        image: the picture the call explained, upright.
        reply: its response.
        title: shown at the top (the image's file name, typically).
    """
    predictions = [(p.label, f"{p.probability:.3f}") for p in reply.predictions]
    timings = [(t.stage, f"{t.seconds * 1000:.1f} ms") for t in reply.timings]
    model = f"{reply.model.name} version {reply.model.version}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1><p class="muted">{html.escape(model)}</p>
<section class="pictures"><figure><img src="{png_data_uri(image)}" alt="image"
 style="max-width: 256px"><figcaption>image</figcaption></figure>
<div><h2>Prediction</h2><table>{_rows(predictions)}</table>
<h2>Timings</h2><table>{_rows(timings)}</table></div></section>
<div class="grid">{"".join(_explanation(image, e) for e in reply.explanations)}</div>
</body></html>
"""

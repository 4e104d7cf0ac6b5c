"""``saliency-serve explain --html``'s report: one file, pictures inline, text escaped,
and the pictures are what the reply says."""

from __future__ import annotations

import base64
import html
import io
from html.parser import HTMLParser

import numpy as np
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.report import html_report
from service.protocol.names import MASKS, METHODS, SCORES

H, W = 24, 32
HOSTILE = '<script>alert("label")</script>'


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[tuple[str, str]] = []  # (alt, src)
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        values = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action")]
        if tag == "img":
            self.images.append((values.get("alt") or "", values.get("src") or ""))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(uri: str) -> np.ndarray:
    head, _, data = uri.partition(",")
    assert head == "data:image/png;base64"
    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        return np.asarray(image)


def reply() -> tuple[pb.ExplainResponse, np.ndarray]:
    levels = np.zeros((H, W), dtype=np.uint8)
    levels[:, W // 2 :] = 255  # the right half is salient
    mask = np.zeros((H, W), dtype=bool)
    mask[4:10, 20:30] = True
    item = pb.Explanation(
        method=METHODS.number("occlusion"),  # type: ignore[arg-type]
        target=3,
        target_label=HOSTILE,
        map=pb.SaliencyMap(
            width=W,
            height=H,
            encoding=pb.MAP_ENCODING_PNG8,
            data=png(levels),
            value_min=-1.0,
            value_max=3.0,
        ),
        mask=pb.Mask(width=W, height=H, kind=MASKS.number("threshold"), png=png(mask)),  # type: ignore[arg-type]
        box=pb.Box(x_min=20, y_min=4, x_max=29, y_max=9),
        scores=[pb.ScoreValue(score=SCORES.number("insertion_auc"), value=0.8125)],  # type: ignore[arg-type]
        params={"window": "8"},
        seconds=0.25,
    )
    response = pb.ExplainResponse(
        model=pb.ModelRef(name="shapes", version="abc123"),
        predictions=[pb.Prediction(index=3, label=HOSTILE, probability=0.875)],
        explanations=[item],
        timings=[pb.StageTiming(stage="total", seconds=0.5)],
    )
    return response, mask


def test_the_report_is_one_file_with_its_pictures_inline_and_its_text_escaped() -> None:
    image = np.full((H, W, 3), 100, dtype=np.uint8)
    response, mask = reply()
    text = html_report(image, response, "shape <1>.png")
    tags = Tags()
    tags.feed(text)
    assert "script" not in tags.tags and "link" not in tags.tags  # nothing runs, nothing loads
    assert all(url.startswith("data:image/png;base64,") for url in tags.urls)
    assert HOSTILE not in text and html.escape(HOSTILE) in text
    assert "shape &lt;1&gt;.png" in text and "abc123" in text
    assert "0.875" in text and "0.8125" in text and "250.0 ms" in text and "window" in text

    by_alt = dict(tags.images)
    np.testing.assert_array_equal(pixels(by_alt["image"]), image)
    np.testing.assert_array_equal(pixels(by_alt["threshold mask"]) > 0, mask)
    gray = pixels(by_alt["map"])
    assert (gray[:, : W // 2] == 0).all() and (gray[:, W // 2 :] == 255).all()
    heat = pixels(by_alt["overlay and box"]).astype(int)
    left, right = heat[14:, 2:10], heat[14:, 22:30]  # away from the box
    assert (left[..., 2] > left[..., 0]).all()  # low saliency: blue over the gray
    assert (right[..., 0] > right[..., 2]).all()  # high saliency: red
    assert (heat[4, 20:30] == 255).all() and (heat[4:10, 29] == 255).all()  # the box, white

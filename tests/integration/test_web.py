"""The web page in a real browser (Debian's Chromium) against the real stack.

It loads, takes the example image, shows the prediction and two maps; the sliders
redraw overlay, mask outline and box in the browser. Each drawing is checked against an
independent computation in Python from the PNGs the page itself downloads: numpy's
percentile, OpenCV's connected components, the client's colour table.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from service.client import SaliencyClient
from service.client.overlay import JET
from service.launcher import TorchServe
from service.stack import RunningGateway, gateway_options, running_gateway
from tests.integration.browser import canvas_rgba, chromium, downloaded_bytes, png_pixels

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "example-shape.png"
SCREENSHOT = os.environ.get("SALIENCY_WEB_SCREENSHOT")
"""Where to save the page's screenshot (``make screenshot``: docs/web-page.png)."""
METHODS = ("grad_cam", "smoothgrad")


def card(method: str) -> str:
    return f'.explanation.ready[data-method="{method}"]'


def boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask or the image."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def largest_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Inclusive (x_min, y_min, x_max, y_max) of the largest 8-connected component."""
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    ys, xs = np.nonzero(labels == best)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def frame(box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = box
    lines = np.zeros(shape, dtype=bool)
    lines[y0, x0 : x1 + 1] = lines[y1, x0 : x1 + 1] = True
    lines[y0 : y1 + 1, x0] = lines[y0 : y1 + 1, x1] = True
    return lines


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def page(browser: Any, gateway: RunningGateway) -> Iterator[Any]:
    """The page, loaded; every request it makes and every console error are recorded."""
    opened = browser.new_page()
    opened.requests, opened.errors = [], []
    opened.on("request", lambda r: opened.requests.append(r.url))
    opened.on("console", lambda m: m.type == "error" and opened.errors.append(m.text))
    opened.on("pageerror", lambda e: opened.errors.append(str(e)))
    opened.goto(gateway.http_url + "/")
    opened.wait_for_selector("#methods input[value=grad_cam]")
    yield opened
    assert opened.errors == [], "console errors on the page"
    outside = [u for u in opened.requests if not u.startswith((gateway.http_url, "data:", "blob:"))]
    assert outside == [], "the page fetched from outside the gateway"
    opened.close()


def explain_example(page: Any) -> None:
    for box in page.query_selector_all("#methods input:checked"):
        box.uncheck()
    for method in METHODS:
        page.check(f"#methods input[value={method}]")
    page.set_input_files("#file", str(EXAMPLE))
    for method in METHODS:
        page.wait_for_selector(card(method), timeout=60_000)
    page.wait_for_selector("#status.ok", timeout=60_000)


def move(page: Any, slider: str, value: float) -> None:
    page.fill(slider, str(value))  # sets the value and fires `input`, as a drag does


def test_the_page_explains_the_example_and_redraws_the_mask_at_a_new_threshold(
    page: Any, client: SaliencyClient
) -> None:
    explain_example(page)
    expected = client.predict(EXAMPLE.read_bytes(), top_k=1).predictions[0].label
    assert page.inner_text("#classes li:first-child .label") == expected
    assert len(page.query_selector_all(".explanation.ready")) == 2
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)

    grad_cam = card("grad_cam")
    item = json.loads(downloaded_bytes(page, f"{grad_cam} [data-download=json]"))
    levels = png_pixels(downloaded_bytes(page, f"{grad_cam} [data-download=map]"))
    assert levels.shape == (item["map"]["height"], item["map"]["width"])
    assert levels.dtype == np.uint8 and levels.ndim == 2  # the 8-bit map, as sent
    server_mask = png_pixels(base64.b64decode(item["mask"]["b64"])) > 0
    shown = png_pixels(downloaded_bytes(page, f"{grad_cam} [data-download=mask]"))[..., 0] > 127
    np.testing.assert_array_equal(shown, server_mask)  # until a slider moves: the server's
    before = canvas_rgba(page, f"{grad_cam} canvas.outline")[..., 3] > 0
    np.testing.assert_array_equal(before, boundary(server_mask))

    move(page, "#threshold", 80)
    after = canvas_rgba(page, f"{grad_cam} canvas.outline")[..., 3] > 0
    assert (after != before).any(), "the threshold slider did not change the mask"
    mask = levels > np.percentile(levels, 80)  # the server's threshold mask, at 80
    shown = png_pixels(downloaded_bytes(page, f"{grad_cam} [data-download=mask]"))[..., 0] > 127
    np.testing.assert_array_equal(shown, mask)
    np.testing.assert_array_equal(after, boundary(mask))
    box = canvas_rgba(page, f"{grad_cam} canvas.box")[..., 3] > 0
    np.testing.assert_array_equal(box, frame(largest_box(mask), mask.shape))
    assert "80th percentile" in page.inner_text(f"{grad_cam} .facts")


def test_the_opacity_slider_blends_image_and_heat_map(page: Any) -> None:
    explain_example(page)
    smoothgrad = card("smoothgrad")
    levels = png_pixels(downloaded_bytes(page, f"{smoothgrad} [data-download=map]"))
    with Image.open(EXAMPLE) as opened:
        image = np.asarray(opened.convert("RGB")).astype(int)

    move(page, "#opacity", 0)
    plain = canvas_rgba(page, f"{smoothgrad} canvas.heat")[..., :3].astype(int)
    assert np.abs(plain - image).max() <= 1  # the image alone
    move(page, "#opacity", 100)
    heat = canvas_rgba(page, f"{smoothgrad} canvas.heat")[..., :3].astype(int)
    assert np.abs(heat - JET[levels].astype(int)).max() <= 1  # the map alone, in jet
    move(page, "#opacity", 25)
    blend = canvas_rgba(page, f"{smoothgrad} canvas.heat")[..., :3].astype(int)
    assert np.abs(blend - (0.75 * image + 0.25 * JET[levels])).max() <= 1


def test_a_file_that_is_no_image_shows_the_servers_refusal(page: Any, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"these are notes, not pixels")
    page.set_input_files("#file", str(bogus))
    page.wait_for_selector("#status.error", timeout=30_000)
    assert page.inner_text("#status").startswith("INVALID_ARGUMENT:")
    page.errors.clear()  # the failed fetch is logged by Chromium as a console error


def test_a_dropped_image_is_explained_with_the_parameters_set_on_the_page(page: Any) -> None:
    for box in page.query_selector_all("#methods input:checked"):
        box.uncheck()
    page.check("#methods input[value=integrated_gradients]")
    page.click("#methods .entry:has(input[value=integrated_gradients]) summary")
    page.fill('[id="integrated_gradients.n_steps"]', "8")
    page.select_option("#mask", "grabcut")
    page.check("#scores input[value=insertion_auc]")
    data = base64.b64encode(EXAMPLE.read_bytes()).decode()
    page.evaluate(
        """(data) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
            const drop = document.getElementById("drop");
            drop.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true }));
        }""",
        data,
    )
    page.wait_for_selector(card("integrated_gradients"), timeout=60_000)
    page.wait_for_selector("#status.ok", timeout=60_000)
    item = json.loads(
        downloaded_bytes(page, f"{card('integrated_gradients')} [data-download=json]")
    )
    assert item["params"]["n_steps"] == "8"  # what the worker ran with
    assert item["mask"]["kind"] == "grabcut"
    assert set(item["scores"]) == {"insertion_auc"}
    assert "insertion_auc" in page.inner_text(f"{card('integrated_gradients')} .facts")
    assert page.inner_text("#drop-hint") == "dropped.png"


def test_the_page_asks_for_a_token_when_the_server_wants_one(
    browser: Any, torchserve: TorchServe, tmp_path: Path
) -> None:
    """A gateway with a token file: the page opens without a token, the API answers 401,
    the page asks for one and, given it, works through the same token check as gRPC."""
    tokens = tmp_path / "tokens"
    tokens.write_text("let-me-in\n")
    with running_gateway(
        torchserve.grpc_address,
        list(torchserve.models),
        auth_token_file=tokens,
        **gateway_options(torchserve),
    ) as secured:
        assert secured.gateway.http is not None
        page = browser.new_page()
        page.goto(secured.gateway.http.url)
        page.wait_for_selector("#token-row:not([hidden])")
        assert page.inner_text("#status").startswith("UNAUTHENTICATED:")
        page.fill("#token", "let-me-in")
        page.dispatch_event("#token", "change")
        page.wait_for_selector("#methods input[value=grad_cam]")
        page.set_input_files("#file", str(EXAMPLE))
        page.wait_for_selector("#status.ok", timeout=60_000)
        assert len(page.query_selector_all(".explanation.ready")) == 1  # the default method
        page.close()

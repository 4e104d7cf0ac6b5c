"""Debian's Chromium driven by Playwright (its Python package ships the driver; its own
browser download is not reachable here), with a fresh profile and no network chatter.

A missing browser fails the tests that need one, with what to run: ``make browser``
installs it, and ``make test`` does so first.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CHROMIUM = Path(os.environ.get("SALIENCY_CHROMIUM", "/usr/bin/chromium"))
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@contextmanager
def chromium(profile: Path) -> Iterator[Any]:
    """A browser context (Playwright's) on a fresh profile in ``profile``."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make browser` installs Chromium"
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=list(FLAGS),
            headless=True,
            viewport={"width": 1280, "height": 900},
            accept_downloads=True,
        )
        try:
            yield context
        finally:
            context.close()


def canvas_rgba(page: Any, selector: str) -> np.ndarray:
    """The pixels of a canvas, uint8 ``(H, W, 4)``."""
    width, height, data = page.evaluate(
        """(selector) => {
            const c = document.querySelector(selector);
            const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            return [c.width, c.height, Array.from(d)];
        }""",
        selector,
    )
    return np.asarray(data, dtype=np.uint8).reshape(height, width, 4)


def downloaded_bytes(page: Any, button: str) -> bytes:
    """Click a download button; the bytes of the file it saves."""
    with page.expect_download() as download:
        page.click(button)
    return Path(download.value.path()).read_bytes()


def png_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)

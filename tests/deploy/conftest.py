"""Fixtures for the deploy tests: each overlay is rendered once per session."""

from __future__ import annotations

import pytest

from tests.deploy.support import OVERLAYS, Rendered, render

_cache: dict[str, Rendered] = {}


def rendered_overlay(overlay: str) -> Rendered:
    if overlay not in _cache:
        _cache[overlay] = render(overlay)
    return _cache[overlay]


@pytest.fixture(params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    """Every overlay, rendered with `kubectl kustomize` (cached for the session)."""
    return rendered_overlay(request.param)


@pytest.fixture
def render_overlay():
    """Render one named overlay (cached)."""
    return rendered_overlay

"""Linters over deploy/: yamllint (YAML), hadolint (Dockerfiles), checkov (rendered
manifests of every overlay and the Dockerfiles). Every skipped check is justified."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import DEPLOY, DOCKER, DOCKERFILES, OVERLAYS, run_tool, tool

CHECKOV_CONFIG = DEPLOY / ".checkov.yaml"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"


def test_yamllint() -> None:
    proc = run_tool([tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint"), str(DEPLOY)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    proc = run_tool([tool("hadolint"), "--config", str(HADOLINT_CONFIG), str(dockerfile)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory, request) -> dict[str, Any]:
    """One checkov run over the rendered overlays and the Dockerfiles (it is slow)."""
    from tests.deploy.conftest import rendered_overlay

    scan = tmp_path_factory.mktemp("checkov")
    for overlay in OVERLAYS:
        (scan / f"{overlay}.yaml").write_text(rendered_overlay(overlay).text)
    for dockerfile in DOCKERFILES:
        shutil.copy(dockerfile, scan / dockerfile.name)
    proc = run_tool(
        [tool("checkov"), "--config-file", str(CHECKOV_CONFIG), "-d", str(scan), "-o", "json"],
        timeout=300,
    )
    try:
        data = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(
            f"checkov gave no JSON (rc {proc.returncode}):\n{proc.stdout[-3000:]}"
            f"\n{proc.stderr[-3000:]}",
            pytrace=False,
        )
    reports = data if isinstance(data, list) else [data]
    return {r["check_type"]: r for r in reports}


@pytest.mark.parametrize("framework", ["kubernetes", "dockerfile"])
def test_checkov_passes(checkov_report: dict[str, Any], framework: str) -> None:
    report = checkov_report[framework]
    summary = report["summary"]
    failed = [
        f"{c['check_id']} {c['check_name']} ({c['file_path']} {c['resource']})"
        for c in report["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] > 0


def test_checkov_scanned_every_overlay_and_dockerfile(checkov_report: dict[str, Any]) -> None:
    assert checkov_report["kubernetes"]["summary"]["resource_count"] >= 10 * len(OVERLAYS)
    assert checkov_report["dockerfile"]["summary"]["resource_count"] == len(DOCKERFILES)


def _justified(path: Path, key: str, pattern: str) -> dict[str, bool]:
    """For each item of the list `key` in a YAML file: is it preceded by a comment?"""
    lines = path.read_text().splitlines()
    out: dict[str, bool] = {}
    in_list = False
    comment = False
    for line in lines:
        stripped = line.strip()
        if re.match(rf"^{key}:\s*$", line):
            in_list, comment = True, False
            continue
        if in_list:
            if stripped.startswith("#"):
                comment = True
            elif m := re.match(rf"^-\s*({pattern})\s*$", stripped):
                out[m.group(1)] = comment
                comment = False
            elif stripped and not line.startswith((" ", "-")):
                in_list = False
    return out


def test_every_checkov_skip_is_justified() -> None:
    skips = yaml.safe_load(CHECKOV_CONFIG.read_text()).get("skip-check", [])
    justified = _justified(CHECKOV_CONFIG, "skip-check", r"CKV2?_\w+")
    assert set(justified) == set(skips)
    assert all(justified.values()), justified


def test_every_hadolint_ignore_is_justified() -> None:
    ignored = yaml.safe_load(HADOLINT_CONFIG.read_text()).get("ignored", [])
    justified = _justified(HADOLINT_CONFIG, "ignored", r"DL\d+|SC\d+")
    assert set(justified) == set(ignored)
    assert all(justified.values()), justified


def test_no_inline_suppressions() -> None:
    """Suppressions live in the two config files above, each with its reason."""
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix in {"", ".yaml", ".gpu", ".cpu", ".json"}:
            text = path.read_text(errors="replace")
            assert "checkov:skip" not in text and "hadolint ignore" not in text, path

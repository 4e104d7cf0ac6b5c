"""The model's own code at archive time: staged, imported, its requirements installed to run it.

Archiving runs the model (to find its layers and export it), so its code must import here.
Files and package folders are staged into the model's folder, which is on ``sys.path``
while the model file runs (as in a TorchServe worker). Imports this environment lacks are
installed from ``--requirements`` into a private folder at the *end* of ``sys.path`` (the
server's own packages still win), under the server's constraints, and dropped afterwards;
the server installs them again, per model, when it serves the archive.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from service.model_requirements import (
    RequirementsError,
    check_requirements,
    write_server_constraints,
)
from service.runtime.artifacts import build_eager_net


class ArchiveError(ValueError):
    """The inputs cannot make a served model (a missing import, a bad target layer, a
    requirements file the server would not install); the message says why and what to do."""


def checked_requirements(requirements: Path | None) -> list[str]:
    if requirements is None:
        return []
    try:
        return check_requirements(requirements)
    except RequirementsError as error:
        raise ArchiveError(f"--requirements refused: {error}") from None


def stage(files: Sequence[Path], staging: Path) -> None:
    """Copy files and package folders into ``staging`` (folders keep their name)."""
    staging.mkdir(parents=True)
    for file in files:
        if file.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(file, staging / file.name, ignore=ignore)
        elif file.is_file():
            shutil.copy(file, staging / file.name)
        else:
            raise ArchiveError(f"no such file or folder: {file}")


def load_net(
    eager: dict[str, Any] | None,
    exported: Path | None,
    staging: Path,
    requirements: Path | None,
    deps: Path,
    say: Callable[[str], None],
) -> torch.nn.Module:
    """The network to archive. Model code whose imports this environment lacks has its
    ``requirements`` installed into ``deps``, a private folder added to the *end* of
    ``sys.path`` (the server's own packages still win), as the server will per model."""
    if eager is None:
        assert exported is not None
        return torch.export.load(exported).module()
    net = _import_net(eager, staging, requirements, deps, say)
    if not eager.get("weights") and not _same_weights(net, build_eager_net(eager, staging)):
        raise ArchiveError(
            "the model draws random weights when built and no --weights were given: every "
            "worker would serve other weights than the ONNX file archived now; save its "
            "state_dict (torch.save(model.state_dict(), 'model.pt')) and pass --weights"
        )
    return net


def _import_net(
    eager: dict[str, Any],
    staging: Path,
    requirements: Path | None,
    deps: Path,
    say: Callable[[str], None],
) -> torch.nn.Module:
    try:
        return build_eager_net(eager, staging)
    except ModuleNotFoundError as error:
        if requirements is None:
            raise ArchiveError(
                f"the model code imports {error.name!r}, which this environment lacks: list it "
                "in --requirements, or ship the module with --extra-files"
            ) from None
        say(f"the model code imports {error.name!r}: installing --requirements to run it here")
        _pip_install(requirements, deps)
    sys.path.append(str(deps))
    importlib.invalidate_caches()
    try:
        return build_eager_net(eager, staging)
    except ModuleNotFoundError as error:
        raise ArchiveError(
            f"the model code imports {error.name!r}, which --requirements does not install"
        ) from None


def _pip_install(requirements: Path, target: Path) -> None:
    """``pip install --target`` under the server's constraints (it cannot change torch)."""
    constraints = write_server_constraints(target.with_name("constraints.txt"))
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    command += ["--target", str(target), "-r", str(requirements)]
    env = {**os.environ, "PIP_CONSTRAINT": str(constraints)}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise ArchiveError(f"pip could not install --requirements: {result.stderr.strip()[-800:]}")


@contextlib.contextmanager
def restored_path() -> Iterator[None]:
    """``sys.path`` as it was, after the block (the archive's private folders go away)."""
    saved = list(sys.path)
    try:
        yield
    finally:
        sys.path[:] = saved


def _same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    one, two = first.state_dict(), second.state_dict()
    return one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)

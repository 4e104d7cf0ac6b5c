"""A model's own Python dependencies (``archive --requirements``), checked before they ship.

TorchServe installs an archive's ``requirements.txt`` when its worker starts
(``install_py_dep_per_model``; with ``useVenv`` in the archive's ``model-config.yaml``, in a
venv of the model's own that inherits the server's packages), running
``pip install -U --upgrade-strategy only-if-needed -r requirements.txt``. ``-U`` upgrades
every package the file names: a line ``torch`` would replace the server's torch
(2.13.0, CPU or CUDA as the image chose) with whatever PyPI has, gigabytes of another
build. Two guards, both applied:

* here, at archive time, a file that names ``torch`` with a version other than the
  server's, or ``torchvision`` / ``torchaudio`` (which pull their own torch), or a pip
  option or nested file (which could point pip elsewhere) is refused, with the line and
  the reason;
* at serve time the launcher hands pip a constraints file pinning every package the
  server has installed (``PIP_CONSTRAINT``, which TorchServe's pip call inherits), so a
  model's requirements can add packages but never replace the server's
  (:func:`write_server_constraints`).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SERVER_TORCH = "torch"
PULLS_ANOTHER_TORCH = ("torchvision", "torchaudio")
MAX_LINES = 200  # a model's own dependencies, not an environment


class RequirementsError(ValueError):
    """A requirements file the server would not install as written; the message says why."""


def served_torch_version() -> Version:
    """The torch this server runs, without its local build label (``2.13.0``)."""
    return Version(Version(importlib.metadata.version(SERVER_TORCH)).base_version)


def check_requirements(path: Path) -> list[str]:
    """The requirement lines of ``path``, or :class:`RequirementsError` naming the first
    line the server must not install (see the module docstring).

    Args:
        path: a pip requirements file: one requirement per line, ``#`` comments.

    Returns:
        The requirements, one string each, comments and blank lines dropped.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) > MAX_LINES:
        raise RequirementsError(f"{path.name}: {len(lines)} lines; at most {MAX_LINES}")
    torch = served_torch_version()
    kept = []
    for number, raw in enumerate(lines, start=1):
        text = raw.split(" #", 1)[0].strip()
        if not text or text.startswith("#"):
            continue
        where = f"{path.name} line {number} ({text[:80]!r})"
        if text.startswith("-"):
            raise RequirementsError(
                f"{where}: pip options and nested files are not accepted; list the packages"
            )
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise RequirementsError(f"{where}: not a requirement ({error})") from None
        name = canonicalize_name(requirement.name)
        if name in PULLS_ANOTHER_TORCH:
            raise RequirementsError(
                f"{where}: {name} is not installed on the server and brings its own torch; "
                "write the layers the model needs in plain torch"
            )
        if name == SERVER_TORCH and (
            requirement.url or not requirement.specifier.contains(torch, prereleases=True)
        ):
            raise RequirementsError(
                f"{where}: the server runs torch {torch}, which a model may not change; "
                "drop the line (torch is always there)"
            )
        kept.append(str(requirement))
    return kept


def write_server_constraints(path: Path) -> Path:
    """A pip constraints file pinning every package installed in this Python.

    TorchServe installs a model's requirements with ``pip install -U``, which would upgrade
    any package the file names, torch included; with this file as ``PIP_CONSTRAINT`` (the
    frontend passes its environment to that pip) a model may add packages but never
    replace the server's.
    """
    pins = sorted(
        {
            f"{dist.metadata['Name']}=={dist.version}"
            for dist in importlib.metadata.distributions()
            if dist.metadata["Name"]
        },
        key=str.lower,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{pin}\n" for pin in pins))
    return path

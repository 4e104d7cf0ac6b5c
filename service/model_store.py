"""A model store: a folder of ``.mar`` archives, each served under its file's name.

``serve``, ``torchserve`` and ``gateway --model-store`` read the same folder the same way,
so that in a pod (one image, two containers) TorchServe registers and the gateway routes
exactly the same names. A model is added by dropping its archive in the folder and
restarting; which one an empty ``model`` field picks follows :func:`choose_default`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

from service.gateway.upstream import PREDICT_SUFFIX

ARCHIVE_SUFFIX = ".mar"
DEFAULT_ARCHIVE = "shapes"
"""The name of the built-in model's archive (``saliency-serve archive --default``)."""
# TorchServe's own rule for model names (ModelArchive.validateName), read before Java is
# started so that a bad file name is refused with its reason rather than a dead frontend.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")


class StoreError(ValueError):
    """The store cannot be served as it is: the message says what to change."""


def store_models(store: Path) -> dict[str, str]:
    """Served name -> archive file name of every ``.mar`` in ``store``, in name order.

    Raises:
        StoreError: ``store`` is not a folder, or an archive's name cannot be served.
    """
    if not store.is_dir():
        raise StoreError(f"model store {store} is not a folder")
    models = {}
    for archive in sorted(store.glob(f"*{ARCHIVE_SUFFIX}")):
        name = archive.name[: -len(ARCHIVE_SUFFIX)]
        if not NAME.match(name):
            raise StoreError(
                f"{archive.name}: a model name starts with a letter or digit and holds only "
                "letters, digits, '_', '-' and '.'; rename the file"
            )
        if name.endswith(PREDICT_SUFFIX):
            raise StoreError(
                f"{archive.name}: names ending in {PREDICT_SUFFIX!r} are taken by each "
                "model's forward-only pool; rename the file"
            )
        models[name] = archive.name
    return models


def choose_default(names: Sequence[str], requested: str | None = None) -> tuple[str, str]:
    """The model an empty ``model`` field picks, and why (``serve`` prints it).

    ``requested`` (``--default-model``) when given; else the only model; else the built-in
    model's archive when the store has it; else the first name in order.

    Raises:
        StoreError: ``requested`` is not served, or there is no model.
    """
    if not names:
        raise StoreError("no model to serve")
    if requested is not None:
        if requested not in names:
            raise StoreError(
                f"--default-model {requested!r} is not in the store (it holds: {', '.join(names)})"
            )
        return requested, "--default-model"
    if len(names) == 1:
        return names[0], "the only model"
    if DEFAULT_ARCHIVE in names:
        return DEFAULT_ARCHIVE, "the built-in model's archive"
    return sorted(names)[0], "the first by name; --default-model picks another"


def prepare_store(
    store: Path, build_default: bool, ensure_default: Callable[[Path], Path]
) -> dict[str, str]:
    """The store's models, after building the built-in model's archive into it when it
    holds none or when ``build_default`` (``serve --default``) asks for it.

    Args:
        ensure_default: builds (or finds up to date) the built-in archive in a folder.
    """
    store.mkdir(parents=True, exist_ok=True)
    if build_default or not store_models(store):
        ensure_default(store)
    return store_models(store)

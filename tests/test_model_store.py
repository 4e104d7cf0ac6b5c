"""A model store's archives, their names, and which one an empty model name picks."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.model_store import (
    DEFAULT_ARCHIVE,
    StoreError,
    choose_default,
    prepare_store,
    store_models,
)


def drop(store: Path, *names: str) -> None:
    store.mkdir(parents=True, exist_ok=True)
    for name in names:
        (store / name).write_bytes(b"an archive")


def test_every_archive_is_served_under_its_file_name_in_name_order(tmp_path: Path) -> None:
    drop(tmp_path, "vit.mar", "resnet-18.mar", "shapes.mar", "notes.txt", "shapes.mar.source")
    assert store_models(tmp_path) == {
        "resnet-18": "resnet-18.mar",
        "shapes": "shapes.mar",
        "vit": "vit.mar",
    }


@pytest.mark.parametrize(
    ("file", "reason"),
    [
        ("resnet--predict.mar", "forward-only pool"),
        ("-x.mar", "letter or digit"),
        ("a b.mar", "holds only letters"),
    ],
)
def test_a_name_torchserve_or_the_twin_pools_cannot_take_is_refused(
    tmp_path: Path, file: str, reason: str
) -> None:
    drop(tmp_path, "ok.mar", file)
    with pytest.raises(StoreError, match=reason) as err:
        store_models(tmp_path)
    assert file in str(err.value) and "rename" in str(err.value)


def test_a_store_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="not a folder"):
        store_models(tmp_path / "missing")


@pytest.mark.parametrize(
    ("names", "requested", "chosen"),
    [
        (["vit"], None, "vit"),  # the only one
        (["alpha", DEFAULT_ARCHIVE, "zeta"], None, DEFAULT_ARCHIVE),  # the built-in one
        (["zeta", "beta", "gamma"], None, "beta"),  # the first by name
        (["alpha", DEFAULT_ARCHIVE], "alpha", "alpha"),  # asked for
    ],
)
def test_the_default_model_rules(names: list[str], requested: str | None, chosen: str) -> None:
    name, why = choose_default(names, requested)
    assert name == chosen and why


def test_a_default_model_not_in_the_store_is_refused_naming_what_it_holds() -> None:
    with pytest.raises(StoreError, match=r"'gamma' is not in the store \(it holds: a, b\)"):
        choose_default(["a", "b"], "gamma")
    with pytest.raises(StoreError, match="no model"):
        choose_default([])


class Builder:
    """Stands in for building the built-in archive (training is tested elsewhere)."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, store: Path) -> Path:
        self.calls.append(store)
        drop(store, f"{DEFAULT_ARCHIVE}.mar")
        return store / f"{DEFAULT_ARCHIVE}.mar"


def test_the_built_in_archive_is_built_only_into_an_empty_store_or_when_asked(
    tmp_path: Path,
) -> None:
    build = Builder()
    empty = tmp_path / "empty"
    assert prepare_store(empty, False, build) == {DEFAULT_ARCHIVE: f"{DEFAULT_ARCHIVE}.mar"}
    assert build.calls == [empty]
    mine = tmp_path / "mine"
    drop(mine, "vit.mar")
    assert prepare_store(mine, False, build) == {"vit": "vit.mar"}
    assert build.calls == [empty]  # a store with archives is served as it is
    assert set(prepare_store(mine, True, build)) == {"vit", DEFAULT_ARCHIVE}  # --default
    assert build.calls == [empty, mine]


def test_the_built_in_archive_name_is_the_archive_builders() -> None:
    from service.archive import DEFAULT_NAME

    assert DEFAULT_ARCHIVE == DEFAULT_NAME


def test_the_gateway_routes_a_stores_names_by_the_same_rule(tmp_path: Path) -> None:
    from service.cli import build_parser
    from service.cli.server_commands import gateway_models

    drop(tmp_path, "vit.mar", f"{DEFAULT_ARCHIVE}.mar", "alpha.mar")
    parse = build_parser().parse_args
    assert gateway_models(parse(["gateway", "--model-store", str(tmp_path)])) == (
        ("alpha", DEFAULT_ARCHIVE, "vit"),
        DEFAULT_ARCHIVE,
    )
    chosen = parse(["gateway", "--model-store", str(tmp_path), "--default-model", "vit"])
    assert gateway_models(chosen)[1] == "vit"
    assert gateway_models(parse(["gateway", "--model", "b", "--model", "a"])) == (("b", "a"), "a")
    with pytest.raises(StoreError, match="not in the store"):
        gateway_models(parse(["gateway", "--model", "a", "--default-model", "c"]))
    with pytest.raises(SystemExit):  # one source of names, not two
        parse(["gateway", "--model", "a", "--model-store", str(tmp_path)])

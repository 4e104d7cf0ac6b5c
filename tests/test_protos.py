"""The committed generated code and the proto's registry-driven enums match the sources."""

import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.registry import MASKS, METHODS, SCORES, Registry
from service.protocol.families import MASK, METHOD, SCORE, Family
from service.protogen import check, render_enum


def test_generated_code_is_fresh() -> None:
    assert check() == [], "generated code is stale: run `make protos`"


@pytest.mark.parametrize(
    ("family", "registry", "enum"),
    [(METHOD, METHODS, pb.Method), (MASK, MASKS, pb.MaskKind), (SCORE, SCORES, pb.Score)],
    ids=["Method", "MaskKind", "Score"],
)
def test_each_enum_is_its_registry(family: Family, registry: Registry, enum: object) -> None:  # type: ignore[type-arg]
    wire = set(enum.keys()) - {family.unspecified_name}  # type: ignore[attr-defined]
    assert wire == {family.value_name(name) for name in registry.names()}


def test_numbers_are_kept_and_never_reused() -> None:
    proto = (
        "// BEGIN GENERATED Score (x)\nenum Score {\n  SCORE_UNSPECIFIED = 0;\n"
        "  SCORE_A = 1;\n  SCORE_B = 2;\n  // retired: SCORE_C = 3;\n  reserved 3;\n}\n"
        "// END GENERATED Score\n"
    )
    out = render_enum(proto, SCORE, [("b", "bee"), ("d", "dee"), ("c", "sea")])
    assert "SCORE_B = 2;" in out and "SCORE_C = 3;" in out  # a returning name keeps 3
    assert "SCORE_D = 4;" in out  # a new name never takes a retired number
    assert "// retired: SCORE_A = 1;" in out and "reserved 1;" in out
    assert "  // dee\n  SCORE_D = 4;" in out
    # the old block, numbers for the old names (the wire of old clients) are unchanged
    assert (pb.MASK_KIND_NONE, pb.MASK_KIND_THRESHOLD, pb.MASK_KIND_GRABCUT) == (1, 2, 3)
    assert (pb.SCORE_DELETION_AUC, pb.SCORE_INSERTION_AUC, pb.SCORE_MU_FIDELITY) == (1, 2, 3)

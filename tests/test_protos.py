"""The committed generated code and the proto's Method enum match the sources."""

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.registry import method_names
from service.protogen import check, enum_value_name


def test_generated_code_is_fresh() -> None:
    assert check() == [], "generated code is stale: run `make protos`"


def test_method_enum_is_the_registry() -> None:
    wire = set(pb.Method.keys()) - {"METHOD_UNSPECIFIED"}
    assert wire == {enum_value_name(name) for name in method_names()}

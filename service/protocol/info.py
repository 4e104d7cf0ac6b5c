"""Declared parameters on the wire: what ``GetModelInfo`` says about a ``Param``."""

from __future__ import annotations

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.protocol.params import Param, format_value


def param_info(param: Param) -> pb.ParamInfo:
    """Name, type, default, bounds, choices and doc of one parameter."""
    info = pb.ParamInfo(
        name=param.name,
        type=param.kind,
        default=format_value(param.default),
        minimum_exclusive=param.minimum_exclusive,
        maximum_exclusive=param.maximum_exclusive,
        choices=param.choices,
        doc=param.doc,
    )
    if param.minimum is not None:
        info.minimum = param.minimum
    if param.maximum is not None:
        info.maximum = param.maximum
    return info

"""The model's own layers, a package folder beside its model file."""

from vitparts.attention import Block

__all__ = ["Block"]

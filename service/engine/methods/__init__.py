"""Explanation methods: one small module per method family.

Importing this package imports every module in it, which runs their ``@register_method``
decorators; adding a method is adding a module, with no list to keep.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

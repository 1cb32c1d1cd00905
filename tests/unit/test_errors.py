"""The error tree: node/errors.py's docstring draws every `NodeError` subclass, with the module it lives in."""

from __future__ import annotations

import importlib
import pkgutil
import re

import node
from node import errors
from node.errors import NodeError


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def test_the_tree_lists_every_error_with_its_module():
    for info in pkgutil.walk_packages(node.__path__, "node."):
        importlib.import_module(info.name)
    drawn = {m.group(1): m.group(2) for m in re.finditer(r"── (\w+)\s+(?:\(([\w.]+)\))?", errors.__doc__ or "")}
    found = {cls.__name__: cls.__module__ for cls in _subclasses(NodeError) if not cls.__name__.startswith("_")}
    assert set(found) == set(drawn) - {"NodeError"}
    for name, module in found.items():
        assert (drawn[name] or "node.errors") == module, name

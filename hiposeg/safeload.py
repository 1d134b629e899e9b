"""Parsing JSON and YAML that a user (or a damaged file) hands us, with bounded cost.

Python's parsers recurse once per nesting level, so a file nested a few thousand levels deep ends in
a `RecursionError` (or, later, in Pydantic or Rich); YAML aliases can make a 1 kB file expand to
billions of values (the "billion laughs"), which loads in microseconds as shared references but hangs
whatever walks it next (validation, an error message). Every structured file hiposeg reads — configs,
hierarchies, manifests, journals, run status, model metadata — goes through `load_json` / `load_yaml`,
which refuse such input with a `UserError` naming the file before anything walks it.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from hiposeg.errors import UserError

MAX_DEPTH = 64  # no hiposeg file nests deeper than ~6 levels
MAX_VALUES = 1_000_000  # values after expanding YAML aliases (a 150-class hierarchy has a few thousand)


def load_json(text: str | bytes, source: str, *, hint: str | None = None) -> Any:
    """`json.loads` that turns syntax errors and excessive nesting into a UserError naming `source`."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise UserError(f"{source} nests its values too deeply to be read (more than {MAX_DEPTH} levels)",
                        hint=hint or "The file is damaged or not a hiposeg file: restore or rewrite it.") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer of > 4300 digits
        raise UserError(f"{source} is not valid JSON: {e}",
                        hint=hint or "Fix the file (a JSON linter shows the exact spot) or restore it.") from None
    check_depth(data, source, hint=hint)
    return data


def load_yaml(text: str, source: str, *, hint: str | None = None) -> Any:
    """`yaml.safe_load` (no Python tags) with nesting and alias expansion bounded before construction."""
    fix = hint or "Fix the file (a YAML linter shows the exact spot) or restore it."
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise UserError(f"{source} nests its values too deeply to be read (more than {MAX_DEPTH} levels)",
                        hint=fix) from None
    except yaml.YAMLError as e:
        raise UserError(f"{source} is not valid YAML: {e}", hint=fix) from None
    if node is None:
        return None
    _check_yaml_graph(node, source, fix)
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:  # a python/object tag; an integer of > 4300 digits
        raise UserError(f"{source} is not valid YAML for hiposeg: {e}", hint=fix) from None
    return data


def check_depth(data: Any, source: str, *, hint: str | None = None) -> None:
    """Refuse parsed data nested deeper than MAX_DEPTH (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            raise UserError(f"{source} nests its values more than {MAX_DEPTH} levels deep",
                            hint=hint or "The file is damaged or not a hiposeg file: restore or rewrite it.")
        stack.extend((c, depth + 1) for c in children)


def _check_yaml_graph(root: yaml.Node, source: str, fix: str) -> None:
    """Depth, alias cycles and the expanded size of a composed YAML node graph (aliases are shared
    nodes, so the expanded size is computed once per node)."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    # iterative post-order walk: (node, depth, children visited?)
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            total = 1 + sum(size[id(c)] for c in _children(node))
            if total > MAX_VALUES:
                raise UserError(f"{source} expands to more than {MAX_VALUES:,} values through YAML aliases "
                                "(&anchor / *alias)", hint="Write the values out, or use fewer nested aliases.")
            size[key] = total
            continue
        if key in size:
            continue
        if key in on_path:
            raise UserError(f"{source} has a YAML alias that refers to itself (a recursive structure)", hint=fix)
        if depth > MAX_DEPTH:
            raise UserError(f"{source} nests its values more than {MAX_DEPTH} levels deep", hint=fix)
        on_path.add(key)
        stack.append((node, depth, True))
        for child in _children(node):
            if id(child) in on_path:
                raise UserError(f"{source} has a YAML alias that refers to itself (a recursive structure)", hint=fix)
            if id(child) not in size:
                stack.append((child, depth + 1, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []

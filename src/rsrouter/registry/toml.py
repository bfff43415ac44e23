"""A small TOML writer for the value types a workspace file holds (tomllib reads it back).

Scalars (str, int, float, bool), lists of scalars, tables and arrays of tables, nested to any
depth. None values are left out.
"""

from __future__ import annotations

import json
import math
import re

BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def key(name: str) -> str:
    return name if BARE_KEY.match(name) else json.dumps(name)


def value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _pairs(table: dict) -> list[str]:
    return [
        f"{key(k)} = {value(v)}"
        for k, v in table.items()
        if v is not None and not isinstance(v, dict) and not _is_table_array(v)
    ]


def _table(table: dict, path: str, *, array: bool = False) -> list[str]:
    """``[path]`` (or ``[[path]]``) with its pairs, then its sub-tables at any depth."""
    lines = ["", f"[[{path}]]" if array else f"[{path}]", *_pairs(table)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += _table(v, f"{path}.{key(k)}")
        elif _is_table_array(v):
            for item in v:
                lines += _table(item, f"{path}.{key(k)}", array=True)
    return lines


def dumps(doc: dict, header: str = "") -> str:
    """Top-level scalars, then tables, then arrays of tables (``[[name]]``)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += _pairs(doc)
    for name, v in doc.items():
        if isinstance(v, dict):
            lines += _table(v, key(name))
    for name, v in doc.items():
        if _is_table_array(v):
            for item in v:
                lines += _table(item, key(name), array=True)
    return "\n".join(lines).lstrip("\n") + "\n"

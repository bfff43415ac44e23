"""Writing router.toml with tomlkit, so a rewrite keeps the user's comments and layout.

``merge(text, doc)`` applies the plain dict ``doc`` (what tomllib would read back) to the TOML
``text``: values that did not change keep their spelling, comments and position; changed
values are replaced in place, new keys appended to their table, keys missing from ``doc`` (or
None there) removed. Arrays of tables whose items carry a ``name`` (the ``[[experts]]``) are
matched by name, so an expert's own comments stay with it when another one is added or
removed. ``dumps(doc, header)`` writes a fresh file.
"""

from __future__ import annotations

import json

import tomlkit
import tomlkit.exceptions
from tomlkit.items import AoT, Comment, Table, Whitespace


def dumps(doc: dict, header: str = "") -> str:
    """A new TOML text for ``doc``, with ``header`` as leading comment lines."""
    document = tomlkit.document()
    for line in header.splitlines():
        document.add(tomlkit.comment(line) if line else tomlkit.comment(""))
    if header:
        document.add(tomlkit.nl())
    _update(document, doc)
    return tomlkit.dumps(document)


def merge(text: str, doc: dict, header: str = "") -> str:
    """``text`` changed to hold exactly ``doc``, its comments and layout kept (a ``text`` that
    is no longer valid TOML is written afresh, with ``header``)."""
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError:
        return dumps(doc, header)
    _update(document, doc)
    return tomlkit.dumps(document)


def _plain(value):
    return value.unwrap() if hasattr(value, "unwrap") else value


def _same(a, b) -> bool:
    """Equal values of the same TOML type (1, 1.0 and true are three different values)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _is_table_array(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, dict) for x in value)


def _update(container, data: dict) -> None:
    """Make the tomlkit ``container`` (document or table) hold ``data``, editing in place."""
    for key in list(container.keys()):
        if data.get(key) is None:
            del container[key]
    for key, value in data.items():
        if value is None:
            continue
        old = container.get(key)
        if isinstance(value, dict) and isinstance(old, Table):
            _update(old, value)
        elif _is_table_array(value) and isinstance(old, AoT):
            _update_array(container, key, old, value)
        elif _is_table_array(value) and old is not None:  # e.g. `experts = []` before
            del container[key]  # the tables go after every plain value
            container[key] = _new(value)
        elif old is not None and _same(_plain(old), value):
            continue  # unchanged: keep its spelling and comment
        else:
            container[key] = _new(value)


def _update_array(container, key: str, old: AoT, items: list[dict]) -> None:
    """Edit an array of tables in place: items matched by ``name`` are updated, the others
    removed, new ones inserted where ``items`` puts them."""
    if [t.get("name") for t in old] == [item.get("name") for item in items]:
        for table, item in zip(old, items, strict=True):
            _update(table, item)
        return
    wanted = {item.get("name") for item in items}
    for i in reversed(range(len(old))):
        if old[i].get("name") not in wanted:
            del old[i]
    for position, item in enumerate(items):
        have = [t.get("name") for t in old]
        name = item.get("name")
        if name in have:
            table = old[have.index(name)]
            _update(table, item)
            if have.index(name) != position:
                del old[have.index(name)]
                old.insert(position, table)
        elif position == len(old):
            table = _new(item)
            if len(old):  # the last entry's trailing comments belong to what follows it
                _move_trailer(old[-1], table)
            old.append(table)
        else:
            old.insert(position, _blank_after(_new(item)))


def _last_container(table: Table) -> Table:
    """The table whose body ends the text of ``table`` (its last sub-table, at any depth)."""
    while True:
        keyed = [v for k, v in table.value.body if k is not None]
        if not keyed or not isinstance(keyed[-1], Table):
            return table
        table = keyed[-1]


def _blank_after(table: Table) -> Table:
    _last_container(table).add(tomlkit.nl())
    return table


def _move_trailer(src: Table, dst: Table) -> None:
    """Move the comments and blank lines that end ``src`` to the end of ``dst``."""
    body = _last_container(src).value.body
    trailer = []
    while body and body[-1][0] is None and isinstance(body[-1][1], (Comment, Whitespace)):
        trailer.insert(0, body.pop()[1])
    _blank_after(src)
    end = _last_container(dst)
    if not trailer:
        return
    for item in trailer:
        end.add(item)


def _new(value):
    """A tomlkit item for a plain value (None entries of tables left out)."""
    if isinstance(value, dict):
        table = tomlkit.table()
        for k, v in value.items():
            if v is not None:
                table[k] = _new(v)
        return table
    if _is_table_array(value):
        array = tomlkit.aot()
        for item in value:
            array.append(_new(item))
        return array
    return tomlkit.item(value)

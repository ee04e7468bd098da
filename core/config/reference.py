"""A Markdown reference of every config key, generated from the pydantic models themselves.

Each key gets its dotted name, type, default and description. Keys of a mapping of sections are written
`<name>` (`model.tasks.<name>.pos_weight`), items of a list of sections `[]` (`tables[].name`), and a
section's "exactly one of" / "at most one of" groups are stated on the section's row.

Example:
    text = render_reference([("tml-<project>", ProjectConfig)], "python -m <regenerating command>")
"""

from __future__ import annotations

import enum
import inspect
import json
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import pydantic

_CONSTRAINTS = {
    "gt": ">",
    "ge": ">=",
    "lt": "<",
    "le": "<=",
    "min_length": "min length",
    "max_length": "max length",
}


def render_reference(roots: Sequence[tuple[str, type[pydantic.BaseModel]]], command: str) -> str:
    """The reference of every root model (name, class), one table per top-level section.

    Args:
        roots: (title, root model) per config tree, e.g. ("tml-<project>", ProjectConfig).
        command: the command that regenerates the file, named in its header.
    """
    out = [
        "# Config reference",
        "",
        f"Generated from the config classes by `{command}`; do not edit by hand.",
        "Keys are dotted as in overrides (`training.num_train_steps=100`); `<name>` stands for a key of a",
        "mapping of sections (a task name, a partition name), `[]` for the items of a list of sections.",
        "See [config.md](config.md) for the file format, `${VAR:-default}` and overrides.",
    ]
    for title, root in roots:
        out += ["", f"## {title}: `{root.__name__}`", ""]
        groups = _groups(root)
        if groups:
            out += [f"{groups}", ""]
        for name, field in root.model_fields.items():
            key = field.alias or name
            out += ["", f"### `{key}`", ""]
            out += ["| key | type | default | description |", "|---|---|---|---|"]
            out += [_row(*row) for row in _rows(key, field, (root,))]
    return "\n".join(out) + "\n"


def _rows(key: str, field: Any, ancestors: tuple[type, ...]) -> Iterator[tuple[str, str, str, str]]:
    annotation = field.annotation
    description = field.description or ""
    model = _model_in(annotation)
    constraints = _constraints(field.metadata)
    kind = _type_name(annotation) + (f", {constraints}" if constraints else "")
    if model is None:
        yield key, kind, _default(field), description
        return
    container = _container(annotation)
    optional = _is_optional(annotation)
    section = {"dict": "mapping of name -> section", "list": "list of sections"}.get(container, "section")
    if optional:
        section += " | null"
    groups = _groups(model)
    if container:  # the container's own row, then a row for its items
        yield key, section, _default(field), description
        key = f"{key}.<name>" if container == "dict" else f"{key}[]"
        yield key, "section", "", " ".join(filter(None, [_doc(model), groups]))
    else:
        yield key, section, _default(field), " ".join(filter(None, [description or _doc(model), groups]))
    if model in ancestors:
        return
    for name, sub in model.model_fields.items():
        yield from _rows(f"{key}.{sub.alias or name}", sub, (*ancestors, model))


def _row(key: str, kind: str, default: str, description: str) -> str:
    cells = [f"`{key}`", kind, default, " ".join(description.split())]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _model_in(annotation: Any) -> type[pydantic.BaseModel] | None:
    """The section model of a field: itself, in `X | None`, or as the values of a dict / items of a list."""
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [m for m in (_model_in(a) for a in args if a is not type(None)) if m is not None]
        return models[0] if len(models) == 1 else None
    if origin in (dict, list) and args:
        return _model_in(args[-1]) if isinstance(args[-1], type) else None
    return None


def _container(annotation: Any) -> str | None:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _container(inner[0]) if len(inner) == 1 else None
    return {dict: "dict", list: "list"}.get(origin)


def _is_optional(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)] + [a for a in args if a is type(None)]
        return " | ".join(_type_name(a) for a in members)
    if origin is typing.Literal:
        return " | ".join(json.dumps(value) for value in args)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(json.dumps(member.value) for member in annotation)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _constraints(metadata: list[Any]) -> str:
    found = []
    for item in metadata:
        for attribute, symbol in _CONSTRAINTS.items():
            value = getattr(item, attribute, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True, validated_data={})
    if isinstance(value, pydantic.BaseModel):
        return "the defaults below"
    return json.dumps(pydantic.TypeAdapter(Any).dump_python(value, mode="json"))


def _groups(model: type[pydantic.BaseModel]) -> str:
    phrases = [f"Exactly one of {_names(group)}." for group in getattr(model, "exactly_one_of", ())]
    phrases += [f"At most one of {_names(group)}." for group in getattr(model, "at_most_one_of", ())]
    return " ".join(phrases)


def _names(group: Sequence[str]) -> str:
    return ", ".join(f"`{name}`" for name in group)


def _doc(model: type[pydantic.BaseModel]) -> str:
    """The first paragraph of the class's own docstring (not one inherited from a base class)."""
    return inspect.cleandoc(model.__dict__.get("__doc__") or "").split("\n\n")[0]

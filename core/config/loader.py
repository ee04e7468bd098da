"""The one config loader: YAML (local path or fsspec URL) -> `${ENV}` substitution -> dotted overrides -> validation.

Anchors and aliases are expanded into independent copies before overrides apply, so an override changes
exactly the key it names. docs/config.md describes the syntax for users.

Every error is a `ConfigError` naming the file and the dotted key path, e.g.
`local.yaml: model.tasks.fav.mlp_config.layer_sizes: Input should be a valid list`.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import fsspec
import pydantic
import yaml

from tml.core.errors import UserError

C = TypeVar("C", bound=pydantic.BaseModel)

# The inside of `${...}`: NAME, NAME:-default or NAME-default.
_ENV_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)(.*))?", re.DOTALL)


class ConfigError(UserError, ValueError):
    """A config that cannot be read or does not validate; the message names the file and key."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (plain YAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with `<<: *anchor` may be overridden explicitly
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise ConfigError(f"line {mark.line + 1}: duplicate key '{key}'")
        seen[key] = True
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def substitute_env(text: str, source: str, env: Mapping[str, str] | None = None) -> str:
    """Replace `${VAR}`, `${VAR:-default}` and `${VAR-default}` in `text` with the environment's values.

    Shell semantics: `${VAR:-default}` takes the default when VAR is unset or empty, `${VAR-default}` only
    when it is unset; a bare `${VAR}` that is unset is an error. The default is the text up to the first
    `}` (it may hold `/`, `.`, `-`, spaces); nested `${...}` are rejected. Full-line comments are skipped.
    """
    env = os.environ if env is None else env
    lines = text.splitlines(True)
    for number, line in enumerate(lines, start=1):
        # Full-line comments are left alone: documenting `${VAR}` in a comment must not require it.
        if line.lstrip().startswith("#"):
            continue
        lines[number - 1] = _substitute_line(line, env, f"{source} line {number}")
    return "".join(lines)


def _substitute_line(line: str, env: Mapping[str, str], where: str) -> str:
    parts, pos = [], 0
    while (start := line.find("${", pos)) != -1:
        end = line.find("}", start)
        if end == -1:
            raise ConfigError(f"{where}: '${{' without a closing '}}'")
        body = line[start + 2 : end]
        if "${" in body:
            raise ConfigError(
                f"{where}: nested '${{' inside '{line[start : end + 1]}' is not supported; "
                "a default is plain text"
            )
        parts += [line[pos:start], _env_value(body, env, where)]
        pos = end + 1
    return "".join([*parts, line[pos:]])


def _env_value(body: str, env: Mapping[str, str], where: str) -> str:
    match = _ENV_REFERENCE.fullmatch(body)
    if match is None:
        raise ConfigError(
            f"{where}: '${{{body}}}' is not a variable reference; expected ${{NAME}}, ${{NAME:-default}} "
            "or ${NAME-default} (NAME: letters, digits, _)"
        )
    name, operator, default = match.groups()
    value = env.get(name)
    if operator == ":-":
        return value if value else default
    if operator == "-":
        return default if value is None else value
    if value is None:
        raise ConfigError(
            f"{where}: environment variable ${{{name}}} is not set (set it, or give a default: "
            f"${{{name}:-value}})"
        )
    return value


def parse_yaml(text: str, source: str) -> dict[str, Any]:
    """Parse YAML text into a mapping; syntax errors name the line and column."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{source} {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    return _expand_aliases(data)


def _expand_aliases(value: Any) -> Any:
    """Rebuild the parsed tree so that every `*alias` and `<<: *merge` is an independent copy.

    PyYAML returns one shared object for an anchor and all its aliases (merged mappings share their
    values too): an override of one tower's `pos_weight` would change every tower that aliases it.
    (Recursive anchors never get here: the parser rejects them.)
    """
    if isinstance(value, dict):
        return {key: _expand_aliases(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_aliases(item) for item in value]
    return value  # scalars are immutable


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return _unwrap_optional(members[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return _unwrap_optional(typing.get_args(annotation)[0])
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)


def _model_keys(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """YAML key -> field annotation (aliases included)."""
    keys = {}
    for name, field in model.model_fields.items():
        keys[field.alias or name] = field.annotation
        keys[name] = field.annotation
    return keys


def _child(annotation: Any, node: dict, key: str, where: str) -> tuple[Any, bool]:
    """Annotation of `key` below a node of type `annotation`, and whether the key is known."""
    annotation = _unwrap_optional(annotation)
    if _is_model(annotation):
        keys = _model_keys(annotation)
        return keys.get(key), key in keys
    if typing.get_origin(annotation) is dict:
        value_type = typing.get_args(annotation)[1] if typing.get_args(annotation) else Any
        return value_type, key in node
    raise ConfigError(f"'{where}' is a value, not a section: it has no key '{key}'")


def _valid_keys(annotation: Any, node: dict) -> list[str]:
    annotation = _unwrap_optional(annotation)
    if _is_model(annotation):
        return list(annotation.model_fields)
    return [str(k) for k in node]


def apply_overrides(
    data: dict, overrides: Sequence[str], model: type[pydantic.BaseModel], source: str
) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) onto `data`, checking each path against `model`.

    Keys of a dict-typed section (e.g. `model.tasks`) must already exist, except as the last component.
    """
    for override in overrides:
        path, sep, raw = override.partition("=")
        if not sep or not path:
            raise ConfigError(f"override '{override}': expected KEY.PATH=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError as err:
            raise ConfigError(f"override '{override}': value is not valid YAML: {err}") from None
        parts = path.split(".")
        # Dict keys may contain dots (task names such as `engagement.is_favorited`): match the longest existing dict key.
        node, annotation, i = data, model, 0
        walked: list[str] = []
        while i < len(parts):
            key, step = _match_key(annotation, node, parts, i)
            where = ".".join(walked) or "<top level>"
            child_type, known = _child(annotation, node, key, where)
            last = i + step == len(parts)
            dict_section = typing.get_origin(_unwrap_optional(annotation)) is dict
            if not known and not (dict_section and last):
                valid = ", ".join(_valid_keys(annotation, node)) or "none"
                raise ConfigError(
                    f"{source}: override '{override}': '{where}' has no key '{key}'; valid keys: {valid}"
                )
            walked.append(key)
            if last:
                node[key] = value
                break
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                raise ConfigError(
                    f"{source}: override '{override}': '{'.'.join(walked)}' is a value, not a section"
                )
            node, annotation, i = node[key], child_type, i + step
    return data


def _match_key(annotation: Any, node: dict, parts: list[str], i: int) -> tuple[str, int]:
    if typing.get_origin(_unwrap_optional(annotation)) is dict:
        for end in range(len(parts), i, -1):
            candidate = ".".join(parts[i:end])
            if candidate in node:
                return candidate, end - i
    return parts[i], 1


def _format_loc(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def _model_at(model: type[pydantic.BaseModel], loc: tuple) -> type[pydantic.BaseModel] | None:
    annotation: Any = model
    for part in loc:
        annotation = _unwrap_optional(annotation)
        if _is_model(annotation):
            annotation = _model_keys(annotation).get(part)
        elif typing.get_origin(annotation) in (dict, list):
            annotation = typing.get_args(annotation)[-1]
        else:
            return None
    annotation = _unwrap_optional(annotation)
    return annotation if _is_model(annotation) else None


def validate(model: type[C], data: dict, source: str) -> C:
    """Validate `data` as `model`; all problems reported at once, each with its key path."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        lines = []
        for error in err.errors():
            loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
            if error["type"] == "extra_forbidden":
                parent = _model_at(model, loc[:-1])
                valid = f"; valid keys: {', '.join(parent.model_fields)}" if parent else ""
                lines.append(f"  {_format_loc(loc)}: unknown key '{loc[-1]}'{valid}")
            else:
                message = error["msg"].removeprefix("Value error, ")
                lines.append(f"  {_format_loc(loc)}: {message}")
        raise ConfigError(
            f"{source}: invalid config ({len(lines)} problem(s)):\n" + "\n".join(lines)
        ) from None


def read_text(path: str) -> str:
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except ImportError as err:
        raise ConfigError(
            f"{path}: cannot open this URL ({err}); install the matching extra, e.g. tml[s3]"
        ) from None


def load_config(
    model: type[C], path: str, overrides: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> C:
    """Read, substitute, override and validate a config file.

    Args:
        model: the root config class of a project.
        path: a local path or fsspec URL of a YAML file.
        overrides: `dotted.key=value` strings applied after substitution, values parsed as YAML.
        env: variables for `${VAR}` (default: the process environment).

    Example:
        config = load_config(ProjectConfig, "local.yaml", ["training.num_train_steps=100"])
    """
    text = substitute_env(read_text(path), path, env)
    data = parse_yaml(text, path)
    data = apply_overrides(data, overrides, model, path)
    return validate(model, data, path)


def dump_config(config: pydantic.BaseModel) -> str:
    """The resolved config as YAML text that `load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False)


def save_config(config: pydantic.BaseModel, path: str) -> None:
    """Write the resolved config (e.g. `<save_dir>/config.yaml`) so a run can be reproduced from its folder."""
    with fsspec.open(path, "w", encoding="utf-8", auto_mkdir=True) as f:
        f.write(dump_config(config))

"""The strict base class every config section derives from.

Unknown keys are errors, every field is typed and described, and "exactly one of" / "at most one of"
groups (the original YAML's `optimizer: {adam: {...}}` shape) are declared once per class.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic


class BaseConfig(pydantic.BaseModel):
    """Strict pydantic model: unknown keys rejected, assignments re-validated.

    Subclasses declare groups of mutually exclusive fields:

    Example:
        class Optimizer(BaseConfig):
            exactly_one_of: ClassVar = (("adam", "sgd"),)
            adam: AdamConfig | None = None
            sgd: SgdConfig | None = None
    """

    model_config = pydantic.ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, protected_namespaces=()
    )

    exactly_one_of: ClassVar[tuple[tuple[str, ...], ...]] = ()
    at_most_one_of: ClassVar[tuple[tuple[str, ...], ...]] = ()

    @pydantic.model_validator(mode="after")
    def _check_groups(self) -> BaseConfig:
        for group in self.exactly_one_of:
            _check_group(self, group, exactly=True)
        for group in self.at_most_one_of:
            _check_group(self, group, exactly=False)
        return self


def _check_group(config: BaseConfig, group: tuple[str, ...], exactly: bool) -> None:
    set_keys = [name for name in group if getattr(config, name) is not None]
    allowed = ", ".join(group)
    if exactly and len(set_keys) != 1:
        got = ", ".join(set_keys) if set_keys else "none"
        raise ValueError(f"exactly one of [{allowed}] must be set, got: {got}")
    if not exactly and len(set_keys) > 1:
        raise ValueError(f"at most one of [{allowed}] may be set, got: {', '.join(set_keys)}")


def which_one(config: BaseConfig, group: tuple[str, ...]) -> tuple[str, Any]:
    """Return (name, value) of the member of `group` that is set (the group must be exactly-one)."""
    for name in group:
        value = getattr(config, name)
        if value is not None:
            return name, value
    raise ValueError(f"none of [{', '.join(group)}] is set on {type(config).__name__}")

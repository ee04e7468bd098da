"""The config reference renders every key of toy models: unions, Literals, enums, constraints, dicts and
lists of sections, exactly-one-of groups, defaults."""

import enum
from typing import ClassVar, Literal

import pydantic
import pytest

from tml.core.config.base import BaseConfig
from tml.core.config.reference import render_reference

pytestmark = pytest.mark.unit
_F = pydantic.Field


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Adam(BaseConfig):
    """Adam with bias correction.

    Example: {adam: {beta_1: 0.9}}
    """

    beta_1: float = _F(0.9, ge=0.0, lt=1.0, description="Decay of the first moment.")


class Sgd(BaseConfig):
    momentum: float = 0.0


class Optimizer(BaseConfig):
    exactly_one_of: ClassVar = (("adam", "sgd"),)
    at_most_one_of: ClassVar = (("adam", "sgd"),)
    adam: Adam | None = _F(None, description="Adam.")
    sgd: Sgd | None = None


class Table(BaseConfig):
    """One embedding table."""

    name: str = _F(description="Table | name.")
    dim: int = _F(8, gt=0)


class Tower(BaseConfig):
    layer_sizes: list[int] = _F(min_length=1, description="Widths.")
    optimizer: Optimizer = _F(Optimizer(adam=Adam()), description="Its optimizer.")


class Root(BaseConfig):
    save_dir: str = _F(description="Run folder.")
    device: Literal["auto", "cpu"] = "auto"
    color: Color = Color.RED
    steps: int | None = _F(None, ge=-1, description="Steps;\n  -1: all.")
    tasks: dict[str, Tower] = _F(description="Task -> tower.")
    tables: list[Table] = _F(default_factory=list, description="Tables.")
    weights: dict[str, float] = {"a": 0.5}


def test_every_key_with_type_default_and_description():
    text = render_reference([("tml-toy", Root)], "python -m toy > ref.md")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `save_dir` | str | required | Run folder. |",
        '| `device` | "auto" \\| "cpu" | "auto" |  |',
        '| `color` | "red" \\| "blue" | "red" |  |',
        "| `steps` | int \\| null, >= -1 | null | Steps; -1: all. |",
        "| `tasks` | mapping of name -> section | required | Task -> tower. |",
        "| `tasks.<name>` | section |  |  |",
        "| `tasks.<name>.layer_sizes` | list[int], min length 1 | required | Widths. |",
        "| `tasks.<name>.optimizer` | section | the defaults below | Its optimizer. Exactly one of `adam`, `sgd`."
        " At most one of `adam`, `sgd`. |",
        "| `tasks.<name>.optimizer.adam` | section \\| null | null | Adam. |",
        "| `tasks.<name>.optimizer.adam.beta_1` | float, >= 0.0, < 1.0 | 0.9 | Decay of the first moment. |",
        "| `tasks.<name>.optimizer.sgd` | section \\| null | null |  |",
        "| `tasks.<name>.optimizer.sgd.momentum` | float | 0.0 |  |",
        "| `tables` | list of sections | [] | Tables. |",
        "| `tables[]` | section |  | One embedding table. |",
        "| `tables[].name` | str | required | Table \\| name. |",
        "| `tables[].dim` | int, > 0 | 8 |  |",
        '| `weights` | dict[str, float] | {"a": 0.5} |  |',
    ]
    assert "## tml-toy: `Root`" in text and "### `tasks`" in text
    assert "Generated from the config classes by `python -m toy > ref.md`" in text


def test_root_groups_and_two_roots():
    text = render_reference([("one", Optimizer), ("two", Table)], "cmd")
    assert "## one: `Optimizer`\n\nExactly one of `adam`, `sgd`. At most one of `adam`, `sgd`." in text
    assert "## two: `Table`" in text and "| `adam.beta_1` |" in text and "| `dim` |" in text


def test_a_section_that_contains_itself_is_listed_once():
    class Node(BaseConfig):
        value: int = 0
        child: "Node | None" = None

    Node.model_rebuild()
    rows = [line for line in render_reference([("n", Node)], "cmd").splitlines() if line.startswith("| `")]
    assert rows == ["| `value` | int | 0 |  |", "| `child` | section \\| null | null |  |"]

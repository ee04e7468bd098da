from typing import ClassVar

import pytest

from tml.core.config.base import BaseConfig, which_one
from tml.core.config.loader import ConfigError, dump_config, load_config, save_config

pytestmark = pytest.mark.unit


class Adam(BaseConfig):
    beta_1: float = 0.9


class Sgd(BaseConfig):
    momentum: float = 0.0


class Optimizer(BaseConfig):
    exactly_one_of: ClassVar = (("adam", "sgd"),)
    adam: Adam | None = None
    sgd: Sgd | None = None


class Head(BaseConfig):
    layer_sizes: list[int]
    pos_weight: float = 1.0


class Training(BaseConfig):
    save_dir: str
    num_train_steps: int = 10


class Root(BaseConfig):
    at_most_one_of: ClassVar = (("warm_start", "resume_from"),)
    training: Training
    tasks: dict[str, Head] = {}
    optimizer: Optimizer = Optimizer(adam=Adam())
    warm_start: str | None = None
    resume_from: str | None = None


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


GOOD = """
training:
  save_dir: ${RUN_DIR}/x
tasks:
  recap.engagement.is_favorited: {layer_sizes: [4, 1]}
optimizer:
  sgd: {momentum: 0.5}
"""


def test_loads_substitutes_env_and_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    config = load_config(
        Root,
        path,
        [
            "training.num_train_steps=100",
            "tasks.recap.engagement.is_favorited.pos_weight=2",
            "training.save_dir=/a",
        ],
        env={"RUN_DIR": "/runs"},
    )
    assert config.training.num_train_steps == 100
    assert config.training.save_dir == "/a"
    assert config.tasks["recap.engagement.is_favorited"].pos_weight == 2.0
    assert which_one(config.optimizer, ("adam", "sgd")) == ("sgd", Sgd(momentum=0.5))
    assert load_config(Root, path, env={"RUN_DIR": "/runs"}).training.save_dir == "/runs/x"


def test_override_yaml_values_and_new_dict_key(tmp_path):
    path = write(tmp_path, GOOD)
    config = load_config(
        Root, path, ["tasks.new={layer_sizes: [2]}", "optimizer={adam: {beta_1: 0.95}}"], env={"RUN_DIR": "r"}
    )
    assert config.tasks["new"].layer_sizes == [2]
    assert config.optimizer.adam.beta_1 == 0.95


def test_missing_env_variable_is_named(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError, match=r"c.yaml line 3: environment variable \$\{RUN_DIR\} is not set"):
        load_config(Root, path, env={})


def test_override_of_unknown_key_lists_valid_keys(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(
        ConfigError, match=r"'training' has no key 'num_steps'; valid keys: save_dir, num_train_steps"
    ):
        load_config(Root, path, ["training.num_steps=1"], env={"RUN_DIR": "r"})
    with pytest.raises(
        ConfigError, match=r"'tasks' has no key 'nope'; valid keys: recap.engagement.is_favorited"
    ):
        load_config(Root, path, ["tasks.nope.pos_weight=1"], env={"RUN_DIR": "r"})
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        load_config(Root, path, ["training.num_train_steps"], env={"RUN_DIR": "r"})


def test_typo_in_nested_key_names_file_path_and_valid_keys(tmp_path):
    path = write(tmp_path, "training: {save_dir: x}\ntasks:\n  fav: {layer_sizes: [1], pos_wieght: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Root, path)
    message = str(err.value)
    assert path in message
    assert "tasks.fav.pos_wieght: unknown key 'pos_wieght'; valid keys: layer_sizes, pos_weight" in message


def test_wrong_type_and_missing_field(tmp_path):
    path = write(tmp_path, "training: {num_train_steps: lots}\n")
    with pytest.raises(ConfigError) as err:
        load_config(Root, path)
    message = str(err.value)
    assert "training.save_dir: Field required" in message
    assert "training.num_train_steps: Input should be a valid integer" in message


def test_malformed_yaml_names_line(tmp_path):
    path = write(tmp_path, "training:\n  save_dir: x\n  bad: [1, 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml line \d+ column \d+: invalid YAML"):
        load_config(Root, path)
    path = write(tmp_path, "training: {save_dir: x}\ntraining: {save_dir: y}\n", "dup.yaml")
    with pytest.raises(ConfigError, match="dup.yaml line 2: duplicate key 'training'"):
        load_config(Root, path)
    path = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Root, path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Root, str(tmp_path / "absent.yaml"))


def test_exactly_one_and_at_most_one_groups(tmp_path):
    path = write(tmp_path, "training: {save_dir: x}\noptimizer: {adam: {}, sgd: {}}\n")
    with pytest.raises(
        ConfigError, match=r"optimizer: exactly one of \[adam, sgd\] must be set, got: adam, sgd"
    ):
        load_config(Root, path)
    path = write(tmp_path, "training: {save_dir: x}\noptimizer: {}\n")
    with pytest.raises(ConfigError, match=r"exactly one of \[adam, sgd\] must be set, got: none"):
        load_config(Root, path)
    path = write(tmp_path, "training: {save_dir: x}\nwarm_start: a\nresume_from: b\n")
    with pytest.raises(ConfigError, match=r"at most one of \[warm_start, resume_from\] may be set"):
        load_config(Root, path)


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(Root, write(tmp_path, GOOD), env={"RUN_DIR": "r"})
    out = tmp_path / "run" / "config.yaml"
    save_config(config, str(out))
    assert load_config(Root, str(out)) == config
    assert "recap.engagement.is_favorited" in dump_config(config)


def test_fsspec_url(tmp_path):
    import fsspec

    with fsspec.open("memory://configs/c.yaml", "w") as f:
        f.write("training: {save_dir: m}\n")
    assert load_config(Root, "memory://configs/c.yaml").training.save_dir == "m"


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    path = write(tmp_path, "base: &b {save_dir: x, num_train_steps: 3}\ntraining:\n  <<: *b\n  save_dir: y\n")

    class WithBase(Root):
        base: Training

    config = load_config(WithBase, path)
    assert (config.training.save_dir, config.training.num_train_steps) == ("y", 3)


def test_comments_are_not_substituted(tmp_path):
    path = write(tmp_path, "# run with ${UNSET_VAR}\ntraining: {save_dir: x}\n")
    assert load_config(Root, path, env={}).training.save_dir == "x"


def _paths(tree, prefix=""):
    """Every leaf of a dumped config as `dotted.path -> value`."""
    if isinstance(tree, dict) and tree:
        return {p: v for k, item in tree.items() for p, v in _paths(item, f"{prefix}{k}.").items()}
    return {prefix.rstrip("."): tree}


def _changed(before, after):
    a, b = _paths(before.model_dump()), _paths(after.model_dump())
    return {p for p in a.keys() | b.keys() if a.get(p) != b.get(p)}


class Data(BaseConfig):
    inputs: str
    shuffle: dict[str, int] = {}
    columns: list[str] = []


class Aliased(BaseConfig):
    rates: dict[str, float]
    tasks: dict[str, Head]
    tables: list[Head] = []
    more_tables: list[Head] = []
    train_data: Data
    validation_data: dict[str, Data]


ALIASED = """
rates:
  backbone: &lr 0.003
  a: *lr
  b: *lr
tasks:
  a: &tower {layer_sizes: &sizes [4, 1], pos_weight: 1.0}
  b: *tower
  c: {layer_sizes: *sizes}
tables: &tables
  - {layer_sizes: [2]}
more_tables: *tables
train_data: &data
  inputs: train/*.parquet
  shuffle: {seed: 0, buffer: 16}
  columns: [x, y]
validation_data:
  valid:
    <<: *data
    inputs: valid/*.parquet
"""


@pytest.mark.parametrize(
    "override",
    [
        "tasks.a.pos_weight=5",
        "tasks.b.layer_sizes=[8, 1]",
        "rates.backbone=0.01",
        "train_data.shuffle.seed=7",
        "validation_data.valid.shuffle.buffer=4",
        "train_data.columns=[z]",
        "more_tables=[{layer_sizes: [3]}]",
    ],
)
def test_override_of_an_aliased_key_changes_only_that_key(tmp_path, override):
    path = write(tmp_path, ALIASED)
    before = load_config(Aliased, path)
    after = load_config(Aliased, path, [override])
    assert _changed(before, after) == {override.partition("=")[0]}


def test_parsed_tree_shares_no_section_between_aliases():
    from tml.core.config.loader import parse_yaml

    seen: dict[int, str] = {}

    def walk(node, where):
        if isinstance(node, (dict, list)):
            assert id(node) not in seen, f"{where} is the same object as {seen[id(node)]}"
            seen[id(node)] = where
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, item in items:
                walk(item, f"{where}.{key}")

    data = parse_yaml(ALIASED, "aliased.yaml")
    walk(data, "")
    assert data["validation_data"]["valid"]["columns"] == ["x", "y"]
    assert data["more_tables"] == data["tables"]


def test_recursive_alias_is_rejected():
    from tml.core.config.loader import parse_yaml

    with pytest.raises(
        ConfigError, match="r.yaml line 1 column 4: invalid YAML: found unconstructable recursive"
    ):
        parse_yaml("a: &a\n  b: *a\n", "r.yaml")


@pytest.mark.parametrize(
    "override",
    [
        "model.tasks.recap.engagement.is_favorited.pos_weight=5",
        "optimizer.multi_task_learning_rates.backbone_learning_rate.linear_ramp_to_cosine.learning_rate=0.01",
        "train_data.shuffle.seed=7",
    ],
)
def test_local_yaml_overrides_change_one_key(override):
    # The reproducers: local.yaml shares towers (*tower), learning rates (*lr) and data (<<: *data).
    import pathlib

    from tml.projects.home.recap.config import RecapConfig

    local = str(pathlib.Path(__file__).parents[3] / "projects/home/recap/config/local.yaml")
    env = {"TML_DATA": "/d", "TML_RUNS": "/r"}
    before = load_config(RecapConfig, local, env=env)
    after = load_config(RecapConfig, local, [override], env=env)
    assert _changed(before, after) == {override.partition("=")[0]}
    key = override.partition("=")[0]
    assert load_config(RecapConfig, local, [f"{key}={_paths(before.model_dump())[key]}"], env=env) == before


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${D:-data}/x", {}, "data/x"),
        ("${D:-data}/x", {"D": ""}, "data/x"),
        ("${D:-data}/x", {"D": "/mnt"}, "/mnt/x"),
        ("${D-data}/x", {}, "data/x"),
        ("${D-data}/x", {"D": ""}, "/x"),
        ("${D:-}/x", {}, "/x"),
        ("'${D:-/a b/c-1.2}'", {}, "/a b/c-1.2"),
        ("${A:-a}-${B:-b}", {"B": "2"}, "a-2"),
        ("${D}", {"D": "${NOT_EXPANDED}"}, "${NOT_EXPANDED}"),
    ],
)
def test_env_defaults_follow_the_shell(tmp_path, text, env, expected):
    path = write(tmp_path, f"training:\n  save_dir: {text}\n")
    assert load_config(Root, path, env=env).training.save_dir == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${A:-${B}}", r"c.yaml line 2: nested '\$\{' inside '\$\{A:-\$\{B\}' is not supported"),
        ("${A:?must be set}", r"c.yaml line 2: '\$\{A:\?must be set\}' is not a variable reference"),
        ("${lower case}", r"'\$\{lower case\}' is not a variable reference; expected \$\{NAME\}"),
        ("${A", r"c.yaml line 2: '\$\{' without a closing '\}'"),
        ("${A}", r"c.yaml line 2: environment variable \$\{A\} is not set \(set it, or give a default"),
    ],
)
def test_bad_env_references_are_named(tmp_path, text, message):
    path = write(tmp_path, f"training:\n  save_dir: {text}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(Root, path, env={})


def test_comments_with_defaults_are_not_substituted(tmp_path):
    path = write(tmp_path, "  # ${A:-${B}} and ${C\ntraining: {save_dir: '${S:-runs}'}\n")
    assert load_config(Root, path, env={}).training.save_dir == "runs"

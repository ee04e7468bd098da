import os
import pathlib
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.projects.twhin.main import cli

pytestmark = pytest.mark.unit


def test_relations_naming_unknown_tables_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TML_DEBUG", raising=False)
    args = [
        "--tables",
        "user=10",
        "--relations",
        "fav:user:tweet",
        "--num-edges",
        "5",
        "--output",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as exit_:
        cli(["generate-data", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "tml-twhin: --relations name tables ['tweet'] that --tables does not define (['user'])\n"
    )
    with pytest.raises(SystemExit):
        cli(["generate-data", *args, "--debug"])
    assert "Traceback" in capsys.readouterr().err


LOCAL = str(pathlib.Path(__file__).resolve().parents[3] / "projects/twhin/config/local.yaml")
KEYS = str(pathlib.Path(__file__).resolve().parents[3] / "projects/twhin/config/examples/string_keys.yaml")


def _short(capsys) -> str:
    # The loader prints `file: invalid config (N problem(s)):` and one line per problem.
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 2 and err.startswith("tml-twhin: "), err
    return err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.relations=[{name: fav, lhs: user, rhs: post}]",
         "tml-twhin: .*local.yaml: invalid config .* model: relations\\[0\\] \\('fav'\\): rhs table 'post' is not in "
         "embeddings.tables \\['user', 'tweet'\\]"),
        ("model.embeddings.tables=[{name: user, num_embeddings: 10, embedding_dim: 8, optimizer: {sgd: {learning_rate: 1}}},"
         " {name: tweet, num_embeddings: 10, embedding_dim: 16, optimizer: {sgd: {learning_rate: 1}}}]",
         "every table needs the same embedding_dim .*got user 8, tweet 16"),
    ],
)  # fmt: skip
def test_config_errors_are_one_line(capsys, monkeypatch, override, message):
    monkeypatch.delenv("TML_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli(["train", "--config", LOCAL, override])
    assert exit_.value.code == 2
    assert re.search(message, _short(capsys).replace("\n", " "))


def _twhin(tmp_path, *args):
    env = {**os.environ, "TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path / "runs")}
    env.pop("TML_DEBUG", None)
    command = [sys.executable, "-m", "tml.projects.twhin.main", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_ids_past_the_table_and_a_missing_vocabulary_are_one_line(tmp_path):
    train = tmp_path / "data" / "twhin_local" / "train"
    train.mkdir(parents=True)
    pq.write_table(
        pa.table({"lhs": [1, 5000], "rel": ["fav", "fav"], "rhs": [3, 4]}), train / "part-0.parquet"
    )
    done = _twhin(tmp_path, "train", "--config", LOCAL, "validation_data={}")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("tml-twhin:")]
    assert lines == [
        f"tml-twhin: {train}/part-0.parquet (row group 0): column 'lhs' row 1: id 5000 is outside [0, 5000), "
        "the lhs table of relation 'fav' (1 rows out of range)"
    ]
    done = _twhin(tmp_path, "train", "--config", KEYS)
    vocab = tmp_path / "data" / "twhin_keys" / "vocab" / "user.parquet"
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"tml-twhin: vocabulary '{vocab}' (train_data.vocabulary) does not exist: build it with "
        "`tml-twhin build-vocab --config <config>`"
    )

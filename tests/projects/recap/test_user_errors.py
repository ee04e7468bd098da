"""tml-recap reports a user error (bad config, missing file, no input files) in one line, exit status 2;
`--debug` adds the traceback. Each command runs as its own process, as users run it."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
LOCAL = str(ROOT / "projects/home/recap/config/local.yaml")


def recap(tmp_path, *args):
    env = {**os.environ, "TML_DATA": str(tmp_path / "data"), "TML_RUNS": str(tmp_path / "runs")}
    env.pop("TML_DEBUG", None)
    command = [sys.executable, "-m", "tml.projects.home.recap.main", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_train_without_input_files_prints_one_line_naming_the_key(tmp_path):
    inputs = f"{tmp_path}/none/*.parquet"
    args = ["train", "--config", LOCAL, f"train_data.inputs={inputs}"]
    done = recap(tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    named = [line for line in done.stderr.splitlines() if "train_data.inputs" in line]
    assert named == [f"tml-recap: train_data.inputs '{inputs}' matches no files"]

    debug = recap(tmp_path, *args, "--debug")
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().endswith(named[0])


def test_missing_config_file_is_one_line(tmp_path):
    done = recap(tmp_path, "summary", "--config", str(tmp_path / "absent.yaml"))
    assert (done.returncode, done.stderr) == (
        2,
        f"tml-recap: {tmp_path}/absent.yaml: config file not found\n",
    )


def _one_line(done, expected):
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("tml-recap:")] == [expected]


def test_validation_inputs_matching_nothing_fail_before_training_naming_the_partition(tmp_path):
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.data.synthetic import generate

    config = load_config(RecapConfig, LOCAL, env={"TML_DATA": str(tmp_path / "data")})
    generate(config.train_data, 200, str(tmp_path / "data/local/train"), num_files=1, progress=False)
    inputs = f"{tmp_path}/none/*.parquet"
    done = recap(tmp_path, "train", "--config", LOCAL, f"validation_data.valid.inputs={inputs}")
    _one_line(done, f"tml-recap: validation_data.valid.inputs '{inputs}' matches no files")
    assert not (tmp_path / "runs/local").exists()  # nothing was trained or written


def test_an_unreadable_schema_file_is_one_line(tmp_path):
    missing = tmp_path / "schema.yaml"
    done = recap(
        tmp_path, "summary", "--config", LOCAL, f"train_data.seg_dense_schema={{schema_path: {missing}}}"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"train_data.seg_dense_schema.schema_path '{missing}': cannot read" in done.stderr


def test_a_batch_size_the_ranks_cannot_share_names_the_key(tmp_path):
    import torch

    from tml.core.config.loader import ConfigError, load_config
    from tml.core.distributed import DistEnv
    from tml.projects.home.recap.build import build_train_data
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.data.synthetic import generate

    config = load_config(RecapConfig, LOCAL, env={"TML_DATA": str(tmp_path / "data")})
    generate(config.train_data, 200, str(tmp_path / "data/local/train"), num_files=1, progress=False)
    env = DistEnv(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(
        ConfigError, match=r"^train_data.global_batch_size 1024 is not divisible by the world "
    ):
        build_train_data(config, env)

"""tml-recap reports a user error (bad config, missing file, no input files) in one line, exit status 2;
`--debug` adds the traceback. Each command runs as its own process, as users run it."""

import os
import pathlib
import subprocess
import sys

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

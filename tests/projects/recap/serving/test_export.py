"""`tml-recap export` and `score`: the artifact of a checkpoint scores what `predict` scores, for every
architecture (MLP, MaskNet, DCN, DLRM, large tables, split-tower parts), from a checkpoint written by 2
ranks, loaded where torchrec cannot be imported. All on the exported program (`--compile none`): the one
AOTInductor compile of the suite is the README's (test_readme.py), which checks the same."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[4]
EXAMPLES = ROOT / "projects/home/recap/config/examples"

# A process that cannot import torchrec (nor FBGEMM), then runs tml-recap with the given arguments.
NO_TORCHREC = """
import sys
sys.modules["torchrec"] = None
sys.modules["fbgemm_gpu"] = None
from tml.projects.home.recap.main import cli
cli(sys.argv[1:])
assert sys.modules["torchrec"] is None
"""


def run_without_torchrec(env, *args):
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCHREC, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


def assert_same_scores(scored: pathlib.Path, predicted: pathlib.Path, atol: float = 1e-5) -> None:
    got, expected = pq.read_table(scored), pq.read_table(predicted)
    assert got.column_names == expected.column_names and got.num_rows == expected.num_rows > 0
    for name in expected.column_names:
        a, b = got.column(name).to_numpy(), expected.column(name).to_numpy()
        if name.startswith("meta."):
            assert (a == b).all(), name
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=name)


@pytest.mark.slow
def test_artifact_of_a_two_rank_checkpoint_scores_like_predict_without_torchrec(local_run):
    meta = json.loads((local_run["artifact"] / "artifact.json").read_text())
    assert meta["runtime"] == "exported_program" and meta["runtime_note"] == "not compiled (--compile none)"
    assert meta["checkpoint"]["step"] == 4 and meta["kind"] == "ranker"
    assert [d["name"] for d in meta["inputs"]["dense"]] == [
        "continuous", "binary", "user_embedding", "author_embedding", "discrete"
    ]  # fmt: skip
    assert meta["inputs"]["sparse"] == [
        {"name": "author_id", "column": "meta.author_id", "num_buckets": 20000, "rows": 20000}
    ]
    assert meta["ranking_weights"]["recap.engagement.is_replied"] == 13.5
    assert meta["heads"]["recap.engagement.is_favorited"]["calibration"] == {"x": [0.0, 1.0], "y": [0.0, 1.0]}
    assert (local_run["artifact"] / "config.yaml").exists()
    out = local_run["tmp"] / "scored"
    run_without_torchrec(
        local_run["env"], "score", "--artifact", str(local_run["artifact"]), "--input", local_run["valid"],
        "--output", str(out), "--batch-size", "37",
    )  # fmt: skip
    assert_same_scores(out / "part-00000.parquet", local_run["predictions"])


@pytest.mark.slow
def test_wrong_inputs_are_one_line_errors_naming_what_to_fix(local_run):
    run, tmp = local_run["run"], local_run["tmp"]
    mlp = str(EXAMPLES / "model_mlp.yaml")
    cases = [
        (["export", "--config", mlp, "--checkpoint", str(run), "--output", str(tmp / "x")],
         "is --config the config this checkpoint was trained with?"),
        (["export", "--config", mlp, "--checkpoint", str(tmp / "nowhere"), "--output", str(tmp / "x")],
         "holds no complete checkpoint"),
        (["score", "--artifact", str(tmp / "nowhere"), "--input", local_run["valid"], "--output", str(tmp / "x")],
         "does not exist (a folder written by `tml-recap export`)"),
        (["serve", "--artifact", str(local_run["data"]), "--port", "0"], "has no artifact.json"),
        (["score", "--artifact", str(local_run["artifact"]), "--input", str(tmp / "none/*.parquet"),
          "--output", str(tmp / "x")], "--input: inputs"),
    ]  # fmt: skip
    for argv, message in cases:
        out = local_run["recap"](*argv, ok=False)
        assert message in out and "Traceback" not in out, (argv, out[-3000:])
    taken = tmp / "taken"
    taken.mkdir()
    (taken / "part-00000.parquet").write_bytes(b"")
    out = local_run["recap"](
        "score", "--artifact", str(local_run["artifact"]), "--input", local_run["valid"], "--output", str(taken),
        ok=False,
    )  # fmt: skip
    assert "already holds 1 part file(s)" in out and "--overwrite" in out
    out = local_run["export"]("--output", str(local_run["artifact"]), ok=False)
    assert "is not empty: choose a new folder or pass --overwrite" in out
    out = local_run["export"]("--output", str(tmp / "x"), "--part", "user", ok=False)
    assert "--part 'user'" in out and "no model.split_towers" in out
    assert not (tmp / "x").exists() and not list(tmp.glob("x.tmp-*"))


def _examples_child(tmp: str) -> dict:
    """Every architecture: generate, train 3 steps, predict, export, score; returns what to compare."""
    import torch

    from tml.core.checkpoint import load_weights
    from tml.core.config.loader import load_config
    from tml.projects.home.recap.build import build_train_module
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.home.recap.main import cli
    from tml.reader.dataset import build_dataset

    os.environ.update(TML_DATA=f"{tmp}/data", TML_RUNS=f"{tmp}/runs")
    tiny = [
        "training.num_train_steps=3", "training.checkpoint_every_n=3", "train_data.global_batch_size=32",
        "validation_data.valid.global_batch_size=32", "train_data.shuffle.buffer_size=0", "prediction.batch_size=50",
    ]  # fmt: skip
    report = {}
    for name in ("mlp", "masknet", "dcn", "dlrm", "embeddings", "split_towers"):
        config_path = str(EXAMPLES / f"model_{name}.yaml")
        config = load_config(RecapConfig, config_path, tiny)
        data = f"{tmp}/data/model_{name}"
        cli(["generate-data", "--config", config_path, "--num-examples", "400", "--output", data])
        if name == "dcn":
            cli(["compute-stats", "--config", config_path])
        cli(["train", "--config", config_path, *tiny])
        valid = f"{data}/valid/*.parquet"
        cli(["predict", "--config", config_path, *tiny, "--input", valid, "--output", f"{tmp}/{name}/preds"])
        cli(["export", "--config", config_path, *tiny, "--output", f"{tmp}/{name}/art", "--compile", "none"])
        cli(
            ["score", "--artifact", f"{tmp}/{name}/art", "--input", valid, "--output", f"{tmp}/{name}/scores"]
        )
        report[name] = {
            "scored": f"{tmp}/{name}/scores/part-00000.parquet",
            "predicted": f"{tmp}/{name}/preds/part-00000.parquet",
        }
        if name == "split_towers":
            for part in ("user", "user_author"):
                cli(
                    [
                        "export",
                        "--config",
                        config_path,
                        *tiny,
                        "--part",
                        part,
                        "--output",
                        f"{tmp}/{part}/art",
                        "--compile",
                        "none",
                    ]
                )
                cli(
                    [
                        "score",
                        "--artifact",
                        f"{tmp}/{part}/art",
                        "--input",
                        valid,
                        "--output",
                        f"{tmp}/{part}/scores",
                    ]
                )
            # The eager training model's group embeddings on the same rows, in the same order.
            module = build_train_module(config)
            load_weights(module, config.training.save_dir)
            module.eval()
            rows = config.train_data.model_copy(update={"inputs": valid, "global_batch_size": 50})
            expected = {"user": [], "user_author": []}
            with torch.no_grad():
                for batch in build_dataset(rows, [], num_epochs=1, shuffle=False):
                    for group, tensor in module.model.group_embeddings(
                        batch, ["user", "user_author"]
                    ).items():
                        expected[group].append(tensor)
            report["parts"] = {
                part: {
                    "scored": f"{tmp}/{part}/scores/part-00000.parquet",
                    "expected": torch.cat(expected[part]).numpy(),
                }
                for part in expected
            }
    return report


@pytest.mark.slow
def test_every_architecture_and_split_tower_part_exports(run_alone, tmp_path):
    report = run_alone(_examples_child, str(tmp_path), timeout=900, cwd=str(ROOT))
    for name in ("mlp", "masknet", "dcn", "dlrm", "embeddings", "split_towers"):
        assert_same_scores(pathlib.Path(report[name]["scored"]), pathlib.Path(report[name]["predicted"]))
    for part, got in report["parts"].items():
        table = pq.read_table(got["scored"])
        assert table.column_names == ["meta.user_id", f"embedding/{part}"]
        embeddings = np.stack(table.column(f"embedding/{part}").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(embeddings, got["expected"], rtol=1e-5, atol=1e-6, err_msg=part)

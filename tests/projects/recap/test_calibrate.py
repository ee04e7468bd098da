"""`tml-recap calibrate` end to end on synthetic data: a model trained with a wrong downsampling rate in its
config (its probabilities 4x too low) becomes calibrated, evaluate reports both sets of metrics and draws
reliability diagrams, predict and the exported artifact score with the same knots, two ranks with uneven
shares fit the same map as one, and wrong inputs are one-line errors. Each mode runs as its own process."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

# No dots in task names, so that overrides can reach a task's keys.
CONFIG = """
training:
  save_dir: {tmp}/runs/cal
  num_train_steps: 150
  checkpoint_every_n: 150
  train_log_every_n: 50
  num_eval_steps: -1
model:
  featurization_config: {{log1p_abs_config: {{}}, feature_names_to_concat: [binary]}}
  tasks:
    click: {{mlp_config: {{layer_sizes: [16, 1]}}}}
    like: {{mlp_config: {{layer_sizes: [16, 1]}}}}
train_data:
  <<: &data
    global_batch_size: 256
    seg_dense_schema:
      features:
        - {{name: continuous, length: 16, dtype: float32}}
        - {{name: binary, length: 4, dtype: int64}}
    tasks: {{click: {{}}, like: {{}}}}
  inputs: {tmp}/data/train/*.parquet
  id_columns: [meta.user_id]
  shuffle: {{seed: 0, buffer_size: 4096}}
validation_data:
  # 3 of the 4 files: on two ranks, one rank reads two, the other one.
  calibrate: {{<<: *data, inputs: "{tmp}/data/calibrate/part-0000[012].parquet"}}
  valid: {{<<: *data, inputs: "{tmp}/data/valid/*.parquet"}}
calibration: {{partition: calibrate, num_bins: 200}}
optimizer:
  adam: {{}}
  single_task_learning_rate: {{constant: 0.01}}
"""
# The data is not downsampled, but the config says click's negatives were kept at 25%: its probabilities'
# odds are scaled by 0.25.
WRONG_RATE = "train_data.tasks.click.neg_downsampling_rate=0.25"


def recap(tmp_path, *args, ok=True, nproc=1):
    prefix = [sys.executable, "-m", "tml.projects.home.recap.main"]
    if nproc > 1:
        prefix = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *prefix[1:]]
    env = {k: v for k, v in os.environ.items() if k != "TML_DEBUG"}
    done = subprocess.run([*prefix, *args], env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-6000:]
    if not ok:
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        return [line for line in done.stderr.splitlines() if line.startswith("tml-recap:")]
    return done.stdout + done.stderr


def _columns(path):
    table = pq.read_table(path)
    return {name: table.column(name).to_numpy() for name in ("p/click", "p/like", "score")}


def test_isotonic_calibration_end_to_end(tmp_path):
    config = tmp_path / "cal.yaml"
    config.write_text(CONFIG.format(tmp=tmp_path))
    c = str(config)
    run = tmp_path / "runs/cal"
    recap(
        tmp_path,
        "generate-data",
        "--config",
        c,
        "--num-examples",
        "40000",
        "--output",
        str(tmp_path / "data"),
    )

    # Wrong inputs first: nothing to calibrate yet, a partition that does not exist.
    assert recap(tmp_path, "calibrate", "--config", c, WRONG_RATE, ok=False) == [
        f"tml-recap: calibrate: training.save_dir '{run}' holds no complete checkpoint (step-N/COMPLETE)"
    ]
    recap(tmp_path, "train", "--config", c, WRONG_RATE)
    assert recap(tmp_path, "calibrate", "--config", c, WRONG_RATE, "--partition", "nope", ok=False) == [
        "tml-recap: --partition 'nope': no such validation_data partition; the config has ['calibrate', 'valid']"
    ]

    out = recap(tmp_path, "calibrate", "--config", c, WRONG_RATE)
    fitted = json.loads((run / "calibration/step-150.json").read_text())
    assert f"isotonic calibration of step 150 written to {run}/calibration/step-150.json" in out
    assert fitted["partition"] == "calibrate" and fitted["checkpoint"]["step"] == 150
    assert fitted["tasks"]["click"]["mean_prediction"] < 0.5 * fitted["tasks"]["click"]["mean_label"]

    recap(tmp_path, "evaluate", "--config", c, WRONG_RATE)
    metrics = json.loads((run / "evaluate/step-150.json").read_text())
    before, after = (metrics[f"eval/valid/click/{m}"] for m in ("calibration", "isotonic_calibration"))
    assert before < 0.5 and after == pytest.approx(1.0, abs=0.15), (before, after)
    for task in ("click", "like"):
        key = f"eval/valid/{task}/"
        assert metrics[key + "isotonic_log_loss"] <= metrics[key + "log_loss"] + 1e-3, task
        assert metrics[key + "isotonic_rce"] >= metrics[key + "rce"] - 0.2, task
    assert metrics["eval/valid/click/isotonic_rce"] > metrics["eval/valid/click/rce"] + 1.0
    diagrams = sorted(p.name for p in (run / "evaluate").glob("*.png"))
    assert diagrams == [
        f"step-150.{p}.{t}.reliability.png" for p in ("calibrate", "valid") for t in ("click", "like")
    ]
    assert all((run / "evaluate" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in diagrams)

    # predict, the artifact (score, what serve runs) apply the same knots.
    valid = str(tmp_path / "data/valid/*.parquet")
    recap(tmp_path, "predict", "--config", c, WRONG_RATE, "--input", valid, "--output", str(tmp_path / "p"))
    recap(
        tmp_path, "export", "--config", c, WRONG_RATE, "--output", str(tmp_path / "art"), "--compile", "none"
    )
    recap(
        tmp_path,
        "score",
        "--artifact",
        str(tmp_path / "art"),
        "--input",
        valid,
        "--output",
        str(tmp_path / "s"),
    )
    predicted, scored = (
        _columns(tmp_path / "p/part-00000.parquet"),
        _columns(tmp_path / "s/part-00000.parquet"),
    )
    for name in predicted:
        np.testing.assert_allclose(scored[name], predicted[name], rtol=0, atol=1e-6, err_msg=name)
    heads = json.loads((tmp_path / "art/artifact.json").read_text())["heads"]
    for task in ("click", "like"):
        assert heads[task]["calibration"] == {
            "x": fitted["tasks"][task]["x"],
            "y": fitted["tasks"][task]["y"],
        }
    # calibration.apply=false: the probabilities as trained, 4x too low on average for click.
    recap(tmp_path, "predict", "--config", c, WRONG_RATE, "calibration.apply=false", "--input", valid,
          "--output", str(tmp_path / "raw"))  # fmt: skip
    raw = _columns(tmp_path / "raw/part-00000.parquet")
    assert raw["p/click"].mean() < 0.5 * predicted["p/click"].mean()

    # Two ranks, uneven shares (3 files: 2 on one rank, 1 on the other), fit the same map as one rank.
    recap(tmp_path, "calibrate", "--config", c, WRONG_RATE, nproc=2)
    two_ranks = json.loads((run / "calibration/step-150.json").read_text())["tasks"]
    for task in ("click", "like"):
        np.testing.assert_allclose(two_ranks[task]["x"], fitted["tasks"][task]["x"], rtol=1e-6)
        np.testing.assert_allclose(two_ranks[task]["y"], fitted["tasks"][task]["y"], rtol=1e-9)
        assert two_ranks[task]["weight"] == fitted["tasks"][task]["weight"]

    # A calibration file fitted under other downsampling rates: the model section is the same (the checkpoint
    # loads), the rates the file was fitted with are not (here: the config's own, without WRONG_RATE).
    assert recap(
        tmp_path,
        "predict",
        "--config",
        c,
        "--input",
        valid,
        "--output",
        str(tmp_path / "p2"),
        ok=False,
    ) == [  # fmt: skip
        f"tml-recap: calibration file {run}/calibration/step-150.json was fitted for another model (its model "
        "section or train_data downsampling rates differ from this config's); run `tml-recap calibrate` for "
        "this checkpoint"
    ]
    # ... or of other weights: training went on to step 152, and step 150's file was copied to step 152's.
    recap(tmp_path, "train", "--config", c, WRONG_RATE, "training.num_train_steps=152")
    shutil.copy(run / "calibration/step-150.json", run / "calibration/step-152.json")
    lines = recap(tmp_path, "export", "--config", c, WRONG_RATE, "--output", str(tmp_path / "art2"), ok=False)
    assert lines == [
        f"tml-recap: calibration file {run}/calibration/step-152.json was fitted on other weights (step 150 "
        f"of {run}/checkpoints/step-150) than checkpoint {run}/checkpoints/step-152 (step 152); run "
        "`tml-recap calibrate` for this checkpoint"
    ]
    assert not (tmp_path / "art2").exists()

"""Isotonic calibration of a recap checkpoint: `tml-recap calibrate`, its file, and applying it.

`calibrate` runs the checkpoint (its probabilities as trained: the heads' calibrator is the identity) over
one validation partition, pools predictions, labels and the partition's example weights (which undo
downsampling) into binned sums on every rank (ranks kept in step by `core.eval_loop.lockstep`), adds them
over ranks (one all_reduce) and fits one isotonic map per task on rank 0 (isotonic.py). The knots go to
`<run>/calibration/step-N.json`, beside the checkpoint they belong to (`<run>/checkpoints/step-N`), with
what they belong to: the model's fingerprint (its `model` section and the downsampling rates) and a digest
of its dense weights.

evaluate, predict and export load a checkpoint, then `apply_calibration`: when `calibration.apply` and the
checkpoint has a calibration file, it is checked against the loaded model (another model or other
weights are refused, naming the file) and its knots are put into the model's heads (`TaskHeads`), so the
probabilities, the ranking score and the exported program all use them.

Example:
    path = calibrate_checkpoint(config, checkpoint=None, partition="valid")  # <run>/calibration/step-N.json
    apply_calibration(config, sharded.module, "runs/x/checkpoints/step-N")   # heads now calibrated
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from tml.core.checkpoint import checkpoint_step, resolve_checkpoint
from tml.core.config.loader import ConfigError
from tml.core.errors import UserError
from tml.core.state import model_state
from tml.ml_logging.log import get_logger
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.isotonic import BinnedStats, fit_knots
from tml.projects.home.recap.model.heads import TaskHeads
from tml.reader.fs import write_text

logger = get_logger(__name__)
FORMAT = "tml-recap-calibration"
VERSION = 1
Knots = dict[str, tuple[list[float], list[float]]]


class CalibrationError(UserError, ValueError):
    """A calibration file that cannot be used with this model, or a fit the data does not allow."""


def run_folder(checkpoint: str) -> str:
    """The run folder of a step folder: the one above `checkpoints/` (else the step folder's parent)."""
    parent = os.path.dirname(os.path.abspath(checkpoint))
    return os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent


def calibration_path(checkpoint: str) -> str:
    """`<run>/calibration/step-N.json` of the complete step folder `checkpoint`."""
    return os.path.join(run_folder(checkpoint), "calibration", f"{os.path.basename(checkpoint)}.json")


def model_fingerprint(config: RecapConfig) -> str:
    """What the uncalibrated probabilities mean: the `model` section and the downsampling rates they undo."""
    rates = {
        task: [r.pos_downsampling_rate, r.neg_downsampling_rate]
        for task, r in config.train_data.tasks.items()
    }
    # Keys at their default are left out, so that a key a newer version adds does not change it.
    model = config.model.model_dump(mode="json", exclude_defaults=True)
    text = json.dumps({"model": model, "downsampling": rates}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 of the model's dense tensors (every weight and buffer outside the large tables), which tells
    one training of a model from another. The same for a train module (sharded or not) and the serving
    module: both name them `model.<...>`."""
    digest = hashlib.sha256()
    for name, value in sorted(model_state(module).items()):
        if not name.startswith("model.") or name.startswith("model.large_embeddings."):
            continue
        if type(value) is not torch.Tensor and type(value) is not nn.Parameter:
            continue  # a sharded table's piece: not the same on every rank
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def partition_name(config: RecapConfig, requested: str | None) -> str:
    """The partition to fit on: `--partition`, else `calibration.partition`, else the first one."""
    known = list(config.validation_data)
    name = requested or config.calibration.partition or (known[0] if known else None)
    key = "--partition" if requested else "calibration.partition"
    if not known:
        raise ConfigError("calibrate: the config has no validation_data partition to fit the calibration on")
    if name not in known:
        raise ConfigError(f"{key} {name!r}: no such validation_data partition; the config has {known}")
    return name


class _Pooled:
    """The eval loop's metrics protocol over `BinnedStats`: predictions pooled per bin, summed over ranks
    by `compute`."""

    def __init__(self, num_tasks: int, num_bins: int, device: torch.device) -> None:
        self.stats = BinnedStats(num_tasks, num_bins, device)
        self.total: BinnedStats | None = None

    def update(self, batch, outputs: dict[str, torch.Tensor]) -> None:
        self.stats.update(outputs["probabilities"], outputs["labels"], outputs["weights"])

    def compute(self) -> dict[str, float]:
        self.total = self.stats.reduced()
        return {}

    def reset(self) -> None:
        self.stats.reset()


def fit_tasks(stats: BinnedStats, tasks: list[str], partition: str) -> dict[str, dict]:
    """Per task its knots and what they were fitted on; a task without positives or negatives is an error."""
    fitted = {}
    for t, task in enumerate(tasks):
        weight, label_sum, prediction_sum = stats.totals(t)
        if weight <= 0 or label_sum <= 0 or label_sum >= weight:
            what = (
                "examples" if weight <= 0 else "positive examples" if label_sum <= 0 else "negative examples"
            )
            raise CalibrationError(
                f"validation_data.{partition} has no {what} of task {task!r} (weighted): an isotonic map "
                "cannot be fitted; calibrate on a larger partition"
            )
        x, y, w = stats.points(t)
        knots_x, knots_y = fit_knots(x, y, w)
        fitted[task] = {
            "x": knots_x,
            "y": knots_y,
            "weight": weight,
            "mean_label": label_sum / weight,
            "mean_prediction": prediction_sum / weight,
            "points": len(x),
        }
    return fitted


def calibrate_checkpoint(config: RecapConfig, checkpoint: str | None, partition: str | None) -> str:
    """`tml-recap calibrate`: fit every task's isotonic map on one partition with `checkpoint` (default:
    save_dir's latest) and write `<run>/calibration/step-N.json`; returns its path."""
    from tml.core.eval_loop import evaluate
    from tml.core.run import use_bf16
    from tml.projects.home.recap.build import build_for_inference, build_validation_data

    name = partition_name(config, partition)
    what = "calibrate: --checkpoint" if checkpoint else "calibrate: training.save_dir"
    path = resolve_checkpoint(checkpoint or config.training.save_dir, what)
    env, sharded, step = build_for_inference(config, path)
    one = config.model_copy(update={"validation_data": {name: config.validation_data[name]}})
    data = build_validation_data(one, env)[name]
    tasks = list(config.model.tasks)
    pooled = _Pooled(len(tasks), config.calibration.num_bins, env.device)
    bf16 = use_bf16(config.training, env)
    evaluate(sharded.module, data, pooled, None, env, bf16=bf16, desc=f"calibrate/{name}")
    out = calibration_path(path)
    if env.is_main:
        fitted = fit_tasks(pooled.total, tasks, name)
        document = {
            "format": FORMAT,
            "version": VERSION,
            "method": "isotonic",
            "checkpoint": {"path": os.path.abspath(path), "step": step},
            "partition": name,
            "inputs": config.validation_data[name].inputs,
            "num_bins": config.calibration.num_bins,
            "model_fingerprint": model_fingerprint(config),
            "weights_digest": weights_digest(sharded.module),
            "tasks": fitted,
        }
        write_text(out, json.dumps(document, indent=1))
        for task, fit in fitted.items():
            logger.info(
                "%s: %d knots from %d bins; on %s mean prediction %.5f, mean label %.5f (calibration %.3f before)",
                task,
                len(fit["x"]),
                fit["points"],
                name,
                fit["mean_prediction"],
                fit["mean_label"],
                fit["mean_prediction"] / fit["mean_label"],
            )
        logger.info("isotonic calibration of step %d written to %s", step, out)
    torch.distributed.barrier()
    return out


def read_calibration(path: str) -> dict:
    """The calibration file at `path` (format checked)."""
    try:
        with open(path) as f:
            document = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CalibrationError(f"calibration file {path}: cannot read it ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CalibrationError(f"calibration file {path}: not a {FORMAT} file")
    if document.get("version") != VERSION:
        raise CalibrationError(
            f"calibration file {path}: version {document.get('version')}, expected {VERSION}"
        )
    return document


def checkpoint_calibration(
    config: RecapConfig, module: nn.Module, checkpoint: str
) -> tuple[Knots, str] | None:
    """The knots of `checkpoint`'s calibration file and its path, checked against `module` (its weights
    loaded from `checkpoint`); None when `calibration.apply` is false or the checkpoint has none."""
    if not config.calibration.apply:
        logger.info("calibration.apply is false: probabilities as trained, no isotonic calibration")
        return None
    path = calibration_path(checkpoint)
    if not os.path.exists(path):
        others = (
            sorted(entry for entry in os.listdir(os.path.dirname(path)) if entry.endswith(".json"))
            if os.path.isdir(os.path.dirname(path))
            else []
        )
        if others:
            logger.warning(
                "%s has no calibration file for %s (it has %s): probabilities are not isotonic-calibrated; "
                "run `tml-recap calibrate` for this checkpoint",
                os.path.dirname(path),
                os.path.basename(checkpoint),
                ", ".join(others),
            )
        return None
    document = read_calibration(path)
    tasks = list(config.model.tasks)
    again = "run `tml-recap calibrate` for this checkpoint"
    if sorted(document["tasks"]) != sorted(tasks):
        raise CalibrationError(
            f"calibration file {path} calibrates tasks {sorted(document['tasks'])}, the model has "
            f"{sorted(tasks)}: it belongs to another model; {again}"
        )
    if document["model_fingerprint"] != model_fingerprint(config):
        raise CalibrationError(
            f"calibration file {path} was fitted for another model (its model section or train_data "
            f"downsampling rates differ from this config's); {again}"
        )
    step = checkpoint_step(checkpoint)
    if document["checkpoint"]["step"] != step or document["weights_digest"] != weights_digest(module):
        raise CalibrationError(
            f"calibration file {path} was fitted on other weights (step {document['checkpoint']['step']} of "
            f"{document['checkpoint']['path']}) than checkpoint {checkpoint} (step {step}); {again}"
        )
    return {task: (fit["x"], fit["y"]) for task, fit in document["tasks"].items()}, path


def install(model: nn.Module, knots: Knots) -> None:
    """Give the RecapModel `model` heads whose calibrator applies `knots` (the other constants kept)."""
    heads = model.heads
    model.heads = TaskHeads(
        heads.task_names,
        heads.odds_ratios.tolist(),
        heads.affine_scales.tolist(),
        heads.affine_biases.tolist(),
        calibration=knots,
    ).to(heads.odds_ratios.device)


def apply_calibration(config: RecapConfig, module: nn.Module, checkpoint: str) -> str | None:
    """Install `checkpoint`'s calibration (when there is one to apply) into the RecapModel of `module` (a
    train module, sharded or not, or a serving module) whose weights came from `checkpoint`; returns the
    calibration file's path, or None."""
    from tml.projects.home.recap.build import unwrap

    found = checkpoint_calibration(config, module, checkpoint)
    if found is None:
        return None
    knots, path = found
    install(unwrap(module).model, knots)
    logger.info("isotonic calibration applied: %s", path)
    return path

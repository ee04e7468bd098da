"""`tml-recap plan`: the phases a config declares, run in order, each recorded in the run folder.

A phase (`Phase`) says what it needs from the config, what its result depends on (`inputs`: config
sections and the files it reads, e.g. the checkpoint it loads), how to run, and what it made (`outputs`).
`PHASES` holds them in run order; `plan.phases` picks a subsequence (default: every phase the config can
run). Each phase's record, `<save_dir>/plan/<phase>.json`, holds its status (running, finished, failed,
stopped), its inputs and their sha256 fingerprint, its outputs and times. On every run, per phase:

- no record, or its last run did not finish: run it (training resumes from its latest checkpoint through
  the run lifecycle, which refuses a changed model; calibration and evaluation start again);
- finished, same inputs, outputs still there: skipped, and the log says so;
- finished with other inputs: the log lists what changed and the phase runs again - except training,
  whose checkpoints cannot take new settings by resuming: only a larger `training.num_train_steps`
  continues it; any other change is refused, naming the keys (train it in a new `training.save_dir`, with
  `training.initial_checkpoint_dir` to warm start from this run).

A phase's inputs include the outputs of the phases before it in the plan, so a re-run upstream that
changes what it made re-runs what follows.

Adding a phase: define a `Phase` and put it into `PHASES` at its place in the order.

Example:
    run_plan(config)   # under run_distributed: every rank runs every phase
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

from tml.core.config.loader import ConfigError
from tml.core.errors import UserError
from tml.ml_logging.log import get_logger
from tml.projects.home.recap import discretizer_calibration as discretizer
from tml.reader.fs import write_text

logger = get_logger(__name__)

# Keys that change how or where a step runs, not what it computes.
_HOW = {
    "training": {"save_dir", "checkpoint_every_n", "checkpoint_max_to_keep", "train_log_every_n",
                 "num_eval_steps", "eval_every_n", "eval_log_every_n", "device", "backend",
                 "collective_timeout_s", "pipeline", "compile", "profile", "mlflow", "num_threads"},
    "data": {"num_workers", "decode_process", "prefetch_batches", "skip_unreadable_files"},
}  # fmt: skip


class PlanError(UserError, ValueError):
    """A plan that cannot go on as the config says (the message names the phase and the keys)."""


@dataclasses.dataclass(frozen=True)
class Phase:
    """One step of a plan.

    Args:
        name: its name in `plan.phases` and its record's file name.
        run: config -> outputs (JSON data; a `paths` list names the files it made, which must still exist
            for the phase to count as done). Runs on every rank inside the job's process group.
        inputs: config -> JSON data of everything its result depends on.
        needs: config -> None when it can run on this config, else why not (a default plan leaves it out;
            naming it in `plan.phases` is an error).
        refuse: (differences, saved inputs, inputs) -> a message refusing to run a finished phase again with
            these changes, or None to run it again. None: always run again.
    """

    name: str
    run: Callable[[Any], dict]
    inputs: Callable[[Any], dict]
    needs: Callable[[Any], str | None] = lambda config: None
    refuse: Callable[[list[str], dict, dict], str | None] | None = None


def _without(section: dict, keys: set[str]) -> dict:
    return {k: v for k, v in section.items() if k not in keys}


def _dump(config) -> dict:
    # Keys at their default are left out: a key a newer version adds (at a default that keeps the old
    # behaviour) does not make finished phases look changed.
    return config.model_dump(mode="json", by_alias=True, exclude_defaults=True)


def _latest_checkpoint(config) -> dict:
    from tml.core.checkpoint import checkpoint_step, resolve_checkpoint

    path = resolve_checkpoint(config.training.save_dir)
    return {"path": os.path.abspath(path), "step": checkpoint_step(path)}


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- train -----------------------------------------------------------------------------------------
def _train_inputs(config) -> dict:
    dump = _dump(config)
    return {
        "model": dump["model"],
        "train_data": _without(dump["train_data"], _HOW["data"]),
        "optimizer": dump["optimizer"],
        "training": _without(dump["training"], _HOW["training"]),
    }


def _train(config) -> dict:
    from tml.projects.home.recap.main import train

    train(config)
    latest = _latest_checkpoint(config)
    return {**latest, "paths": [latest["path"]]}


def _refuse_train(differences: list[str], saved: dict, inputs: dict) -> str | None:
    old, new = saved["training"]["num_train_steps"], inputs["training"]["num_train_steps"]
    if all(d.startswith("training.num_train_steps:") for d in differences) and new > old:
        return None  # more steps: resuming continues the same training
    return (
        f"its checkpoints were trained with other settings ({_described(differences)}), which resuming "
        "them would not apply. Train these settings in a new training.save_dir (add "
        "training.initial_checkpoint_dir=<this save_dir> to warm start from this run), or restore them"
    )


# -- calibrate -------------------------------------------------------------------------------------
def _needs_validation(config) -> str | None:
    return None if config.validation_data else "the config has no validation_data partition"


def _calibrate_inputs(config) -> dict:
    from tml.projects.home.recap.calibration import model_fingerprint, partition_name

    name = partition_name(config, None)
    return {
        "checkpoint": _latest_checkpoint(config),
        "model": model_fingerprint(config),
        "partition": name,
        "validation_data": _without(_dump(config)["validation_data"][name], _HOW["data"]),
        "num_bins": config.calibration.num_bins,
    }


def _calibrate(config) -> dict:
    from tml.projects.home.recap.calibration import calibrate_checkpoint

    path = calibrate_checkpoint(config, None, None)
    return {"file": path, "sha256": _sha256(path), "paths": [path]}


# -- evaluate --------------------------------------------------------------------------------------
def _evaluate_inputs(config) -> dict:
    from tml.projects.home.recap.calibration import calibration_path, model_fingerprint

    checkpoint = _latest_checkpoint(config)
    calibration = calibration_path(checkpoint["path"])
    applied = config.calibration.apply and os.path.exists(calibration)
    return {
        "checkpoint": checkpoint,
        "model": model_fingerprint(config),
        "calibration": _sha256(calibration) if applied else None,
        "validation_data": {
            k: _without(v, _HOW["data"]) for k, v in _dump(config)["validation_data"].items()
        },
        "num_eval_steps": config.training.num_eval_steps,
        "num_bins": config.calibration.num_bins,
    }


def _evaluate(config) -> dict:
    from tml.projects.home.recap.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(config, None, None)
    step = _latest_checkpoint(config)["step"]
    path = os.path.join(config.training.save_dir, "evaluate", f"step-{step}.json")
    auroc = {k: v for k, v in results.items() if k.endswith("/auroc") and k.count("/") == 3}
    return {"metrics": path, "auroc": auroc, "paths": [path]}


# Run order. Discretizer calibration, where the config has a discretizer, goes before training.
PHASES: list[Phase] = [
    Phase("calibrate-discretizer", discretizer.phase_run, discretizer.phase_inputs, discretizer.phase_needs),
    Phase("train", _train, _train_inputs, refuse=_refuse_train),
    Phase("calibrate", _calibrate, _calibrate_inputs, _needs_validation),
    Phase("evaluate", _evaluate, _evaluate_inputs, _needs_validation),
]


def resolve_phases(config) -> list[Phase]:
    """The phases of `plan.phases` (default: every one the config can run), checked, in run order."""
    known = {phase.name: phase for phase in PHASES}
    order = [phase.name for phase in PHASES]
    names = config.plan.phases
    if names is None:
        return [phase for phase in PHASES if phase.needs(config) is None]
    for i, name in enumerate(names):
        if name not in known:
            raise ConfigError(f"plan.phases[{i}]: unknown phase {name!r}; the phases are {order}")
        reason = known[name].needs(config)
        if reason is not None:
            raise ConfigError(f"plan.phases[{i}]: phase {name!r} cannot run: {reason}")
    if names != sorted(names, key=order.index):
        raise ConfigError(f"plan.phases {names}: phases run in the order {order}; list them in that order")
    return [known[name] for name in names]


def differences(saved: Any, current: Any, key: str = "") -> list[str]:
    """Every leaf that differs between two JSON documents, as "key: saved -> current"."""
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for name in [*saved, *(k for k in current if k not in saved)]:
            missing = object()
            found += differences(
                saved.get(name, missing), current.get(name, missing), f"{key}.{name}".lstrip(".")
            )
        return found
    if saved == current:
        return []
    return [f"{key}: {_short(saved)} -> {_short(current)}"]


def _short(value: Any) -> str:
    if not isinstance(value, str | int | float | bool | list | dict | None):
        return "(default)"  # absent on this side: inputs leave out keys at their default
    text = repr(value)
    return text if len(text) <= 50 else text[:47] + "..."


def _described(changed: list[str]) -> str:
    """The changed keys of a phase's own inputs (a few), then the earlier phases whose outputs changed."""
    own = [d for d in changed if not d.startswith("upstream.")]
    parts = own[:4] + ([f"and {len(own) - 4} more"] if len(own) > 4 else [])
    upstream = sorted({d.split(".")[1].split(":")[0] for d in changed if d.startswith("upstream.")})
    if upstream:
        parts.append(f"the outputs of {', '.join(upstream)}")
    return "; ".join(parts)


def _fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _record_path(save_dir: str, phase: str) -> str:
    return os.path.join(save_dir, "plan", f"{phase}.json")


def _read_record(save_dir: str, phase: str) -> dict | None:
    path = _record_path(save_dir, phase)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise PlanError(
            f"plan record {path} cannot be read ({error}); delete it to run phase {phase!r} again"
        ) from None


def _write_record(save_dir: str, record: dict) -> None:
    write_text(_record_path(save_dir, record["phase"]), json.dumps(record, indent=1))


def _reason_to_run(phase: Phase, record: dict | None, inputs: dict) -> str | None:
    """Why `phase` runs (None: it is done); raises PlanError for a change it refuses."""
    if record is None:
        return "not run before"
    if record["status"] != "finished":
        return f"its last run ended {record['status']}; running it again"
    changed = differences(record["inputs"], inputs)
    if changed:
        refusal = phase.refuse(changed, record["inputs"], inputs) if phase.refuse else None
        if refusal is not None:
            raise PlanError(f"plan: phase {phase.name!r} finished with other inputs: {refusal}")
        return f"inputs changed since it finished ({_described(changed)}); running it again"
    gone = [p for p in record["outputs"].get("paths", []) if not os.path.exists(p)]
    if gone:
        return f"its outputs are gone ({', '.join(gone)}); running it again"
    return None


def run_plan(config) -> list[dict]:
    """Run the plan's phases in order on every rank (module docstring); returns their records."""
    import torch.distributed as dist

    from tml.core import run
    from tml.core.checkpoint import Preempted

    phases = resolve_phases(config)
    env = run.start(config.training)
    save_dir = config.training.save_dir
    records = {phase.name: _read_record(save_dir, phase.name) for phase in phases}
    dist.barrier()  # every rank has read the records before rank 0 writes any
    upstream: dict[str, dict] = {}
    done = []
    for phase in phases:
        inputs = {**phase.inputs(config), "upstream": dict(upstream)}
        record = records[phase.name]
        reason = _reason_to_run(phase, record, inputs)
        if reason is None:
            logger.info(
                "plan: phase %s finished at %s with the same inputs: skipped", phase.name, record["ended"]
            )
            upstream[phase.name] = record["outputs"]
            done.append({**record, "ran": False})
            continue
        logger.info("plan: phase %s: %s", phase.name, reason)
        record = {"phase": phase.name, "status": "running", "fingerprint": _fingerprint(inputs), "inputs": inputs,
                  "outputs": {}, "started": _now(), "ended": None, "error": None}  # fmt: skip
        if env.is_main:
            _write_record(save_dir, record)
        try:
            record["outputs"] = phase.run(config)
            record["status"] = "finished"
        except Preempted:
            record["status"] = "stopped"
            logger.info("plan: stopped by a signal during phase %s; run the plan again to go on", phase.name)
            raise
        except BaseException as error:
            record["status"], record["error"] = (
                "failed",
                "".join(traceback.format_exception_only(error)).strip(),
            )
            raise
        finally:
            record["ended"] = _now()
            if env.is_main:
                _write_record(save_dir, record)
        dist.barrier()
        upstream[phase.name] = record["outputs"]
        done.append({**record, "ran": True})
    logger.info(
        "plan done: %s", ", ".join(f"{r['phase']} ({'ran' if r['ran'] else 'skipped'})" for r in done)
    )
    return done


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")

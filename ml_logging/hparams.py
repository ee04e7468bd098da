"""A run's hyper-parameters (its flattened config) and final metrics in TensorBoard's HParams dashboard.

The record goes to its own TensorBoard run, `<save_dir>/tensorboard/hparams/`, rewritten whole on every
call, so the last call (run end) wins over an earlier one (run start, a previous attempt before a resume).
`torch.utils.tensorboard.SummaryWriter.add_hparams` is not used: it writes into a new time-stamped
sub-folder per call and adds an experiment summary to each, and when several run folders are opened
together (`tensorboard --logdir runs/`) the dashboard takes its columns from one arbitrary run's summary.
Without experiment summaries TensorBoard builds the table from every run's session record: one row per run
folder, the union of all runs' config keys as hyper-parameter columns, and as metric columns exactly the
scalars of the `hparams/` runs (the scalars in `<save_dir>/tensorboard/` itself are not sessions' children,
so the per-step curves do not become columns).

Example:
    log_hparams("runs/lr-3e-3", config, {}, step=0, status="running")            # at run start
    log_hparams("runs/lr-3e-3", config, final_metrics("runs/lr-3e-3"), step=500)  # at run end
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any, Literal

import pydantic

Scalar = bool | int | float | str | None
HPARAMS_RUN = "hparams"
_STATUSES = ("running", "success", "failure")


def flatten_config(config: Mapping[str, Any] | pydantic.BaseModel) -> dict[str, Scalar]:
    """Dotted keys -> scalar values, in the config's own order.

    Nested mappings are joined with dots (`optimizer.adam.lr`); a list of scalars stays one value, written
    as JSON (`[512, 256]`: layer sizes read as one hyper-parameter); a list holding mappings or lists is
    flattened by index (`stratifiers.0.name`); an empty mapping or list is `{}` / `[]`; None stays None.
    A pydantic config is dumped as `config.yaml` is (JSON types, aliases).
    """
    if isinstance(config, pydantic.BaseModel):
        config = config.model_dump(mode="json", by_alias=True)
    flat: dict[str, Scalar] = {}
    _flatten(config, "", flat)
    return flat


def _flatten(value: Any, key: str, flat: dict[str, Scalar]) -> None:
    if isinstance(value, Mapping):
        if not value:
            flat[key] = "{}"
        for name, item in value.items():
            _flatten(item, f"{key}.{name}" if key else str(name), flat)
    elif isinstance(value, (list, tuple)):
        if all(item is None or isinstance(item, (bool, int, float, str)) for item in value):
            flat[key] = json.dumps(list(value))
        else:
            for index, item in enumerate(value):
                _flatten(item, f"{key}.{index}", flat)
    elif value is None or isinstance(value, (bool, int, float, str)):
        flat[key] = value
    else:
        flat[key] = str(value)


def format_value(value: Scalar) -> str:
    """A flattened config value as text, the way YAML writes it (`null`, `true`, `0.001`, `[512, 256]`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def log_hparams(
    save_dir: str,
    config: Mapping[str, Any] | pydantic.BaseModel,
    metrics: Mapping[str, float],
    step: int,
    status: Literal["running", "success", "failure"] = "success",
) -> str:
    """Write the run's HParams record (rank 0 only); returns the folder written.

    Args:
        save_dir: the run folder (`training.save_dir`).
        config: the run's config (a pydantic config or its dict), flattened with `flatten_config`; keys
            whose value is None are left out (TensorBoard has no null; the cell stays empty).
        metrics: final metric values by name (`final_metrics(save_dir)` reads them from metrics.jsonl),
            written as scalars at `step`; they are the dashboard's metric columns.
        step: the run's last step.
        status: "running" at the start of a run (no end record), "success" or "failure" at its end.
    """
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard.summary import scalar
    from torch.utils.tensorboard.writer import FileWriter

    if status not in _STATUSES:
        raise ValueError(f"log_hparams: status must be one of {', '.join(_STATUSES)}, got {status!r}")
    folder = os.path.join(save_dir, "tensorboard", HPARAMS_RUN)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith("events.out.tfevents."):
            os.remove(os.path.join(folder, name))

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in flatten_config(config).items():
        if isinstance(value, bool):  # before int: bool is an int subclass
            start.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[key].number_value = value
        elif isinstance(value, str):
            start.hparams[key].string_value = value

    def record(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
        summary = summary_pb2.Summary()
        summary.value.add(
            tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR
        )
        return summary

    writer = FileWriter(folder)
    writer.add_summary(
        record(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_start_info=start)),
        step,
    )
    for name, value in metrics.items():
        writer.add_summary(scalar(name, float(value)), step)
    if status != "running":
        end = plugin_data_pb2.SessionEndInfo(
            status=api_pb2.STATUS_SUCCESS if status == "success" else api_pb2.STATUS_FAILURE,
            end_time_secs=time.time(),
        )
        writer.add_summary(
            record(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=end)),
            step,
        )
    writer.close()
    return folder

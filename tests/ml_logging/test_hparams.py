"""The HParams record: config flattening, event files read back, and TensorBoard's HParams plugin over a
folder of several runs (one row per run, the union of their keys, their final metrics)."""

from __future__ import annotations

import pytest

from tml.core.config.base import BaseConfig
from tml.ml_logging.hparams import flatten_config, format_value, log_hparams
from tml.ml_logging.metrics import MetricLogger

pytestmark = pytest.mark.unit


def test_flatten_config_dotted_keys_lists_and_empties():
    config = {
        "optimizer": {"adam": {"lr": 0.001, "betas": [0.9, 0.999]}},
        "model": {"tasks": {"fav": {"pos_weight": 1.0}}, "layers": [], "extra": {}},
        "stratifiers": [{"name": "country", "index": 0}, {"name": "lang", "index": 1}],
        "training": {"save_dir": "runs/x", "num_threads": None, "bf16": True, "steps": 100},
    }
    assert flatten_config(config) == {
        "optimizer.adam.lr": 0.001,
        "optimizer.adam.betas": "[0.9, 0.999]",
        "model.tasks.fav.pos_weight": 1.0,
        "model.layers": "[]",
        "model.extra": "{}",
        "stratifiers.0.name": "country",
        "stratifiers.0.index": 0,
        "stratifiers.1.name": "lang",
        "stratifiers.1.index": 1,
        "training.save_dir": "runs/x",
        "training.num_threads": None,
        "training.bf16": True,
        "training.steps": 100,
    }
    assert [format_value(v) for v in (None, True, False, 0.001, "[1, 2]")] == [
        "null",
        "true",
        "false",
        "0.001",
        "[1, 2]",
    ]


def test_flatten_config_takes_a_pydantic_config():
    class Inner(BaseConfig):
        lr: float = 0.1
        layers: list[int] = [4, 2]

    class Outer(BaseConfig):
        inner: Inner = Inner()
        name: str | None = None

    assert flatten_config(Outer()) == {"inner.lr": 0.1, "inner.layers": "[4, 2]", "name": None}


def _read(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(folder))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = content.get(metadata.SESSION_END_INFO_TAG)
    scalars = {tag: [(e.step, round(e.value, 5)) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return start, (metadata.parse_session_end_info_plugin_data(end) if end else None), scalars


def test_log_hparams_writes_session_record_and_final_metrics(tmp_path):
    from tensorboard.plugins.hparams import api_pb2

    config = {"optimizer": {"lr": 0.003, "layers": [8, 4]}, "training": {"bf16": False, "num_threads": None}}
    folder = log_hparams(str(tmp_path), config, {"train/loss": 0.25, "eval/valid/fav/auroc": 0.75}, step=40)
    assert folder == str(tmp_path / "tensorboard" / "hparams")
    start, end, scalars = _read(folder)
    assert start.hparams["optimizer.lr"].number_value == 0.003
    assert start.hparams["optimizer.layers"].string_value == "[8, 4]"
    assert (
        start.hparams["training.bf16"].HasField("bool_value")
        and not start.hparams["training.bf16"].bool_value
    )
    assert "training.num_threads" not in start.hparams
    assert end.status == api_pb2.STATUS_SUCCESS
    assert scalars == {"train/loss": [(40, 0.25)], "eval/valid/fav/auroc": [(40, 0.75)]}


def test_a_later_call_replaces_the_record(tmp_path):
    log_hparams(str(tmp_path), {"steps": 6}, {}, step=0, status="running")
    start, end, scalars = _read(tmp_path / "tensorboard" / "hparams")
    assert start.hparams["steps"].number_value == 6 and end is None and scalars == {}
    log_hparams(str(tmp_path), {"steps": 8}, {"train/loss": 0.5}, step=8)
    assert len(list((tmp_path / "tensorboard" / "hparams").iterdir())) == 1
    start, end, scalars = _read(tmp_path / "tensorboard" / "hparams")
    assert (
        start.hparams["steps"].number_value == 8 and end is not None and scalars == {"train/loss": [(8, 0.5)]}
    )
    with pytest.raises(ValueError, match="status must be one of running, success, failure, got 'done'"):
        log_hparams(str(tmp_path), {}, {}, step=0, status="done")


def test_hparams_dashboard_over_a_folder_of_runs(tmp_path):
    """What `tensorboard --logdir runs/` shows: one session per run folder, the union of the runs' config
    keys, and as metrics only the final metrics (not every per-step curve in <run>/tensorboard)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

    runs = tmp_path / "runs"
    for name, lr, extra in [("a", 0.001, {}), ("b", 0.003, {"new": {"flag": True}})]:
        metrics = MetricLogger(str(runs / name), console=False)
        metrics.log(10, {"train/loss": 0.6, "train/lr/dense": lr})
        metrics.log(20, {"train/loss": 0.5 + lr, "eval/valid/fav/auroc": 0.7 + lr})
        metrics.close()
        config = {"optimizer": {"lr": lr}, "training": {"save_dir": str(runs / name)}, **extra}
        log_hparams(str(runs / name), config, {"eval/valid/fav/auroc": 0.7 + lr}, step=20)

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(runs))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(runs))
    hparams = backend_context.Context(base_plugin.TBContext(logdir=str(runs), data_provider=provider))
    request = context.RequestContext()
    experiment = get_experiment.Handler(
        request, hparams, "", api_pb2.GetExperimentRequest(include_metrics=True)
    ).run()
    assert {h.name for h in experiment.hparam_infos} == {"optimizer.lr", "training.save_dir", "new.flag"}
    assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == [("", "eval/valid/fav/auroc")]
    groups = list_session_groups.Handler(
        request,
        hparams,
        "",
        api_pb2.ListSessionGroupsRequest(
            start_index=0, slice_size=10, include_metrics=True, allowed_statuses=[api_pb2.STATUS_SUCCESS]
        ),
    ).run()
    rows = {
        g.name: (g.hparams["optimizer.lr"].number_value, round(g.metric_values[0].value, 4))
        for g in groups.session_groups
    }
    assert rows == {"a/tensorboard/hparams": (0.001, 0.701), "b/tensorboard/hparams": (0.003, 0.703)}

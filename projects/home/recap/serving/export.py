"""`tml-recap export`: a checkpoint -> a self-contained artifact folder (serving/artifact.py).

One process, no process group: the model is built with its TorchRec tables on "meta", they are replaced by
plain `nn.EmbeddingBag`s (model/serving.py) and every tensor, sharded tables included, is read whole from
the checkpoint by DCP (which re-cuts the shards of a checkpoint written by any number of ranks). The
serving module is exported with `torch.export` (batch dimension and each feature's id count dynamic),
saved as `program.pt2`, checked against the eager module on a sample batch, and compiled with
AOTInductor into `compiled.pt2` when `--compile` allows and it works here.

Example:
    export_checkpoint(config, "runs/local", "artifacts/local", part=None, compile_mode="auto", overwrite=False)
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings

import torch

from tml.core.checkpoint import resolve_checkpoint
from tml.core.config.loader import save_config
from tml.core.errors import UserError
from tml.core.run import load_trained
from tml.ml_logging.log import get_logger
from tml.projects.home.recap.calibration import apply_calibration
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.model.serving import (
    dense_input_names,
    sparse_continuous_input_rows,
    sparse_input_rows,
    to_serving,
)
from tml.projects.home.recap.serving import artifact as fmt
from tml.projects.home.recap.serving.outputs import OutputExistsError
from tml.projects.home.recap.serving.schema import input_schema

logger = get_logger(__name__)


class ExportError(UserError, ValueError):
    """An export the inputs do not allow (a checkpoint of another model, an unknown part, ...)."""


COMPILE_MODES = ("auto", "aoti", "none")
SAMPLE_BATCH = 3  # >= 2: the batch dimension stays symbolic (a size of 1 would be specialised)


def _export_program(module: torch.nn.Module, inputs: dict) -> torch.export.ExportedProgram:
    import torch.fx.experimental._config as fx_config

    batch = torch.export.Dim("batch", min=1)
    dense = {d["name"]: {0: batch} for d in inputs["dense"]}
    sparse = [s["name"] for s in [*inputs["sparse"], *inputs.get("sparse_continuous", [])]]
    ids = {name: {0: torch.export.Dim(f"ids_{i}", min=0)} for i, name in enumerate(sparse)}
    offsets = {name: {0: batch + 1} for name in sparse}
    shapes = (dense, ids, offsets)
    if inputs.get("sparse_continuous"):  # each feature's values are as many as its ids
        shapes += ({c["name"]: ids[c["name"]] for c in inputs["sparse_continuous"]},)
    # Without this, tracing assumes sizes other than 0 and 1 and the program refuses a batch of one row.
    with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
        return torch.export.export(
            module,
            fmt.sample_inputs(inputs, SAMPLE_BATCH),
            dynamic_shapes=shapes,
            strict=False,
        )


def _compile(program, path: str, mode: str) -> tuple[str, str | None, float | None]:
    """(runtime, note, seconds) after trying AOTInductor (mode auto / aoti) or not (none)."""
    if mode == "none":
        return "exported_program", "not compiled (--compile none)", None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # torch's own pytree code, pickling the program's input spec, uses a deprecated check.
            warnings.filterwarnings(
                "ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning
            )
            torch._inductor.aoti_compile_and_package(program, package_path=path)
    except Exception as error:  # no C++ compiler, an op AOTInductor lacks, ...
        if mode == "aoti":
            raise RuntimeError(f"AOTInductor could not compile the program: {error}") from error
        logger.warning(
            "AOTInductor could not compile the program (%s); the artifact runs the exported program", error
        )
        return "exported_program", f"AOTInductor failed: {str(error).splitlines()[0][:300]}", None
    seconds = time.perf_counter() - start
    logger.info("AOTInductor compiled the program in %.1f s", seconds)
    return "aoti", None, seconds


def _prepare_output(output: str, overwrite: bool) -> None:
    if os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise OutputExistsError(
                f"--output {output!r} is not empty: choose a new folder or pass --overwrite"
            )
    elif os.path.exists(output) and not os.path.isdir(output):
        raise OutputExistsError(f"--output {output!r} is a file, expected a folder for the artifact")


def _check_groups(config: RecapConfig, groups: list[str] | None) -> None:
    if groups is None:
        return
    split = config.model.split_towers
    known = [] if split is None else list(split.groups)
    unknown = [g for g in groups if g not in known]
    if not groups or unknown or len(set(groups)) != len(groups) or "" in groups:
        have = f"model.split_towers.groups has {known}" if known else "the config has no model.split_towers"
        raise ExportError(f"--part {','.join(groups)!r}: expected distinct split-tower groups; {have}")


def export_checkpoint(
    config: RecapConfig,
    checkpoint: str | None,
    output: str,
    groups: list[str] | None = None,
    compile_mode: str = "auto",
    overwrite: bool = False,
) -> str:
    """Write the artifact of `checkpoint` (default: save_dir's latest) to the folder `output`.

    Args:
        config: the config the checkpoint was trained with.
        checkpoint: a step folder or a run folder (its latest complete checkpoint).
        output: artifact folder (refused when not empty, unless `overwrite`).
        groups: export only these split-tower groups (embeddings), None: the whole ranker.
        compile_mode: "auto" (AOTInductor, falling back to the exported program), "aoti" (must compile),
            "none" (the exported program only).
    """
    if compile_mode not in COMPILE_MODES:
        raise ExportError(f"--compile {compile_mode!r}: expected one of {COMPILE_MODES}")
    _check_groups(config, groups)
    path = resolve_checkpoint(checkpoint or config.training.save_dir)
    _prepare_output(output, overwrite)
    serving = build_serving(config, groups)
    with warnings.catch_warnings():
        # DCP warns that it loads in one process without a process group: that is the point here.
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        try:
            step = load_trained(serving, path, config)
        except ValueError as error:  # "checkpoint ... does not fit this model: <tensors>"
            raise ExportError(f"{error} (is --config the config this checkpoint was trained with?)") from None
    logger.info("loaded %s (step %d) into one process", path, step)
    source = {"path": os.path.abspath(path), "step": step}
    if groups is None:  # the ranker's heads take the checkpoint's isotonic map, when one was fitted
        source["calibration"] = apply_calibration(config, serving, path)
    return write_artifact(config, serving, output, source, compile_mode)


def build_serving(config: RecapConfig, groups: list[str] | None = None) -> torch.nn.Module:
    """The serving module of `config`'s model (tables uninitialised: load a checkpoint into it)."""
    from tml.projects.home.recap.build import build_train_module

    model = build_train_module(config, embedding_device="meta").model
    weights = config.ranking_weights()
    return to_serving(model, [weights[t] for t in config.model.tasks], groups)


def write_artifact(
    config: RecapConfig, serving: torch.nn.Module, output: str, source: dict, compile_mode: str = "auto"
) -> str:
    """Export `serving` (from `build_serving`, weights loaded) into the artifact folder `output`, replacing
    it; `source`: where the weights came from (artifact.json's `checkpoint`)."""
    model = serving.model
    groups = getattr(serving, "groups", None)
    tasks = list(config.model.tasks)
    inputs = input_schema(
        config.train_data,
        dense_input_names(model),
        sparse_input_rows(model),
        list(sparse_continuous_input_rows(model)),
    )
    tmp = f"{output.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        start = time.perf_counter()
        program = _export_program(serving, inputs)
        export_seconds = time.perf_counter() - start
        torch.export.save(program, os.path.join(tmp, fmt.PROGRAM))
        _check_program(serving, program, inputs)
        runtime, note, compile_seconds = _compile(program, os.path.join(tmp, fmt.COMPILED), compile_mode)
        outputs = (
            ["logits", "probabilities", "score"] if groups is None else [f"embedding/{g}" for g in groups]
        )
        meta = {
            "format": fmt.FORMAT,
            "version": fmt.VERSION,
            "kind": "ranker" if groups is None else "embeddings",
            "runtime": runtime,
            "runtime_note": note,
            "inputs": inputs,
            "outputs": outputs,
            "tasks": tasks,
            "ranking_weights": {t: config.ranking_weights()[t] for t in tasks} if groups is None else {},
            "heads": model.heads.describe(),
            "groups": groups,
            "embedding_widths": _embedding_widths(model, groups),
            "checkpoint": source,
            "torch_version": torch.__version__,
            "export_seconds": round(export_seconds, 2),
            "compile_seconds": None if compile_seconds is None else round(compile_seconds, 2),
        }
        with open(os.path.join(tmp, fmt.META), "w") as f:
            json.dump(meta, f, indent=1)
        save_config(config, os.path.join(tmp, "config.yaml"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written artifact left behind
        raise
    if os.path.exists(output):
        shutil.rmtree(output)
    os.rename(tmp, output)
    logger.info("artifact written to %s (runtime %s)", output, runtime)
    return output


def _embedding_widths(model, groups: list[str] | None) -> dict[str, int]:
    if groups is None:
        return {}
    sizes = {g.name: g.layer_sizes[-1] for g in model.split_towers.groups}
    return {f"embedding/{g}": sizes[g] for g in groups}


def _check_program(serving: torch.nn.Module, program, inputs: dict) -> None:
    # Catch a tracing mistake at export time, not in production: eager and exported must agree, at two
    # batch sizes (one of them 1, the size that tracing is most tempted to specialise).
    for batch in (1, 5):
        sample = fmt.sample_inputs(inputs, batch, seed=batch)
        with torch.no_grad():
            expected = serving(*sample)
            got = program.module()(*sample)
        for name, tensor in expected.items():
            torch.testing.assert_close(
                got[name], tensor, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"exported {n}: {m}"
            )

"""`predict`: stream Parquet in, write Parquet out: id columns, per-task probabilities, ranking score."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import torch

from tml.core.distributed import DistEnv
from tml.core.eval_loop import lockstep
from tml.ml_logging.log import get_logger
from tml.ml_logging.progress import progress_bar
from tml.projects.home.recap.build import unwrap
from tml.projects.home.recap.config import RecapConfig
from tml.projects.home.recap.model.serving import RankingScore
from tml.projects.home.recap.serving.outputs import output_table, prepare_output
from tml.reader.dataset import build_dataset

logger = get_logger(__name__)


def write_predictions(
    config: RecapConfig, module: torch.nn.Module, env: DistEnv, inputs: str, output: str, overwrite: bool
) -> str:
    """Score every row of `inputs` (this rank's share) into `<output>/part-<rank>.parquet`; returns the path.

    Columns (serving/outputs.py, the same as `tml-recap score` writes): the config's `train_data.id_columns`,
    `p/<task>` (calibrated probability) per task, and `score` = sum_i w_i * p_i with
    `prediction.ranking_weights` (the serving module's RankingScore). Labels are not needed in the input. Ranks stay in
    step (`lockstep`): one whose share ends first runs dummy forwards, so sharded tables never hang. An
    output folder that already holds part files is refused unless `overwrite`.
    """
    data = config.train_data.model_copy(
        update={"inputs": inputs, "global_batch_size": config.prediction.batch_size * env.world_size}
    )
    dataset = build_dataset(data, [], env.rank, env.world_size, num_epochs=1, shuffle=False)
    if env.is_main:
        prepare_output(output, overwrite)
    torch.distributed.barrier()
    model = unwrap(module).model  # labels are not needed, so the model without its loss
    model.eval()
    tasks = list(config.model.tasks)
    ranking_score = RankingScore([config.ranking_weights()[t] for t in tasks]).to(env.device)
    path = os.path.join(output, f"part-{env.rank:05d}.parquet")
    writer, rows = None, 0
    bar = progress_bar(None, "predict", env.rank)
    with torch.no_grad():
        for batch, real in lockstep(dataset, env):
            probabilities = model(batch)["probabilities"].float()
            if not real:
                continue
            outputs = {"probabilities": probabilities, "score": ranking_score(probabilities)}
            table = output_table(batch.ids, outputs, tasks)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            bar.update(table.num_rows)
    bar.close()
    if writer is not None:
        writer.close()
    logger.info("wrote %d predictions to %s", rows, path)
    return path


def predict_checkpoint(
    config: RecapConfig, checkpoint: str | None, inputs: str, output: str, overwrite: bool
) -> str:
    """`tml-recap predict`: load `checkpoint` (default: save_dir's latest) and score `inputs` into `output`."""
    from tml.core.checkpoint import resolve_checkpoint
    from tml.projects.home.recap.build import build_for_inference
    from tml.projects.home.recap.calibration import apply_calibration

    checkpoint = resolve_checkpoint(checkpoint or config.training.save_dir)
    env, sharded, _ = build_for_inference(config, checkpoint)
    apply_calibration(config, sharded.module, checkpoint)  # the checkpoint's isotonic map, if fitted
    return write_predictions(config, sharded.module, env, inputs, output, overwrite)

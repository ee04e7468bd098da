"""`predict`: stream Parquet in, write Parquet out: id columns, per-task probabilities, ranking score."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tml.core.distributed import DistEnv
from tml.ml_logging.log import get_logger
from tml.ml_logging.progress import progress_bar
from tml.projects.home.recap.build import unwrap
from tml.projects.home.recap.config import RecapConfig
from tml.reader.dataset import build_dataset

logger = get_logger(__name__)


def write_predictions(
    config: RecapConfig, module: torch.nn.Module, env: DistEnv, inputs: str, output: str
) -> str:
    """Score every row of `inputs` (this rank's share) into `<output>/part-<rank>.parquet`; returns the path.

    Columns: the config's `train_data.id_columns`, `p/<task>` (calibrated probability) per task, and `score`
    = sum_i w_i * p_i with `prediction.ranking_weights`. Labels are not needed in the input.
    """
    data = config.train_data.model_copy(
        update={"inputs": inputs, "global_batch_size": config.prediction.batch_size * env.world_size}
    )
    dataset = build_dataset(data, [], env.rank, env.world_size, num_epochs=1, shuffle=False)
    model = unwrap(module).model
    model.eval()
    tasks = list(config.model.tasks)
    weights = torch.tensor([config.ranking_weights()[t] for t in tasks], dtype=torch.float32)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, f"part-{env.rank:05d}.parquet")
    writer, rows = None, 0
    bar = progress_bar(None, "predict", env.rank)
    with torch.no_grad():
        for batch in dataset:
            probabilities = model(batch.to(env.device))["probabilities"].float().cpu()
            columns = {name: pa.array(ids.cpu().numpy()) for name, ids in batch.ids.items()}
            for i, task in enumerate(tasks):
                columns[f"p/{task}"] = pa.array(probabilities[:, i].numpy())
            columns["score"] = pa.array((probabilities * weights).sum(dim=1).numpy())
            table = pa.table(columns)
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

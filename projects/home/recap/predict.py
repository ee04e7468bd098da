"""`predict`: stream Parquet in, write Parquet out: id columns, per-task probabilities, ranking score."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tml.core.distributed import DistEnv
from tml.core.eval_loop import lockstep
from tml.ml_logging.log import get_logger
from tml.ml_logging.progress import progress_bar
from tml.projects.home.recap.build import unwrap
from tml.projects.home.recap.config import RecapConfig
from tml.reader.dataset import build_dataset

logger = get_logger(__name__)


def write_predictions(
    config: RecapConfig, module: torch.nn.Module, env: DistEnv, inputs: str, output: str, overwrite: bool
) -> str:
    """Score every row of `inputs` (this rank's share) into `<output>/part-<rank>.parquet`; returns the path.

    Columns: the config's `train_data.id_columns`, `p/<task>` (calibrated probability) per task, and `score`
    = sum_i w_i * p_i with `prediction.ranking_weights`. Labels are not needed in the input. Ranks stay in
    step (`lockstep`): one whose share ends first runs dummy forwards, so sharded tables never hang. An
    output folder that already holds part files is refused unless `overwrite`.
    """
    data = config.train_data.model_copy(
        update={"inputs": inputs, "global_batch_size": config.prediction.batch_size * env.world_size}
    )
    dataset = build_dataset(data, [], env.rank, env.world_size, num_epochs=1, shuffle=False)
    if env.is_main:
        _prepare_output(output, overwrite)
    torch.distributed.barrier()
    model = unwrap(module).model  # labels are not needed, so the model without its loss
    model.eval()
    tasks = list(config.model.tasks)
    weights = torch.tensor([config.ranking_weights()[t] for t in tasks], dtype=torch.float32)
    path = os.path.join(output, f"part-{env.rank:05d}.parquet")
    writer, rows = None, 0
    bar = progress_bar(None, "predict", env.rank)
    with torch.no_grad():
        for batch, real in lockstep(dataset, env):
            probabilities = model(batch)["probabilities"].float().cpu()
            if not real:
                continue
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


def _prepare_output(output: str, overwrite: bool) -> None:
    os.makedirs(output, exist_ok=True)
    parts = sorted(name for name in os.listdir(output) if name.startswith("part-"))
    if parts and not overwrite:
        raise FileExistsError(
            f"--output {output!r} already holds {len(parts)} part file(s) ({parts[0]}, ...): another "
            "run's predictions would mix with this one's; choose an empty folder or pass --overwrite"
        )
    for name in parts:
        os.remove(os.path.join(output, name))


def predict_checkpoint(
    config: RecapConfig, checkpoint: str | None, inputs: str, output: str, overwrite: bool
) -> str:
    """`tml-recap predict`: load `checkpoint` (default: save_dir's latest) and score `inputs` into `output`."""
    from tml.projects.home.recap.build import build_for_inference

    env, sharded, _ = build_for_inference(config, checkpoint)
    return write_predictions(config, sharded.module, env, inputs, output, overwrite)

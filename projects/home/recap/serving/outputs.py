"""What `predict` and `score` write: the same Parquet columns from either, and the same output-folder rule.

Columns: the id columns (as decoded), `p/<task>` per task and `score` for a ranker; `embedding/<group>`
(fixed-size lists of float32) for split-tower embeddings.

Example:
    prepare_output("preds/", overwrite=False)   # FileExistsError when part files are there already
    table = output_table(batch_ids, {"probabilities": p, "score": s}, tasks)
"""

from __future__ import annotations

import os

import pyarrow as pa
import torch

from tml.core.errors import UserError


class OutputExistsError(UserError, FileExistsError):
    """--output holds another run's files."""


def prepare_output(output: str, overwrite: bool) -> None:
    """Create `output`; refuse one that holds part files unless `overwrite` (then remove them)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise OutputExistsError(f"--output {output!r} is a file, expected a folder")
    os.makedirs(output, exist_ok=True)
    parts = sorted(name for name in os.listdir(output) if name.startswith("part-"))
    if parts and not overwrite:
        raise OutputExistsError(
            f"--output {output!r} already holds {len(parts)} part file(s) ({parts[0]}, ...): another "
            "run's predictions would mix with this one's; choose an empty folder or pass --overwrite"
        )
    for name in parts:
        os.remove(os.path.join(output, name))


def output_table(
    ids: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], tasks: list[str]
) -> pa.Table:
    """One batch's output rows: ids, then `p/<task>` and `score`, or the `embedding/<group>` columns."""
    columns = {name: pa.array(values.cpu().numpy()) for name, values in ids.items()}
    if "probabilities" in outputs:
        probabilities = outputs["probabilities"].float().cpu()
        for i, task in enumerate(tasks):
            columns[f"p/{task}"] = pa.array(probabilities[:, i].numpy())
        columns["score"] = pa.array(outputs["score"].float().cpu().numpy())
    for name, tensor in outputs.items():
        if name.startswith("embedding/"):
            flat = pa.array(tensor.float().cpu().reshape(-1).numpy())
            columns[name] = pa.FixedSizeListArray.from_arrays(flat, tensor.shape[1])
    return pa.table(columns)

"""`tml-recap score`: offline batch scoring of Parquet with an artifact (no training stack, one process).

Every file's rows go through the reader's ranking decoder (the artifact's schema, id columns passed
through) in batches of `--batch-size`, then through the artifact; the output is `<output>/part-00000.parquet`
with the columns `predict` writes (serving/outputs.py), in input order.

Example:
    score_files("artifacts/local", "data/local/valid/*.parquet", "scores/", batch_size=4096)
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from tml.ml_logging.log import get_logger
from tml.projects.home.recap.serving.artifact import load_artifact
from tml.projects.home.recap.serving.outputs import output_table, prepare_output
from tml.projects.home.recap.serving.schema import check_schema, decode_plan, decode_rows, program_inputs
from tml.reader.fs import list_inputs, open_input

logger = get_logger(__name__)


def score_files(
    artifact_path: str,
    inputs: str,
    output: str,
    overwrite: bool = False,
    batch_size: int = 4096,
    runtime: str = "auto",
) -> str:
    """Score every row of `inputs` (glob, folder, file or fsspec URL) into `<output>/part-00000.parquet`."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    artifact = load_artifact(artifact_path, runtime)
    try:
        fs, files = list_inputs(inputs)
    except FileNotFoundError as error:  # the reader names its own key, `inputs`
        raise FileNotFoundError(f"--input: {error}") from None
    prepare_output(output, overwrite)
    plan = decode_plan(artifact.meta["inputs"], with_ids=True)
    path = os.path.join(output, "part-00000.parquet")
    writer, rows = None, 0
    try:
        for file in files:
            with open_input(fs, file) as source:
                parquet = pq.ParquetFile(source)
                check_schema(parquet.schema_arrow, file, plan)  # a missing column, named before reading
                batches = parquet.iter_batches(batch_size=batch_size, columns=plan.columns())
                for i, batch in enumerate(batches):
                    chunk = decode_rows(pa.Table.from_batches([batch]), f"{file} (batch {i})", plan)
                    outputs = artifact(*program_inputs(chunk, plan))
                    ids = {name: chunk.tensors[("ids", name)] for name in plan.id_columns}
                    out = output_table(ids, outputs, artifact.tasks)
                    if writer is None:
                        writer = pq.ParquetWriter(path, out.schema)
                    writer.write_table(out)
                    rows += out.num_rows
    finally:
        if writer is not None:
            writer.close()
    logger.info("scored %d rows of %d file(s) into %s (runtime %s)", rows, len(files), path, artifact.runtime)
    return path

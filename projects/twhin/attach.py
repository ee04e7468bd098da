"""`tml-twhin attach`: add an export's vectors to other Parquet data (e.g. recap's) as a new column.

For every input file, row group by row group, the id column is looked up in one table of the export and
the vector is appended as `fixed_size_list<float32>[D]` named `--name` (what recap's `seg_dense_schema`
feature of length D and `model.dense_embeddings` read). Integer ids are table rows; string ids are keys
of the export's vocabulary. Ids the export does not know (outside [0, rows), an unknown key, null) get a
zero vector and are counted. Each output file keeps its input's name (relative to the inputs' common
folder) and row groups.

Example:
    stats = attach("exports/local", "user", "data/recap/*.parquet", "meta.user_id", "user_twhin", "out/")
    stats  # {"files": 2, "rows": 20000, "unknown": 31}
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tml.core.errors import UserError
from tml.ml_logging.log import get_logger
from tml.projects.twhin.data.vocab import is_string
from tml.projects.twhin.embeddings import load, vector_array
from tml.reader.fs import filesystem_for, list_inputs, open_input

logger = get_logger(__name__)


def _ids(column: pa.Array, embeddings, table: str, where: str) -> np.ndarray:
    """Rows [n] of the id column's values, -1 where the export has none."""
    rows = embeddings.tables[table]["num_embeddings"]
    if is_string(column.type):
        found = embeddings.ids_of(table, column.fill_null("")).numpy()
        return np.where(column.is_valid().to_numpy(zero_copy_only=False), found, -1)
    if not pa.types.is_integer(column.type):
        raise UserError(f"{where}: the id column is {column.type}, expected integer ids or string keys")
    ids = column.fill_null(-1).to_numpy(zero_copy_only=False)
    # Compared before the cast, so a uint64 past int64 cannot wrap into the table.
    return np.where((ids >= 0) & (ids < rows), ids, -1).astype(np.int64)


def attach(
    export: str, table: str, inputs: str, id_column: str, name: str, output: str, overwrite: bool = False
) -> dict[str, int]:
    """Write every file of `inputs` with the column `name` added under `output` (module docstring)."""
    embeddings = load(export)
    vectors = embeddings.vectors(table).numpy()
    dim = vectors.shape[1]
    fs, paths = list_inputs(inputs)
    root = posixpath.commonpath([posixpath.dirname(p) for p in paths])
    out_fs, out_root = filesystem_for(output)
    targets = [posixpath.join(out_root, p[len(root) :].lstrip("/")) for p in paths]
    existing = [t for t in targets if out_fs.exists(t)]
    if existing and not overwrite:
        raise UserError(
            f"--output {output!r} already holds {len(existing)} of the files to write ({existing[0]}): "
            "choose another folder or pass --overwrite"
        )
    stats = {"files": 0, "rows": 0, "unknown": 0}
    zeros = np.zeros((1, dim), dtype=np.float32)
    padded = np.concatenate([vectors, zeros])  # row -1 picks the zero vector
    for path, target in zip(paths, targets, strict=True):
        with open_input(fs, path) as source:
            parquet = pq.ParquetFile(source)
            schema = parquet.schema_arrow
            if id_column not in schema.names:
                raise UserError(f"{path}: no column {id_column!r} (--id-column); columns: {schema.names}")
            if name in schema.names:
                raise UserError(f"{path}: already has a column {name!r} (--name): choose another name")
            out_schema = schema.append(pa.field(name, pa.list_(pa.float32(), dim)))
            out_fs.makedirs(posixpath.dirname(target), exist_ok=True)
            with out_fs.open(target, "wb") as sink, pq.ParquetWriter(sink, out_schema) as writer:
                for group in range(parquet.num_row_groups):
                    data = parquet.read_row_group(group)
                    where = f"{path} (row group {group}) column {id_column!r}"
                    rows = _ids(data.column(id_column).combine_chunks(), embeddings, table, where)
                    unknown = int((rows < 0).sum())
                    column = vector_array(padded[rows])
                    writer.write_table(data.append_column(pa.field(name, column.type), column))
                    stats["rows"] += data.num_rows
                    stats["unknown"] += unknown
        stats["files"] += 1
    logger.info("attach: %s", stats)
    return stats

"""`tml-twhin export`: every table's vectors as Parquet, read rank-parallel from a checkpoint.

Layout of the output folder (what `tml.projects.twhin.embeddings.load` reads):

    OUT/manifest.json            format, step, comparator, tables (rows, dim, data type, keys?), relations
                                 (operator and learned vector), written last: a folder without it is
                                 incomplete
    OUT/<table>/part-RRRRR.parquet   one per rank: `type` (string), `id` (int64), `key` (string, only with a
                                 vocabulary; null for rows past it), `vector` (fixed_size_list<float32>[D])

Each rank writes the rows of its slice of each table (tml.projects.twhin.tables), one row group per chunk,
so no rank holds more than a chunk of any table, whatever the table's size and sharding.

Example:
    write_export(config, sharded.module, env, step, "exports/local", overwrite=False)
"""

from __future__ import annotations

import json
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from tml.core.distributed import DistEnv
from tml.core.errors import UserError
from tml.ml_logging.log import get_logger
from tml.projects.twhin import build
from tml.projects.twhin.config import TwhinConfig
from tml.projects.twhin.embeddings import FORMAT, vector_array, vector_type
from tml.projects.twhin.tables import table_chunks
from tml.reader.fs import filesystem_for

logger = get_logger(__name__)
MANIFEST = "manifest.json"
CHUNK_ROWS = 65536


def _prepare(output: str, tables: list[str], overwrite: bool) -> None:
    fs, root = filesystem_for(output)
    existing = [
        p
        for p in [posixpath.join(root, MANIFEST), *(posixpath.join(root, t) for t in tables)]
        if fs.exists(p)
    ]
    if existing and not overwrite:
        raise UserError(
            f"--output {output!r} already holds an export ({posixpath.basename(existing[0])}, ...): choose "
            "an empty folder or pass --overwrite"
        )
    for path in existing:
        fs.rm(path, recursive=True)
    for table in tables:
        fs.makedirs(posixpath.join(root, table), exist_ok=True)


def write_export(
    config: TwhinConfig, module: torch.nn.Module, env: DistEnv, step: int, output: str, overwrite: bool
) -> dict:
    """Write `output` (see the module docstring); returns the manifest."""
    model = build.unwrap(module).model
    tables = config.model.embeddings.tables
    if env.is_main:
        _prepare(output, [t.name for t in tables], overwrite)
    if env.world_size > 1:
        dist.barrier()
    vocabularies = build.build_vocabularies(config)
    fs, root = filesystem_for(output)
    dim = config.embedding_dim
    module.eval()
    with torch.no_grad():
        for index, table in enumerate(tables):
            keys = vocabularies[table.name].keys if vocabularies else None
            fields = [("type", pa.string()), ("id", pa.int64())]
            fields += [("key", pa.large_string())] if keys is not None else []
            schema = pa.schema([*fields, ("vector", vector_type(dim))])
            path = posixpath.join(root, table.name, f"part-{env.rank:05d}.parquet")
            written = 0
            with fs.open(path, "wb") as sink, pq.ParquetWriter(sink, schema) as writer:
                for first, vectors in table_chunks(model, index, table.num_embeddings, env, CHUNK_ROWS):
                    ids = np.arange(first, first + len(vectors), dtype=np.int64)
                    columns = [pa.array([table.name] * len(ids), pa.string()), pa.array(ids)]
                    if keys is not None:
                        known = ids < len(keys)
                        taken = keys.take(pa.array(np.where(known, ids, 0)))
                        columns.append(_with_nulls(known, taken))
                    columns.append(vector_array(vectors.cpu().numpy()))
                    writer.write_table(pa.Table.from_arrays(columns, schema=schema))
                    written += len(ids)
            logger.info("table %s: rows %d written by rank %d to %s", table.name, written, env.rank, path)
    manifest = {
        "format": FORMAT,
        "version": 1,
        "step": step,
        "comparator": config.model.comparator,
        "tables": [
            {
                "name": t.name,
                "num_embeddings": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
                "data_type": t.data_type,
                "keys": vocabularies is not None,
            }
            for t in tables
        ],
        "relations": _relations(config, model),
    }
    if env.world_size > 1:
        dist.barrier()
    if env.is_main:
        with fs.open(posixpath.join(root, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _with_nulls(known: np.ndarray, taken: pa.Array) -> pa.Array:
    """`taken` with nulls where `known` is False (rows past the vocabulary have no key)."""
    return pc.if_else(pa.array(known), taken, pa.scalar(None, taken.type))


def _relations(config: TwhinConfig, model) -> list[dict]:
    ops = model.relations
    out = []
    for index, relation in enumerate(config.model.relations):
        vector = None
        if ops.vectors is not None and relation.operator != "none":
            vector = ops.vectors[int(ops.row[index])].detach().float().cpu().tolist()
        out.append(
            {
                "name": relation.name,
                "lhs": relation.lhs,
                "rhs": relation.rhs,
                "operator": relation.operator,
                "vector": vector,
            }
        )
    return out

"""How tml writes Parquet it will train from: the same values, laid out to decode fast.

Decoding is most of the reader's CPU, and on a small CPU box the reader shares the cores with training
(benchmarks/RESULTS.md, "Parquet layout"). Three writer choices make it cheaper without changing a value:
- LZ4 instead of pyarrow's default Snappy: it decompresses faster, at about the same size;
- dictionary encoding only for columns that are not floating point: float features rarely repeat, so
  their dictionaries overflow and the writer falls back to plain pages after paying for both;
- `with_nullable(schema, False)` for data that has no nulls (the synthetic generator's): a non-nullable column,
  or list element, has no definition levels to decode.
Files written so are ordinary Parquet; any reader reads them.

Example:
    schema = with_nullable(table.schema, False)
    with parquet_writer("part-00000.parquet", schema) as writer:
        writer.write_table(table.cast(schema))
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tml.reader.arrow_types import is_list

COMPRESSION = "lz4"


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet column paths (`name`, `name.list.element`, ...) of every leaf that does not hold floats.

    The paths are pyarrow's own: read back from an empty file of `schema`.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    leaves = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    return [
        leaves.column(i).path
        for i in range(len(leaves))
        if leaves.column(i).physical_type not in ("FLOAT", "DOUBLE")
    ]


def _with_nullable(dtype: pa.DataType, nullable: bool) -> pa.DataType:
    if pa.types.is_map(dtype):
        item = dtype.item_field
        return pa.map_(
            dtype.key_field, item.with_type(_with_nullable(item.type, nullable)).with_nullable(nullable)
        )
    if is_list(dtype):
        value = dtype.value_field
        value = value.with_type(_with_nullable(value.type, nullable)).with_nullable(nullable)
        if pa.types.is_fixed_size_list(dtype):
            return pa.list_(value, dtype.list_size)
        return pa.large_list(value) if pa.types.is_large_list(dtype) else pa.list_(value)
    return dtype


def with_nullable(schema: pa.Schema, nullable: bool) -> pa.Schema:
    """`schema` with every field, list element and map value (non-)nullable: map keys stay non-nullable, and
    casting data with nulls to a non-nullable schema fails."""
    return pa.schema(
        [field.with_type(_with_nullable(field.type, nullable)).with_nullable(nullable) for field in schema],
        metadata=schema.metadata,
    )


def parquet_writer(where: Any, schema: pa.Schema) -> pq.ParquetWriter:
    """A ParquetWriter of `schema` to a path or binary file object, with the layout described above."""
    return pq.ParquetWriter(where, schema, compression=COMPRESSION, use_dictionary=dictionary_columns(schema))

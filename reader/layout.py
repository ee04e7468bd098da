"""How tml writes Parquet it will train from: the same values, laid out to decode fast.

Decoding is most of the reader's CPU, and on a small CPU box the reader shares the cores with training
(benchmarks/RESULTS.md, "Parquet layout"). Four writer choices make it cheaper without changing a value:
- LZ4 (it decompresses faster than pyarrow's default Snappy, at about the same size), and only for the columns
  it at least halves, judged on the first table written (`column_compression`): integer features and ids
  shrink 2-12x, floats rarely by 15%, and decompressing those cost the reader more than decoding the rest of
  the row group (local.yaml: 4.4 ms per row group all LZ4, 2.5 ms so, 1.3 ms uncompressed);
- dictionary encoding only for columns that are not floating point or packed vectors: float features rarely
  repeat, so their dictionaries overflow and the writer falls back to plain pages after paying for both;
- `with_nullable(schema, False)` for data that has no nulls (the synthetic generator's): a non-nullable column,
  or list element, has no definition levels to decode;
- fixed-size lists of non-nullable numbers packed, one `fixed_size_binary` value per row (tml.reader.vectors),
  unless `vectors="list"`: pyarrow decodes prod.yaml's packed files 2.6-3.8x as fast.
Files written so are Parquet that any reader reads; packed vectors read as bytes outside tml (`vectors="list"`,
or `tml-pq rewrite --vectors list`, writes lists).

Example:
    schema = with_nullable(table.schema, False)
    with parquet_writer("part-00000.parquet", schema) as writer:   # the schema as the data has it
        writer.write_table(table)                                   # cast to it and packed here
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from tml.reader.arrow_types import is_list
from tml.reader.vectors import VECTOR_KEY, logical_schema, pack_table, packed_schema, unpack_table

COMPRESSION = "lz4"
MAX_RATIO = 0.5  # a column is compressed when COMPRESSION stores it in at most this share of its size
SAMPLE_BYTES = 8 << 20  # of the first table, what `column_compression` measures
Vectors = Literal["binary", "list"]
VECTORS: tuple[str, ...] = get_args(Vectors)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The Parquet column paths (`name`, `name.list.element`, ...) of every leaf that holds neither floats nor
    packed vectors.

    The paths are pyarrow's own: read back from an empty file of `schema`.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    leaves = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    packed = {field.name for field in schema if VECTOR_KEY in (field.metadata or {})}
    return [
        leaves.column(i).path
        for i in range(len(leaves))
        if leaves.column(i).physical_type not in ("FLOAT", "DOUBLE") and leaves.column(i).path not in packed
    ]


def column_compression(sample: pa.Table, use_dictionary: list[str]) -> dict[str, str]:
    """Per Parquet leaf path of `sample`: COMPRESSION where it stores the leaf's pages in at most MAX_RATIO of
    their size, "none" elsewhere (measured by writing `sample`, with these dictionary columns, in memory)."""
    sink = pa.BufferOutputStream()
    pq.write_table(sample, sink, compression=COMPRESSION, use_dictionary=use_dictionary)
    parquet = pq.ParquetFile(pa.BufferReader(sink.getvalue()))
    sizes = {parquet.schema.column(i).path: [0, 0] for i in range(len(parquet.schema))}
    for group in range(parquet.metadata.num_row_groups):
        row_group = parquet.metadata.row_group(group)
        for index in range(row_group.num_columns):
            column = row_group.column(index)
            sizes[column.path_in_schema][0] += column.total_compressed_size
            sizes[column.path_in_schema][1] += column.total_uncompressed_size
    return {
        path: COMPRESSION if stored <= MAX_RATIO * plain else "none"
        for path, (stored, plain) in sizes.items()
    }


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


def storage_schema(schema: pa.Schema, vectors: Vectors = "binary") -> pa.Schema:
    """The schema a file of `schema`'s data is written with: `packable` fields packed for `vectors="binary"`,
    packed fields unpacked for `"list"`."""
    if vectors not in VECTORS:
        raise ValueError(f"vectors is {vectors!r}, expected one of {list(VECTORS)}")
    schema = logical_schema(schema)
    return schema if vectors == "list" else packed_schema(schema)


class LayoutWriter:
    """Writes tables of one schema in the layout described above (see `parquet_writer`)."""

    def __init__(self, where: Any, schema: pa.Schema, vectors: Vectors) -> None:
        self.schema = logical_schema(schema)
        self.storage = storage_schema(schema, vectors)
        self._packed = vectors == "binary"
        self._where = where
        self._dictionary = dictionary_columns(self.storage)
        self._writer: pq.ParquetWriter | None = None  # opened by the first table: its columns set compression

    def _open(self, first: pa.Table) -> pq.ParquetWriter:
        rows = max(1, SAMPLE_BYTES * first.num_rows // max(first.nbytes, 1))
        compression = column_compression(first.slice(0, rows), self._dictionary)
        return pq.ParquetWriter(
            self._where, self.storage, compression=compression, use_dictionary=self._dictionary
        )

    def write_table(self, table: pa.Table, row_group_size: int | None = None) -> None:
        """Write `table` (vectors packed or not), cast to the writer's schema; a null where the schema has
        none raises ValueError."""
        table = unpack_table(table).cast(self.schema)
        table = pack_table(table) if self._packed else table
        if self._writer is None:
            self._writer = self._open(table)
        self._writer.write_table(table, row_group_size=row_group_size)

    def close(self) -> None:
        if self._writer is None:  # nothing written: a file of no rows
            self._writer = self._open(self.storage.empty_table())
        self._writer.close()

    def __enter__(self) -> LayoutWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def parquet_writer(where: Any, schema: pa.Schema, vectors: Vectors = "binary") -> LayoutWriter:
    """A writer of tables of `schema` to a path or binary file object, in the layout described above.

    Args:
        where: a path or a binary file object.
        schema: the data's schema (packed vectors read as lists); nullability is what the file gets.
        vectors: "binary" to pack fixed-size lists of non-nullable numbers, "list" to write them as lists.
    """
    return LayoutWriter(where, schema, vectors)

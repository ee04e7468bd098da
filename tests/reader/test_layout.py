"""tml.reader.layout: the same values, LZ4 where it halves a column, dictionaries only off floats,
non-nullable where asked, vectors packed unless asked for lists."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.reader.layout import (
    column_compression,
    dictionary_columns,
    parquet_writer,
    storage_schema,
    with_nullable,
)
from tml.reader.vectors import VECTOR_KEY, pack, pack_table, unpack_table


def _table() -> pa.Table:
    return pa.table(
        {
            "dense": pa.array([[0.5, 1.5], [2.5, 3.5]], type=pa.list_(pa.float32(), 2)),
            "tags": pa.array([[1, 2], []], type=pa.list_(pa.int64())),
            "counts": pa.array([[(3, 0.25)], [(4, 1.0), (5, 2.0)]], type=pa.map_(pa.int64(), pa.float32())),
            "label": pa.array([0, 1]),
            "score": pa.array([0.1, 0.2]),
            "name": pa.array(["a", "b"]),
        }
    )


def test_dictionary_columns_are_pyarrows_paths_of_the_leaves_that_are_not_floats():
    assert dictionary_columns(_table().schema) == [
        "tags.list.element",
        "counts.key_value.key",
        "label",
        "name",
    ]


def test_written_files_hold_the_same_values_non_nullable_and_float_leaves_without_dictionaries(tmp_path):
    table = _table()
    schema = with_nullable(table.schema, False)
    path = tmp_path / "a.parquet"
    with parquet_writer(str(path), schema) as writer:
        writer.write_table(table)
        writer.write_table(table.slice(1))  # a slice: its vectors start past the first row's
    raw = pq.read_table(path)
    assert raw.schema.field("dense").type == pa.binary(8)  # packed: 2 floats of 4 bytes
    assert raw.schema.field("dense").metadata == {VECTOR_KEY: b"float"}
    back = unpack_table(raw)
    assert back.to_pylist() == table.to_pylist() + table.slice(1).to_pylist()
    assert back.schema == schema
    assert not any(field.nullable for field in back.schema)
    assert not back.schema.field("counts").type.item_field.nullable
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    # Two rows: LZ4 would only add its frame to every leaf.
    assert {column.compression for column in columns.values()} == {"UNCOMPRESSED"}
    dictionary = {path for path, column in columns.items() if "RLE_DICTIONARY" in column.encodings}
    assert dictionary == {"tags.list.element", "counts.key_value.key", "label", "name"}


def test_vectors_list_writes_lists_and_unpacks_packed_input(tmp_path):
    table = _table()
    schema = with_nullable(table.schema, False)
    with parquet_writer(str(tmp_path / "packed.parquet"), schema) as writer:
        writer.write_table(table)
    packed = pq.read_table(tmp_path / "packed.parquet")
    with parquet_writer(str(tmp_path / "lists.parquet"), packed.schema, vectors="list") as writer:
        writer.write_table(packed)
    lists = pq.read_table(tmp_path / "lists.parquet")
    assert lists.schema == schema and lists.to_pylist() == table.to_pylist()
    with pytest.raises(ValueError, match="vectors is 'bytes', expected one of"):
        storage_schema(schema, "bytes")


def test_only_fixed_size_lists_of_non_nullable_numbers_are_packed():
    schema = pa.schema(
        {
            "floats": pa.list_(pa.field("item", pa.float64(), nullable=False), 3),
            "ints": pa.list_(pa.field("item", pa.int8(), nullable=False), 3),
            "nullable_items": pa.list_(pa.float32(), 3),
            "bools": pa.list_(pa.field("item", pa.bool_(), nullable=False), 3),
            "variable": pa.list_(pa.field("item", pa.float32(), nullable=False)),
        }
    )
    stored = storage_schema(schema)
    assert [stored.field(name).type for name in ("floats", "ints")] == [pa.binary(24), pa.binary(3)]
    assert [stored.field(name).metadata[VECTOR_KEY] for name in ("floats", "ints")] == [b"double", b"int8"]
    for name in ("nullable_items", "bools", "variable"):
        assert stored.field(name) == schema.field(name) and not stored.field(name).metadata


def test_packing_keeps_null_vectors_and_slices_and_refuses_null_elements():
    dtype = pa.list_(pa.field("item", pa.float32(), nullable=False), 2)
    table = pa.table({"dense": pa.array([[1.0, 2.0], None, [3.0, 4.0]], dtype)})
    for part in (table, table.slice(1)):
        packed = pack_table(part)
        assert packed.schema.field("dense").type == pa.binary(8)
        assert unpack_table(packed).equals(part)
    with pytest.raises(ValueError, match="column 'dense' has 1 null elements in its vectors"):
        pack(pa.array([[1.0, None], None], pa.list_(pa.float32(), 2)), table.schema.field("dense"))


def test_writing_a_null_element_where_the_schema_has_none_fails(tmp_path):
    dtype = pa.list_(pa.field("item", pa.float32(), nullable=False), 2)
    with (
        pytest.raises(ValueError, match="null"),
        parquet_writer(str(tmp_path / "a.parquet"), pa.schema([pa.field("dense", dtype)])) as writer,
    ):
        writer.write_table(pa.table({"dense": pa.array([[1.0, None]], pa.list_(pa.float32(), 2))}))


@pytest.mark.parametrize(
    "column", [pa.array([1, None]), pa.array([[1, None], [2]])], ids=["value", "element"]
)
def test_nulls_never_reach_a_non_nullable_file(tmp_path, column):
    table = pa.table({"label": column})
    schema = with_nullable(table.schema, False)
    with (
        pytest.raises(ValueError, match="null"),
        parquet_writer(str(tmp_path / "a.parquet"), schema) as writer,
    ):
        writer.write_table(table)  # a top-level null fails the cast, a nested one the write


def test_with_nullable_true_undoes_false_at_every_level():
    schema = _table().schema
    strict = with_nullable(schema, False)
    assert with_nullable(strict, True) == schema
    assert (
        not strict.field("counts").type.item_field.nullable
        and strict.field("counts").type.key_field.nullable is False
    )


def test_lz4_only_for_the_columns_it_at_least_halves_judged_on_the_first_table(tmp_path):
    rng = np.random.default_rng(0)
    n = 4096
    table = pa.table(
        {
            "noise": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * 8, dtype=np.float32)), 8),
            "flags": pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 2, n * 8)), 8),
            "score": pa.array(rng.random(n)),
            "zeros": pa.array(np.zeros(n, dtype=np.float32)),
        }
    )
    schema = with_nullable(table.schema, False)
    path = tmp_path / "a.parquet"
    with parquet_writer(str(path), schema) as writer:
        writer.write_table(table)
        writer.write_table(table.slice(0, 10))
    metadata = pq.ParquetFile(path).metadata
    assert metadata.num_row_groups == 2
    for group in range(2):
        row_group = metadata.row_group(group)
        written = {row_group.column(i).path_in_schema: row_group.column(i).compression for i in range(4)}
        assert written == {"noise": "UNCOMPRESSED", "flags": "LZ4", "score": "UNCOMPRESSED", "zeros": "LZ4"}
    assert unpack_table(pq.read_table(path)).to_pylist() == table.to_pylist() + table.slice(0, 10).to_pylist()
    stored = pack_table(table.cast(schema))
    assert column_compression(stored, dictionary_columns(stored.schema)) == {
        "noise": "none",
        "flags": "lz4",
        "score": "none",
        "zeros": "lz4",
    }


def test_a_writer_closed_before_any_table_writes_a_file_of_no_rows(tmp_path):
    schema = with_nullable(_table().schema, False)
    with parquet_writer(str(tmp_path / "empty.parquet"), schema):
        pass
    back = pq.read_table(tmp_path / "empty.parquet")
    assert back.num_rows == 0 and unpack_table(back).schema == schema

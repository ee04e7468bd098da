"""tml.reader.layout: the same values, LZ4, dictionaries only off floats, non-nullable where asked."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.reader.layout import dictionary_columns, parquet_writer, with_nullable


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


def test_written_files_hold_the_same_values_non_nullable_lz4_and_float_leaves_without_dictionaries(tmp_path):
    table = _table()
    schema = with_nullable(table.schema, False)
    path = tmp_path / "a.parquet"
    with parquet_writer(str(path), schema) as writer:
        writer.write_table(table.cast(schema))
    back = pq.read_table(path)
    assert back.to_pylist() == table.to_pylist()
    assert not any(field.nullable for field in back.schema)
    assert not back.schema.field("dense").type.value_field.nullable
    assert not back.schema.field("counts").type.item_field.nullable
    group = pq.ParquetFile(path).metadata.row_group(0)
    columns = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    assert {column.compression for column in columns.values()} == {"LZ4"}
    dictionary = {path for path, column in columns.items() if "RLE_DICTIONARY" in column.encodings}
    assert dictionary == {"tags.list.element", "counts.key_value.key", "label", "name"}


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
        writer.write_table(table.cast(schema))  # a top-level null fails the cast, a nested one the write


def test_with_nullable_true_undoes_false_at_every_level():
    schema = _table().schema
    strict = with_nullable(schema, False)
    assert with_nullable(strict, True) == schema
    assert (
        not strict.field("counts").type.item_field.nullable
        and strict.field("counts").type.key_field.nullable is False
    )

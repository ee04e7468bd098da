"""Packed vectors (tml.reader.vectors): the reader gives the same batches from packed files as from lists, and
names the column of a vector it cannot read."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tml.reader.arrow_to_torch import DataError
from tml.reader.dataset import build_dataset
from tml.reader.layout import parquet_writer, with_nullable
from tml.reader.vectors import VECTOR_KEY, logical_schema, vector_type

pytestmark = pytest.mark.unit


def _write(path, table: pa.Table, vectors: str) -> None:
    schema = with_nullable(table.schema, False)
    with parquet_writer(str(path), schema, vectors) as writer:
        writer.write_table(table, row_group_size=16)


def _batches(folder, rd) -> list:
    config = rd.base_config(str(folder), shuffle={"shuffle_files": False, "buffer_size": 0})
    return list(build_dataset(config, ["click"]))


def test_packed_and_list_files_give_the_same_batches(tmp_path, rd):
    table = rd.make_table(40).set_column(  # binary_col as a fixed-size list too, so that both pack
        1,
        "binary_col",
        pa.FixedSizeListArray.from_arrays(rd.make_table(40)["binary_col"].combine_chunks().flatten(), 4),
    )
    for vectors in ("binary", "list"):
        (tmp_path / vectors).mkdir()
        _write(tmp_path / vectors / "a.parquet", table, vectors)
    stored = pq.read_schema(tmp_path / "binary" / "a.parquet")
    assert [stored.field(name).type for name in ("continuous", "binary_col")] == [
        pa.binary(24),
        pa.binary(32),
    ]
    packed, lists = _batches(tmp_path / "binary", rd), _batches(tmp_path / "list", rd)
    assert len(packed) == len(lists) == 5
    for a, b in zip(packed, lists, strict=True):
        assert a.dense.keys() == b.dense.keys()
        for name in a.dense:
            assert a.dense[name].dtype == b.dense[name].dtype and torch.equal(a.dense[name], b.dense[name])
        assert torch.equal(a.ids["uid"], b.ids["uid"]) and torch.equal(a.labels, b.labels)
    first = packed[0].dense["continuous"]
    assert first[1].tolist() == [10.0, 11.0, 12.0, 13.0, 14.0, 15.0]  # row uid 1: uid * 10 + j


def _packed_field(name: str, width: int, tag: bytes) -> pa.Field:
    return pa.field(name, pa.binary(width), nullable=False, metadata={VECTOR_KEY: tag})


def test_vector_type_reads_the_tag_and_names_a_bad_one():
    assert vector_type(pa.field("x", pa.float32())) is None
    assert vector_type(_packed_field("v", 24, b"float")) == pa.list_(
        pa.field("item", pa.float32(), nullable=False), 6
    )
    with pytest.raises(ValueError, match=r"column 'v' is tagged tml.vector='str', expected an integer or"):
        vector_type(_packed_field("v", 24, b"str"))
    with pytest.raises(ValueError, match=r"column 'v' is tagged tml.vector='int64' but is fixed_size_binary"):
        vector_type(_packed_field("v", 20, b"int64"))
    schema = logical_schema(pa.schema([_packed_field("v", 8, b"int32"), pa.field("y", pa.int64())]))
    assert schema.field("v").type == pa.list_(pa.field("item", pa.int32(), nullable=False), 2)
    assert not schema.field("v").metadata


def test_the_reader_names_a_packed_column_it_cannot_read(tmp_path, rd):
    table = rd.make_table(10)
    _write(tmp_path / "a.parquet", table, "binary")
    stored = pq.read_table(tmp_path / "a.parquet")
    index = stored.schema.get_field_index("continuous")
    column = stored.column("continuous")
    retagged = stored.set_column(index, _packed_field("continuous", 24, b"utf8"), column)
    pq.write_table(retagged, tmp_path / "a.parquet")
    with pytest.raises(
        DataError, match=r"a\.parquet: column 'continuous' is tagged tml.vector=.utf8., expected an integer"
    ):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])
    untagged = stored.set_column(index, pa.field("continuous", pa.binary(24)), column)
    pq.write_table(untagged, tmp_path / "a.parquet")
    with pytest.raises(
        DataError, match=r"a\.parquet: column 'continuous' is fixed_size_binary\[24\] without"
    ):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])
    five = pa.array([bytes(20)] * 10, pa.binary(20))  # 5 floats per row where the config says 6
    pq.write_table(
        stored.set_column(index, _packed_field("continuous", 20, b"float"), five), tmp_path / "a.parquet"
    )
    with pytest.raises(
        DataError, match=r"a\.parquet: column 'continuous' holds lists of 5 values, expected 6"
    ):
        build_dataset(rd.base_config(str(tmp_path)), ["click"])

"""tml-pq on small files: schema, head (with list truncation), count, stats (streamed), bad paths."""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tml.reader.layout import with_nullable
from tml.reader.vectors import VECTOR_KEY, unpack_table
from tml.tools.pq import cli

pytestmark = pytest.mark.unit


@pytest.fixture()
def data_dir(tmp_path):
    values = pa.array(np.arange(60, dtype=np.float32))
    table = pa.table(
        {
            "x": pa.array([1.0, math.nan, None, 4.0, -2.0, 10.0]),
            "vec": pa.FixedSizeListArray.from_arrays(values, 10),
            "ids": pa.array([[1, 2], [3], None, [], [7, 8, 9], [0]], pa.list_(pa.int64())),
            "name": ["a", "b", None, "d", "e", "f"],
        }
    )
    # Small row groups so that stats must merge partial results across batches and files.
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=2)
    pq.write_table(table.slice(0, 3), tmp_path / "part-1.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    return tmp_path


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_count_directory_glob_and_url(data_dir, capsys):
    assert _run(capsys, "count", str(data_dir)) == (0, "9\n", "")
    assert _run(capsys, "count", str(data_dir / "part-1*"))[1] == "3\n"
    assert _run(capsys, "count", f"file://{data_dir}/*.parquet")[1] == "9\n"
    code, out, _ = _run(capsys, "count", str(data_dir), "--per-file")
    assert code == 0 and out.splitlines()[-1] == "9\ttotal" and "part-0.parquet" in out


def test_schema_lists_columns(data_dir, capsys):
    code, out, _ = _run(capsys, "schema", str(data_dir))
    assert code == 0
    assert "2 file(s)" in out
    assert "x: double" in out and "vec: fixed_size_list" in out and "name: string" in out


def test_head_truncates_long_lists(data_dir, capsys):
    code, out, _ = _run(capsys, "head", str(data_dir / "part-0.parquet"), "-n", "3", "--max-items", "4")
    assert code == 0
    assert out.count("--- row") == 3
    assert "[0, 1, 2, 3, ... (10 items)]" in out
    assert "[20, 21, 22, 23, ... (10 items)]" in out and "30, 31" not in out


def test_head_column_selection_and_unknown_column(data_dir, capsys):
    code, out, _ = _run(capsys, "head", str(data_dir), "-n", "1", "--columns", "name")
    assert code == 0 and "'a'" in out and "vec" not in out
    code, _, err = _run(capsys, "head", str(data_dir), "--columns", "nope")
    assert code == 2 and "nope" in err


def test_stats_values(data_dir, capsys):
    code, out, _ = _run(capsys, "stats", str(data_dir / "part-0.parquet"))
    assert code == 0
    lines = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
    assert out.splitlines()[0] == "6 rows"
    # x: one null, one NaN; min/max/mean over the 4 finite values.
    assert lines["x"][2:7] == ["1", "1", "-2", "10", "3.25"]
    assert lines["vec"][-1] == "10/10/10" and lines["vec"][4:7] == ["0", "59", "29.5"]
    assert lines["ids"][2] == "1" and lines["ids"][-1] == "0/3/1.4"
    assert lines["name"][1:] == ["string", "1"]


def test_missing_path_names_pattern(tmp_path, capsys):
    pattern = str(tmp_path / "nothing-*.parquet")
    code, out, err = _run(capsys, "count", pattern)
    assert code == 2 and out == "" and pattern in err


def test_not_parquet_is_reported(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    code, _, err = _run(capsys, "schema", str(bad))
    assert code == 2 and "bad.parquet" in err


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["--help"])
    assert exit_info.value.code == 0
    assert "fsspec URL" in capsys.readouterr().out


def test_count_agrees_with_what_the_reader_reads(data_dir, capsys):
    from tml.reader.config import DataConfig
    from tml.reader.dataset import build_dataset

    # Hidden Parquet files a Spark job leaves (an unfinished attempt, a summary file) count for neither.
    (data_dir / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(
        pq.read_table(data_dir / "part-0.parquet"), data_dir / "_temporary" / "0" / "part-0.parquet"
    )
    pq.write_table(pq.read_table(data_dir / "part-1.parquet"), data_dir / ".part-1.parquet")
    for inputs in (str(data_dir), str(data_dir / "*.parquet"), f"file://{data_dir}"):
        config = DataConfig(
            inputs=inputs, global_batch_size=2, dense_columns=[{"name": "x", "columns": ["x"]}], num_epochs=1
        )
        dataset = build_dataset(config, [])
        assert _run(capsys, "count", inputs)[1] == f"{dataset.stats['rows']}\n" == "9\n"
        assert sum(batch.batch_size for batch in dataset) == 9


def test_rewrite_keeps_rows_values_and_row_groups_and_drops_nullability_only_where_no_nulls(data_dir, capsys):
    out = data_dir.parent / f"{data_dir.name}-fast"
    code, printed, err = _run(capsys, "rewrite", str(data_dir), "--output", str(out))
    assert code == 0, err
    # vec: x, ids, name have nulls
    assert "part-0.parquet: 6 rows, 1 of 4 columns non-nullable, 1 packed vector(s)" in printed
    for name in ("part-0.parquet", "part-1.parquet"):
        before, after = pq.ParquetFile(data_dir / name), pq.ParquetFile(out / name)
        assert after.schema_arrow.field("vec").type == pa.binary(40)
        assert after.schema_arrow.field("vec").metadata == {VECTOR_KEY: b"float"}
        back = unpack_table(after.read())
        assert repr(back.to_pylist()) == repr(before.read().to_pylist())  # NaN included
        assert after.metadata.num_row_groups == before.metadata.num_row_groups
        assert {f.name: f.nullable for f in after.schema_arrow} == {
            "x": True,
            "vec": False,
            "ids": True,
            "name": True,
        }
        # tml.reader.layout's compression: LZ4 only where it halves a column, which 6 rows never do.
        assert after.metadata.row_group(0).column(0).compression == "UNCOMPRESSED"


def test_rewrite_vectors_list_writes_packed_vectors_back_as_lists_and_schema_and_head_show_lists(
    data_dir, capsys
):
    packed, lists = data_dir.parent / "packed", data_dir.parent / "lists"
    assert _run(capsys, "rewrite", str(data_dir), "--output", str(packed))[0] == 0
    code, printed, err = _run(capsys, "rewrite", str(packed), "--output", str(lists), "--vectors", "list")
    assert code == 0 and "0 packed vector(s)" in printed, err
    table = pq.read_table(lists / "part-0.parquet")
    vec = table.schema.field("vec")
    assert vec.type == pa.list_(pa.field("item", pa.float32(), nullable=False), 10) and not vec.metadata
    assert repr(table.to_pylist()) == repr(pq.read_table(data_dir / "part-0.parquet").to_pylist())
    code, out, _ = _run(capsys, "schema", str(packed))
    assert code == 0 and "vec: fixed_size_list<item: float not null>[10] not null" in out
    assert "stored packed, one fixed_size_binary value per row (tml.reader.vectors): vec" in out
    assert "stored packed" not in _run(capsys, "schema", str(lists))[1]
    code, out, _ = _run(capsys, "head", str(packed / "part-0.parquet"), "-n", "3", "--max-items", "4")
    assert code == 0 and "[20, 21, 22, 23, ... (10 items)]" in out
    code, out, _ = _run(capsys, "stats", str(packed / "part-0.parquet"))
    assert re.search(r"^vec +list<float>\[10\] +0 ", out, re.M) and "10/10/10" in out
    with pytest.raises(SystemExit) as exit_info:
        cli(["rewrite", str(data_dir), "--output", str(lists), "--vectors", "bytes"])
    assert exit_info.value.code == 2 and "invalid choice: 'bytes'" in capsys.readouterr().err


def test_rewrite_packs_variable_lists_whose_rows_all_hold_the_same_number_of_values(tmp_path, capsys):
    table = pa.table(
        {
            "spark_array": pa.array([[1.5, 2.5], [3.5, 4.5], [5.5, 6.5]], pa.list_(pa.float32())),
            "ragged": pa.array([[1, 2], [3], [4, 5]], pa.list_(pa.int64())),
            "empty": pa.array([[], [], []], pa.list_(pa.int64())),
            "with_null": pa.array([[1.0, None], [2.0, 3.0], [4.0, 5.0]], pa.list_(pa.float64())),
        }
    )
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)  # the lengths span two row groups
    out = tmp_path / "out"
    code, printed, err = _run(capsys, "rewrite", str(tmp_path / "a.parquet"), "--output", str(out))
    assert code == 0 and "1 packed vector(s)" in printed, err
    stored = pq.read_schema(out / "a.parquet")
    assert stored.field("spark_array").type == pa.binary(8)
    assert all(pa.types.is_list(stored.field(name).type) for name in ("ragged", "empty", "with_null"))
    back = unpack_table(pq.read_table(out / "a.parquet"))
    assert back.to_pylist() == table.to_pylist()
    code, _, err = _run(capsys, "rewrite", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "lists"),
                        "--vectors", "list")  # fmt: skip
    assert code == 0, err
    assert pa.types.is_list(pq.read_schema(tmp_path / "lists" / "a.parquet").field("spark_array").type)


def test_rewrite_reads_null_counts_per_leaf_with_dotted_names_maps_and_nested_nulls(tmp_path, capsys):
    table = pa.table(
        {
            "meta.user_id": pa.array([1, 2]),
            "counts": pa.array([[(3, 0.5)], []], type=pa.map_(pa.int64(), pa.float32())),
            "tags": pa.array([[1, None], [2]], type=pa.list_(pa.int64())),  # a null element, no null list
            "meta": pa.array([5, 6]),
        }
    )
    pq.write_table(table, tmp_path / "a.parquet")
    code, _, err = _run(capsys, "rewrite", str(tmp_path / "a.parquet"), "--output", str(tmp_path / "out"))
    assert code == 0, err
    after = pq.ParquetFile(tmp_path / "out" / "a.parquet")
    assert after.read().to_pylist() == table.to_pylist()
    nullable = {f.name: f.nullable for f in after.schema_arrow}
    assert nullable == {"meta.user_id": False, "counts": False, "tags": True, "meta": False}
    assert not after.schema_arrow.field("counts").type.item_field.nullable


def test_rewrite_refuses_to_overwrite_or_to_write_over_its_input(data_dir, capsys):
    out = data_dir.parent / f"{data_dir.name}-fast"
    assert _run(capsys, "rewrite", str(data_dir), "--output", str(out))[0] == 0
    code, _, err = _run(capsys, "rewrite", str(data_dir), "--output", str(out))
    assert code == 2 and "already holds" in err and "--overwrite" in err
    assert _run(capsys, "rewrite", str(data_dir), "--output", str(out), "--overwrite")[0] == 0
    code, _, err = _run(capsys, "rewrite", str(out), "--output", str(out), "--overwrite")
    assert code == 2 and "holds the input" in err
    assert pq.read_table(out / "part-0.parquet").num_rows == 6  # untouched
    code, _, err = _run(
        capsys, "rewrite", str(data_dir / "part-0.parquet"), str(out), "--output", str(data_dir / "x")
    )
    assert code == 2 and "both named 'part-0.parquet'" in err


def test_rewrite_removes_a_file_that_fails_midway_and_names_it(data_dir, capsys, monkeypatch):
    import tml.tools.pq as tool

    monkeypatch.setattr(
        tool, "rewrite_schema", lambda parquet: with_nullable(parquet.schema_arrow, False)
    )  # wrong
    out = data_dir.parent / f"{data_dir.name}-fast"
    code, _, err = _run(capsys, "rewrite", str(data_dir / "part-0.parquet"), "--output", str(out))
    assert code == 2 and "part-0.parquet: cannot rewrite" in err and "null" in err
    assert not (out / "part-0.parquet").exists()

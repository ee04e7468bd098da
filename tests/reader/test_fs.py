"""The one input resolver: globs, directories, files and URLs; the hidden entries Spark/Hive leave skipped."""

from __future__ import annotations

import fsspec
import pytest

from tml.reader.fs import list_inputs

pytestmark = pytest.mark.unit


@pytest.fixture
def spark_output(tmp_path):
    """A Spark-style output folder: part files, a nested partition, and the hidden litter around them."""
    for name in ("part-0.parquet", "part-1.parquet", "date=1/part-2.parquet", "_SUCCESS", "_metadata",
                 "_common_metadata", ".part-0.parquet.crc", ".hidden.parquet", "_temporary/0/part-9.parquet",
                 ".spark-staging-1/part-8.parquet", "date=1/_SUCCESS", "notes.txt"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def _names(paths, root) -> list[str]:
    return [path[len(str(root)) + 1 :] for path in paths]


def test_directory_gives_visible_parquet_files_below_it(spark_output):
    _, paths = list_inputs(str(spark_output))
    assert _names(paths, spark_output) == ["date=1/part-2.parquet", "part-0.parquet", "part-1.parquet"]


def test_glob_skips_hidden_names_below_its_fixed_part(spark_output):
    _, paths = list_inputs(str(spark_output / "*"))
    assert _names(paths, spark_output) == ["notes.txt", "part-0.parquet", "part-1.parquet"]  # no folders
    _, paths = list_inputs(str(spark_output / "**" / "*.parquet"))
    assert _names(paths, spark_output) == ["date=1/part-2.parquet", "part-0.parquet", "part-1.parquet"]
    # Hidden folders above the pattern's wildcards were named by the user: they are not skipped.
    _, paths = list_inputs(str(spark_output / "_temporary" / "0" / "*.parquet"))
    assert _names(paths, spark_output) == ["_temporary/0/part-9.parquet"]


def test_a_named_file_is_read_even_when_hidden(spark_output):
    _, paths = list_inputs(str(spark_output / ".hidden.parquet"))
    assert _names(paths, spark_output) == [".hidden.parquet"]


def test_nothing_visible_says_what_was_skipped(tmp_path):
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "_part.parquet").write_text("")
    with pytest.raises(FileNotFoundError, match=r"matches no files \(1 hidden files or folders .* skipped\)"):
        list_inputs(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"matches no files \(2 hidden"):
        list_inputs(str(tmp_path / "*"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="is a directory without"):
        list_inputs(str(tmp_path / "sub"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        list_inputs(str(tmp_path / "missing"))


def test_urls_resolve_the_same_way():
    memory = fsspec.filesystem("memory")
    for name in ("a.parquet", "_SUCCESS", "_temporary/b.parquet", "c/d.parquet"):
        memory.pipe(f"/resolver-test/{name}", b"x")
    for inputs in ("memory://resolver-test", "memory://resolver-test/**/*.parquet"):
        fs, paths = list_inputs(inputs)
        assert paths == ["/resolver-test/a.parquet", "/resolver-test/c/d.parquet"], inputs
        assert "memory" in fs.protocol


def test_write_text_replaces_a_local_file_whole_and_writes_fsspec_urls(tmp_path):
    from tml.reader.fs import read_bytes, write_text

    path = tmp_path / "side" / "record.json"
    write_text(str(path), "first")
    write_text(str(path), "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["record.json"]  # no temporary file left
    write_text(f"memory://{tmp_path.name}/record.json", "remote")
    assert read_bytes(f"memory://{tmp_path.name}/record.json") == b"remote"

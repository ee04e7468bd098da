import pyarrow.parquet as pq
import pytest

from tml.projects.twhin.main import cli

pytestmark = pytest.mark.unit


def test_generate_data_writes_edges(tmp_path, capsys):
    cli(
        [
            "generate-data",
            "--tables",
            "user=50,tweet=20",
            "--relations",
            "fav:user:tweet,follow:user:user",
            "--num-edges",
            "200",
            "--output",
            str(tmp_path),
        ]
    )
    table = pq.read_table(sorted(tmp_path.glob("*.parquet")))
    assert table.num_rows == 200 and table.column_names == ["lhs", "rel", "rhs"]
    assert "wrote 200 edges" in capsys.readouterr().out


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(
            [
                "generate-data",
                "--tables",
                "user=5",
                "--relations",
                "fav:user:tweet",
                "--num-edges",
                "3",
                "--output",
                str(tmp_path),
            ]
        )
    assert "tables ['tweet']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(
            [
                "generate-data",
                "--tables",
                "user",
                "--relations",
                "fav:user:user",
                "--num-edges",
                "3",
                "--output",
                str(tmp_path),
            ]
        )

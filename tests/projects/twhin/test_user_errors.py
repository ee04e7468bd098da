import pytest

from tml.projects.twhin.main import cli

pytestmark = pytest.mark.unit


def test_relations_naming_unknown_tables_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TML_DEBUG", raising=False)
    args = [
        "--tables",
        "user=10",
        "--relations",
        "fav:user:tweet",
        "--num-edges",
        "5",
        "--output",
        str(tmp_path),
    ]
    with pytest.raises(SystemExit) as exit_:
        cli(["generate-data", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "tml-twhin: --relations name tables ['tweet'] that --tables does not define (['user'])\n"
    )
    with pytest.raises(SystemExit):
        cli(["generate-data", *args, "--debug"])
    assert "Traceback" in capsys.readouterr().err

"""User errors print one line (`prog: message`, exit status 2); --debug / TML_DEBUG=1 add the traceback."""

import argparse
import gc
import logging
import weakref

import pytest

from tml.core.cli import add_debug_flag, user_errors_as_one_line
from tml.core.config.loader import ConfigError
from tml.core.distributed import run_distributed
from tml.core.errors import UserError, is_user_error

pytestmark = pytest.mark.unit


def fail(error):
    raise error


@pytest.fixture
def single_process(monkeypatch):
    for name in ("TML_DEBUG", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "error",
    [ConfigError("c.yaml: bad key"), FileNotFoundError("inputs 'x' matches no files"), UserError("bad")],
)
def test_user_error_is_one_line_with_status_2(capsys, single_process, error):
    with pytest.raises(SystemExit) as exit_, user_errors_as_one_line("tml-x"):
        fail(error)
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"tml-x: {error}\n"


def test_debug_flag_and_environment_print_the_traceback(capsys, single_process, monkeypatch):
    parser = argparse.ArgumentParser()
    add_debug_flag(parser)
    assert parser.parse_args(["--debug"]).debug and not parser.parse_args([]).debug
    with pytest.raises(SystemExit), user_errors_as_one_line("tml-x", debug=True):
        fail(ConfigError("c.yaml: bad key"))
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith("tml-x: c.yaml: bad key\n")
    monkeypatch.setenv("TML_DEBUG", "1")
    with pytest.raises(SystemExit), user_errors_as_one_line("tml-x"):
        fail(ConfigError("c.yaml: bad key"))
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("TML_DEBUG", "0")
    with pytest.raises(SystemExit), user_errors_as_one_line("tml-x"):
        fail(ConfigError("c.yaml: bad key"))
    assert "Traceback" not in capsys.readouterr().err


def test_other_errors_keep_their_traceback(single_process):
    with pytest.raises(ValueError, match="a bug"), user_errors_as_one_line("tml-x"):
        fail(ValueError("a bug"))
    assert not is_user_error(ValueError("x")) and not is_user_error(RuntimeError("x"))


def test_each_rank_names_itself_under_torchrun(capsys, single_process, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit), user_errors_as_one_line("tml-x"):
        fail(UserError("bad data in b.parquet"))
    assert capsys.readouterr().err == "tml-x: [rank 3/4] bad data in b.parquet\n"


def test_run_distributed_leaves_user_errors_to_the_entry_point(capsys, caplog, monkeypatch, single_process):
    monkeypatch.setattr(logging.getLogger("tml"), "propagate", True)  # setup_logging may have cut it
    with pytest.raises(ConfigError, match="bad key"):
        run_distributed(lambda: fail(ConfigError("bad key")))
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exit_:
        run_distributed(lambda: fail(RuntimeError("a bug")))
    assert exit_.value.code == 1
    assert "[rank 0] failed: RuntimeError('a bug')" in capsys.readouterr().err
    assert "Traceback" in caplog.text and "RuntimeError: a bug" in caplog.text


def test_config_and_data_errors_are_user_errors():
    from tml.reader.arrow_to_torch import DataError

    assert issubclass(ConfigError, UserError) and issubclass(DataError, UserError)


def test_run_distributed_frees_what_the_run_left_in_reference_cycles(single_process):
    # A sharded model sits in such a cycle holding its process groups; freed only at interpreter teardown,
    # their gloo threads can abort the exit. Automatic collection is off, so only the teardown's runs.
    class Model:
        pass

    def train():
        model = Model()
        model.hook = model  # the cycle
        return weakref.ref(model)

    gc.disable()
    try:
        ref = run_distributed(train)
        assert ref() is None
    finally:
        gc.enable()

"""Errors caused by what the user gave (a config, data, a path), told apart from bugs.

The rule: an exception is a user error when it is a `UserError` (`ConfigError`, `DataError`, ...) or a
`FileNotFoundError` (a path the user named does not exist). Entry points report a user error as one line
and exit with status 2 (`tml.core.cli.user_errors_as_one_line`); every other exception is a bug or an
environment failure and keeps its traceback. A `ValueError` raised for bad user input derives from
`UserError` as well (as `ConfigError` and `DataError` do); a plain `ValueError` keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad user input: a config, data or path problem whose message names what to fix."""


def is_user_error(error: BaseException) -> bool:
    """True for the exceptions an entry point reports as one line without a traceback."""
    return isinstance(error, (UserError, FileNotFoundError))

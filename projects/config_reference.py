"""The config reference of every project: `docs/config_reference.md`, generated from the config classes.

    .venv/bin/python -m tml.projects.config_reference > docs/config_reference.md

tests/projects/test_config_reference.py fails while the file differs from what this prints.
"""

from __future__ import annotations

import sys

import pydantic

from tml.core.config.reference import render_reference

COMMAND = ".venv/bin/python -m tml.projects.config_reference > docs/config_reference.md"


def roots() -> list[tuple[str, type[pydantic.BaseModel]]]:
    """(title, root config class) of each project's config tree, in the reference's order."""
    from tml.projects.home.recap.config import RecapConfig
    from tml.projects.twhin.config import TwhinConfig

    # A new project's config tree is one more entry.
    return [("tml-recap", RecapConfig), ("tml-twhin", TwhinConfig)]


def main() -> None:
    # UTF-8 whatever the locale: the file is read back as UTF-8 by the test.
    sys.stdout.buffer.write(render_reference(roots(), COMMAND).encode("utf-8"))


if __name__ == "__main__":
    main()

"""The package list in pyproject.toml matches the folders, and the shared packages never import projects/."""

import ast
import pathlib
import tomllib

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP = {".venv", "tests", "benchmarks", "docs", "build", ".git", "requirements"}


def _package_dirs():
    for init in ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts and rel.parts[0] in SKIP:
            continue
        yield ".".join(("tml", *rel.parts))


def test_pyproject_lists_every_package():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(declared) == sorted(_package_dirs())


@pytest.mark.parametrize("package", ["core", "reader", "optimizers", "ml_logging", "tools"])
def test_shared_packages_do_not_import_projects(package):
    offenders = []
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("tml.projects")]
    assert offenders == []


# Words that belong to one project: its batch, its features, its names. core/ serves every project.
PROJECT_WORDS = ("RecapBatch", "EdgeBatch", "recap", "twhin", "segdense", "discrete", "continuous")


def test_core_names_no_project():
    offenders = []
    for path in (ROOT / "core").rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tml.reader"):
                offenders.append(f"{path.relative_to(ROOT)}: imports {node.module}")
        for number, line in enumerate(text.splitlines(), start=1):
            found = [word for word in PROJECT_WORDS if word.lower() in line.lower()]
            offenders += [f"{path.relative_to(ROOT)}:{number}: {word!r}" for word in found]
    assert offenders == []

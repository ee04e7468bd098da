"""File systems: local paths, globs and fsspec URLs, with errors that name what to install.

Local files are handed to pyarrow as plain paths (native I/O, no GIL); every other protocol goes through
an fsspec file object. A protocol whose package is missing raises an error naming the pip extra.
`list_inputs` is the one place that turns an `inputs` string into files, for the reader and for `tml-pq`
alike; it skips the hidden `_*` / `.*` entries that Spark and Hive writers leave next to the data.

Example:
    fs, paths = list_inputs("data/train/*.parquet")
    with open_input(fs, paths[0]) as source:
        pq.ParquetFile(source)
"""

from __future__ import annotations

import contextlib
import glob as globlib
import os
from collections.abc import Iterator
from typing import IO, Any

import fsspec

from tml.core.config.loader import ConfigError

# Protocol -> pip extra of pyproject.toml that brings its fsspec implementation.
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hdfs": "hdfs", "viewfs": "hdfs"}


def filesystem_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a local path or fsspec URL; explains a missing protocol package."""
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, OSError) as error:
        protocol = url.split("://", 1)[0] if "://" in url else "file"
        extra = _EXTRAS.get(protocol)
        hint = (
            f"pip install 'tml[{extra}]'" if extra else f"install the fsspec implementation of '{protocol}'"
        )
        if protocol in ("hdfs", "viewfs"):
            hint += " and make libhdfs / a JVM available (pyarrow's HadoopFileSystem)"
        raise ImportError(
            f"cannot open {url!r}: protocol '{protocol}' is not available ({hint}): {error}"
        ) from error
    except ValueError as error:
        raise ConfigError(f"cannot open {url!r}: {error}") from error


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden from the resolver: it starts with `_` or `.`.

    Spark, Hive and Hadoop writers leave such entries next to the data (`_SUCCESS`, `_metadata`,
    `_common_metadata`, `.part-0.parquet.crc`, `_temporary/`, `.spark-staging-*/`); none of them is a part
    file to train on.
    """
    return name.startswith(("_", "."))


def _visible(paths: list[str], root: str) -> list[str]:
    """The paths none of whose names below `root` is hidden."""
    root = root.rstrip("/")
    return [p for p in paths if not any(is_hidden(name) for name in p[len(root) :].split("/") if name)]


def _glob_root(path: str) -> str:
    """The folder a glob pattern starts from: its components before the first one with a wildcard."""
    parts = path.split("/")
    static = next(index for index, part in enumerate(parts) if globlib.has_magic(part))
    return "/".join(parts[:static])


def list_inputs(inputs: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Resolve `inputs` (glob, directory, file; local or URL) to a sorted list of file paths.

    The one resolver of the reader and `tml-pq`. A glob gives the files it matches; a directory gives every
    `*.parquet` file below it; a file gives itself (even a hidden one: it was named). Globs and directories
    skip every entry whose name, or whose folder's name below the pattern's fixed part, starts with `_` or
    `.` (see `is_hidden`).

    Raises FileNotFoundError naming `inputs` when nothing matches.
    """
    fs, path = filesystem_for(inputs)
    if globlib.has_magic(path):
        found = [p for p, info in fs.glob(path, detail=True).items() if info.get("type") != "directory"]
        paths = _visible(found, _glob_root(path))
    elif fs.isdir(path):
        found = [p for p in fs.find(path) if p.endswith(".parquet")]
        paths = _visible(found, path)
        if not found:
            raise FileNotFoundError(f"inputs {inputs!r} is a directory without *.parquet files")
    elif fs.exists(path):
        found = paths = [path]
    else:
        raise FileNotFoundError(f"inputs {inputs!r}: no such file or directory")
    if not paths:
        hidden = (
            f" ({len(found)} hidden files or folders starting with '_' or '.' are skipped)" if found else ""
        )
        raise FileNotFoundError(f"inputs {inputs!r} matches no files{hidden}")
    return fs, sorted(paths)


@contextlib.contextmanager
def open_input(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Any]:
    """Yield something pyarrow.parquet.ParquetFile accepts: a plain path when local, else a file object."""
    if is_local(fs):
        yield path
        return
    with fs.open(path, "rb") as handle:
        yield handle


def read_bytes(url: str) -> bytes:
    """All bytes of a small side file (schema, mask) at a local path or fsspec URL."""
    fs, path = filesystem_for(url)
    handle: IO[bytes]
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_text(url: str, text: str) -> None:
    """Write a small side file (calibration, plan record) at a local path or fsspec URL. A local file is
    replaced atomically (written beside it, then renamed), so a reader never sees half of it."""
    fs, path = filesystem_for(url)
    if not is_local(fs):
        with fs.open(path, "w") as handle:
            handle.write(text)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)

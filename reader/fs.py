"""File systems: local paths, globs and fsspec URLs, with errors that name what to install.

Local files are handed to pyarrow as plain paths (native I/O, no GIL); every other protocol goes through
an fsspec file object. A protocol whose package is missing raises an error naming the pip extra.

Example:
    fs, paths = list_inputs("data/train/*.parquet")
    with open_input(fs, paths[0]) as source:
        pq.ParquetFile(source)
"""

from __future__ import annotations

import contextlib
import glob as globlib
from collections.abc import Iterator
from typing import IO, Any

import fsspec

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
        raise ValueError(f"cannot open {url!r}: {error}") from error


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def list_inputs(inputs: str) -> tuple[fsspec.AbstractFileSystem, list[str]]:
    """Resolve `inputs` (glob, directory, file; local or URL) to a sorted list of file paths.

    Raises FileNotFoundError naming `inputs` when nothing matches.
    """
    fs, path = filesystem_for(inputs)
    if globlib.has_magic(path):
        paths = [found for found in fs.glob(path) if not fs.isdir(found)]
    elif fs.isdir(path):
        paths = [found for found in fs.find(path) if found.endswith(".parquet")]
        if not paths:
            raise FileNotFoundError(f"inputs {inputs!r} is a directory without *.parquet files")
    elif fs.exists(path):
        paths = [path]
    else:
        raise FileNotFoundError(f"inputs {inputs!r}: no such file or directory")
    if not paths:
        raise FileNotFoundError(f"inputs {inputs!r} matches no files")
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

"""`tml-pq`: look inside Parquet data sets (schema, first rows, row count, per-column statistics), and
rewrite them in the layout the reader decodes fastest (tml.reader.layout).

PATH is a file, a directory (all `*.parquet` below it), a glob, or an fsspec URL (`s3://bucket/x/*.parquet`),
resolved exactly as the reader resolves `inputs` (tml.reader.fs.list_inputs: `_*` / `.*` entries skipped).
`stats` streams record batches, so data sets larger than memory work; its figures are exact.

Example:
    tml-pq schema data/train
    tml-pq head 'data/train/*.parquet' -n 3 --columns label meta.user_id
    tml-pq count gs://bucket/recap/train
    tml-pq stats data/train/part-00000.parquet
    tml-pq rewrite 'spark/out/*.parquet' --output data/train
"""

from __future__ import annotations

import argparse
import math
import os
import posixpath
import sys
from collections.abc import Iterator

import fsspec
import fsspec.implementations.local
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tml.reader.arrow_types import is_list
from tml.reader.fs import filesystem_for, list_inputs
from tml.reader.layout import VECTORS, Vectors, parquet_writer, with_nullable
from tml.reader.vectors import logical_schema, packable, unpack_table, vector_type


def resolve_files(paths: list[str]) -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """Expand PATHs into (filesystem, file) pairs with the reader's own resolver, so `count` and `stats`
    see exactly the files training reads (hidden `_*` / `.*` entries skipped; see docs/reader.md).

    Raises:
        FileNotFoundError: a PATH matches nothing, naming it.
        ImportError: a PATH's protocol is not installed, naming the pip extra.
    """
    pairs = []
    for path in paths:
        fs, files = list_inputs(path)
        pairs += [(fs, file) for file in files]
    return pairs


def _parquet(source, file: str, metadata: pq.FileMetaData | None = None) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source, metadata=metadata)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{file}: not a readable Parquet file ({err})") from err


def _open(fs: fsspec.AbstractFileSystem, file: str) -> pq.ParquetFile:
    return _parquet(fs.open(file, "rb"), file)


def _iter_batches(
    paths: list[str], columns: list[str] | None, batch_size: int = 65536
) -> Iterator[tuple[str, pa.RecordBatch]]:
    for fs, file in resolve_files(paths):
        parquet = _open(fs, file)
        if columns:
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(f"{file}: no column(s) {missing}; it has {parquet.schema_arrow.names}")
        for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
            yield file, _unpacked(batch)


def _unpacked(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with packed vectors (tml.reader.vectors) as the fixed-size lists they hold."""
    table = unpack_table(pa.Table.from_batches([batch]))
    return pa.RecordBatch.from_arrays([column.chunk(0) for column in table.columns], schema=table.schema)


def _format_value(value: object, max_items: int) -> str:
    if isinstance(value, list):
        shown = ", ".join(_format_value(v, max_items) for v in value[:max_items])
        more = f", ... ({len(value)} items)" if len(value) > max_items else ""
        return f"[{shown}{more}]"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (str, bytes)) and len(value) > 80:
        return repr(value[:80]) + "..."
    return repr(value) if isinstance(value, (str, bytes)) else str(value)


def cmd_schema(paths: list[str]) -> None:
    files = resolve_files(paths)
    first = _open(*files[0])
    print(f"{len(files)} file(s); schema of {files[0][1]}:")
    schema = first.schema_arrow
    print(logical_schema(schema).to_string(show_schema_metadata=False))
    packed = [field.name for field in schema if vector_type(field) is not None]
    if packed:
        print(f"stored packed, one fixed_size_binary value per row (tml.reader.vectors): {', '.join(packed)}")
    for fs, file in files[1:]:
        other = _open(fs, file).schema_arrow
        if not other.equals(first.schema_arrow):
            print(f"WARNING: {file} has a different schema:\n{other.to_string(show_schema_metadata=False)}")


def cmd_head(paths: list[str], num_rows: int, columns: list[str] | None, max_items: int) -> None:
    shown = 0
    for _, batch in _iter_batches(paths, columns, batch_size=max(num_rows, 1)):
        for row in batch.slice(0, num_rows - shown).to_pylist():
            print(f"--- row {shown}")
            width = max(len(name) for name in row)
            for name, value in row.items():
                print(f"  {name:<{width}}  {_format_value(value, max_items)}")
            shown += 1
        if shown >= num_rows:
            return


def cmd_count(paths: list[str], per_file: bool) -> None:
    total = 0
    for fs, file in resolve_files(paths):
        rows = _open(fs, file).metadata.num_rows
        total += rows
        if per_file:
            print(f"{rows}\t{file}")
    print(total if not per_file else f"{total}\ttotal")


class _Moments:
    """Running null / NaN count, min, max and mean of numeric values, merged batch by batch."""

    def __init__(self) -> None:
        self.nulls = self.nans = self.count = 0
        self.total = 0.0
        self.min = self.max = None

    def add(self, values: pa.Array) -> None:
        self.nulls += values.null_count
        if pa.types.is_floating(values.type):
            is_nan = pc.is_nan(values)
            self.nans += pc.sum(is_nan).as_py() or 0
            values = pc.filter(values, pc.invert(is_nan))
        extremes = pc.min_max(values)
        low, high = extremes["min"].as_py(), extremes["max"].as_py()
        if low is not None:
            self.min = low if self.min is None else min(self.min, low)
            self.max = high if self.max is None else max(self.max, high)
        self.count += len(values) - values.null_count
        self.total += float(pc.sum(values, min_count=0).as_py() or 0)

    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


def _type_name(dtype: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(dtype):
        return f"list<{_type_name(dtype.value_type)}>[{dtype.list_size}]"
    if is_list(dtype):
        return f"list<{_type_name(dtype.value_type)}>"
    return str(dtype)


def _is_numeric(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


def cmd_stats(paths: list[str], columns: list[str] | None) -> None:
    rows = 0
    values: dict[str, _Moments] = {}
    lengths: dict[str, _Moments] = {}
    nulls: dict[str, int] = {}
    types: dict[str, pa.DataType] = {}
    for _, batch in _iter_batches(paths, columns):
        rows += batch.num_rows
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            types.setdefault(name, column.type)
            nulls[name] = nulls.get(name, 0) + column.null_count
            if is_list(column.type):
                lengths.setdefault(name, _Moments()).add(pc.list_value_length(column))
                column = pc.list_flatten(column)
            if _is_numeric(column.type):
                values.setdefault(name, _Moments()).add(pc.cast(column, pa.float64()))
    print(f"{rows} rows")
    header = ("column", "type", "nulls", "nan", "min", "max", "mean", "len min/max/mean")
    table = [header]
    for name, dtype in types.items():
        v, n = values.get(name), lengths.get(name)
        table.append(
            (
                name,
                _type_name(dtype),
                str(nulls[name]),
                str(v.nans) if v else "",
                f"{v.min:.6g}" if v and v.min is not None else "",
                f"{v.max:.6g}" if v and v.max is not None else "",
                f"{v.mean():.6g}" if v and v.count else "",
                f"{n.min}/{n.max}/{n.mean():.4g}" if n and n.min is not None else "",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _leaves(dtype: pa.DataType) -> int:
    """How many Parquet leaf columns a field of `dtype` is stored as."""
    if pa.types.is_map(dtype):
        return _leaves(dtype.key_type) + _leaves(dtype.item_type)
    if is_list(dtype):
        return _leaves(dtype.value_type)
    if pa.types.is_struct(dtype):
        return sum(_leaves(dtype.field(i).type) for i in range(dtype.num_fields))
    return 1


def _has_nulls(array: pa.Array) -> bool:
    if array.null_count:
        return True
    if pa.types.is_map(array.type):
        return _has_nulls(array.keys) or _has_nulls(array.items)
    if is_list(array.type):
        return _has_nulls(array.flatten())
    if pa.types.is_struct(array.type):
        return any(_has_nulls(array.field(i)) for i in range(array.type.num_fields))
    return False


def _null_free(parquet: pq.ParquetFile) -> set[str]:
    """Top-level columns without a null at any level. Leaf statistics prove it when every row group counts
    0 nulls; they also count empty lists, so the other columns are read and checked."""
    owner = [field.name for field in parquet.schema_arrow for _ in range(_leaves(field.type))]
    metadata = parquet.metadata
    unproven = set(parquet.schema_arrow.names)
    if len(owner) == metadata.num_columns:
        unproven = set()
        for group in range(metadata.num_row_groups):
            row_group = metadata.row_group(group)
            for index in range(row_group.num_columns):
                statistics = row_group.column(index).statistics
                if statistics is None or not statistics.has_null_count or statistics.null_count:
                    unproven.add(owner[index])
    free = set(parquet.schema_arrow.names) - unproven
    columns = [name for name in parquet.schema_arrow.names if name in unproven]
    for group in range(metadata.num_row_groups if columns else 0):
        table = parquet.read_row_group(group, columns=columns)
        columns = [name for name in columns if not any(_has_nulls(c) for c in table.column(name).chunks)]
    return free | set(columns)


def rewrite_schema(parquet: pq.ParquetFile) -> pa.Schema:
    """The file's schema, non-nullable (nested levels included) for every column without nulls; the
    others keep their nullability."""
    schema, free = parquet.schema_arrow, _null_free(parquet)
    strict = with_nullable(schema, False)
    fields = [strict.field(field.name) if field.name in free else field for field in schema]
    return pa.schema(fields, metadata=schema.metadata)


def with_fixed_lists(parquet: pq.ParquetFile, schema: pa.Schema) -> pa.Schema:
    """`schema` with every variable-length list of numbers without nulls (what Spark writes for an array) as a
    fixed-size list where each of the file's rows holds the same number of values (so that it is packed)."""
    candidates = [
        field.name
        for field in schema
        if (pa.types.is_list(field.type) or pa.types.is_large_list(field.type))
        and not field.nullable
        and packable(pa.field(field.name, pa.list_(field.type.value_field, 1)))
    ]
    lengths: dict[str, set[int]] = {name: set() for name in candidates}
    for group in range(parquet.metadata.num_row_groups if candidates else 0):
        table = parquet.read_row_group(group, columns=candidates)
        for name in candidates:
            counts = pc.list_value_length(table.column(name))
            lengths[name].update(pc.unique(counts).to_pylist())
    fixed = {name: min(found) for name, found in lengths.items() if len(found) == 1 and min(found) > 0}
    fields = [
        field.with_type(pa.list_(field.type.value_field, fixed[field.name])) if field.name in fixed else field
        for field in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)


def _same_file(fs: fsspec.AbstractFileSystem, a: str, other_fs: fsspec.AbstractFileSystem, b: str) -> bool:
    if fs.protocol != other_fs.protocol:
        return False
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    return os.path.realpath(a) == os.path.realpath(b) if local else a == b


def _targets(files: list[tuple[fsspec.AbstractFileSystem, str]], output: str, overwrite: bool):
    out_fs, out_root = filesystem_for(output)
    targets, by_name = [], {}
    for fs, file in files:
        name = posixpath.basename(file)
        if name in by_name:
            raise ValueError(f"two inputs are both named {name!r} ({by_name[name]} and {file}): rewrite them "
                             "into separate --output folders")  # fmt: skip
        by_name[name] = file
        target = posixpath.join(out_root, name)
        if out_fs.exists(target):
            if _same_file(fs, file, out_fs, target):
                raise ValueError(f"--output {output!r} holds the input {file} itself: choose another folder")
            if not overwrite:
                raise ValueError(f"--output {output!r} already holds {target}: choose another folder or pass "
                                 "--overwrite")  # fmt: skip
        targets.append(target)
    return out_fs, targets


def cmd_rewrite(paths: list[str], output: str, overwrite: bool, vectors: Vectors = "binary") -> None:
    """Copy every file to `output` row group by row group, with the same rows, values and row groups;
    `vectors`: tml.reader.layout.parquet_writer's."""
    from tml.ml_logging.progress import progress_bar

    files = resolve_files(paths)
    footers = []
    for fs, file in files:  # every input readable before anything is written; its footer kept for the copy
        with fs.open(file, "rb") as handle:
            footers.append(_parquet(handle, file).metadata)
    rows = sum(footer.num_rows for footer in footers)
    out_fs, targets = _targets(files, output, overwrite)
    out_fs.makedirs(posixpath.dirname(targets[0]) or ".", exist_ok=True)
    bar = progress_bar(rows, "rewrite")
    for (fs, file), footer, target in zip(files, footers, targets, strict=True):
        try:
            with fs.open(file, "rb") as handle:
                parquet = _parquet(handle, file, footer)
                schema = rewrite_schema(parquet)
                if vectors == "binary":
                    schema = with_fixed_lists(parquet, schema)
                with out_fs.open(target, "wb") as sink, parquet_writer(sink, schema, vectors) as writer:
                    for group in range(parquet.num_row_groups):
                        table = parquet.read_row_group(group)
                        writer.write_table(table, row_group_size=max(table.num_rows, 1))
                        bar.update(table.num_rows)
        except BaseException as error:
            if out_fs.exists(target):
                out_fs.rm(target)
            if isinstance(error, (pa.ArrowInvalid, ValueError)):
                raise ValueError(f"{file}: cannot rewrite: {error}") from error
            raise
        strict = sum(not field.nullable for field in schema)
        packed = sum(vector_type(field) is not None for field in writer.storage)
        shown = posixpath.join(output, posixpath.basename(target))
        print(
            f"{shown}: {parquet.metadata.num_rows} rows, {strict} of {len(schema)} columns non-nullable, "
            f"{packed} packed vector(s)"
        )
    bar.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tml-pq",
        description="Inspect Parquet data. PATH: a file, a directory (its *.parquet files), a glob, "
        "or an fsspec URL such as s3://bucket/data/*.parquet (quote globs in the shell); files and folders "
        "whose names start with '_' or '.' are skipped, as the reader skips them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("schema", help="print the Arrow schema (and warn when files differ)")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p = sub.add_parser("head", help="print the first rows, one `column  value` line each")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("-n", "--num-rows", type=int, default=5, help="rows to print (default 5)")
    p.add_argument("--columns", nargs="+", help="only these columns")
    p.add_argument("--max-items", type=int, default=8, help="list items shown before '...' (default 8)")
    p = sub.add_parser("count", help="print the number of rows (from file metadata, no data read)")
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--per-file", action="store_true", help="also print each file's row count")
    p = sub.add_parser(
        "stats",
        help="per column: nulls, NaNs, min/max/mean of numbers (list items pooled), list lengths",
    )
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--columns", nargs="+", help="only these columns")
    p = sub.add_parser(
        "rewrite",
        help="copy the files to --output in the layout tml decodes fastest: LZ4 where it halves a column, "
        "no dictionaries of floats, columns without nulls non-nullable, numeric vectors packed; same rows, values and row groups",
    )
    p.add_argument("paths", metavar="PATH", nargs="+")
    p.add_argument("--output", required=True, help="folder (or fsspec URL) for the files, same names")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --output")
    p.add_argument(
        "--vectors",
        choices=VECTORS,
        default="binary",
        help="binary (default): vectors packed, one fixed_size_binary value per row, which tml decodes "
        "several times as fast and other readers see as bytes (fixed-size lists of numbers without nulls, "
        "and lists of them whose every row in the file holds as many values); list: as lists, packed ones "
        "unpacked (for pandas, Spark, DuckDB)",
    )
    return parser


def cli(argv: list[str] | None = None) -> int:
    """Entry point of the `tml-pq` console script; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schema":
            cmd_schema(args.paths)
        elif args.command == "head":
            cmd_head(args.paths, args.num_rows, args.columns, args.max_items)
        elif args.command == "count":
            cmd_count(args.paths, args.per_file)
        elif args.command == "rewrite":
            cmd_rewrite(args.paths, args.output, args.overwrite, args.vectors)
        else:
            cmd_stats(args.paths, args.columns)
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"tml-pq: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""What the Parquet layout costs the reader: tml.reader.layout's files against pyarrow's default writer's.

The same rows (bench_recap.py's synthetic files of a config) in three layouts: `tml` (as the generator and
`tml-pq rewrite` write them: non-nullable, LZ4, no dictionaries of floats, vectors packed), `lists` (the same
with the vectors as fixed-size lists: `tml-pq rewrite --vectors list`) and `default` (what `pq.write_table`
writes by default, and Spark and pandas write much the same: nullable, Snappy, dictionaries tried on every
column, vectors as lists), same row groups. For each, in a rotated order `--repeat` times:
- `pyarrow`: thread CPU time of `ParquetFile.read_row_group` (one thread, the reader's columns) per row
  group, converted to ms per batch;
- `reader`: the CPU the reader's threads use per batch (`ParquetDataset.cpu_seconds_per_batch`) while
  `--batches` batches are drawn, shuffling as the config says.
Ratios per repeat are against `default` (below 1: cheaper), and tml / lists: what packing gains.

    python benchmarks/bench_layout.py [--configs local prod] [--repeat 4] [--batches 200]
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_recap  # the data, sizes and config helpers of the end-to-end benchmark


def default_copy(folder: str) -> str:
    """`folder`'s files rewritten by pq.write_table with its defaults and the same row groups."""
    import pyarrow.parquet as pq

    from tml.reader.layout import with_nullable
    from tml.reader.vectors import logical_schema, unpack_table

    target = folder + "-default"
    if os.path.isdir(target):
        return target
    os.makedirs(target + ".tmp", exist_ok=True)
    for path in sorted(glob.glob(os.path.join(folder, "*.parquet"))):
        parquet = pq.ParquetFile(path)
        nullable = with_nullable(logical_schema(parquet.schema_arrow), True)
        with pq.ParquetWriter(os.path.join(target + ".tmp", os.path.basename(path)), nullable) as writer:
            for group in range(parquet.num_row_groups):
                table = unpack_table(parquet.read_row_group(group))
                writer.write_table(table.cast(nullable), row_group_size=table.num_rows)
    os.rename(target + ".tmp", target)
    return target


def pyarrow_ms(folder: str, columns: list[str], batch_size: int) -> float:
    """One thread's CPU decoding the first file's first row groups, per batch."""
    import pyarrow.parquet as pq

    seconds, decoded = 0.0, 0
    parquet = pq.ParquetFile(sorted(glob.glob(os.path.join(folder, "*.parquet")))[0])
    for group in range(min(parquet.num_row_groups, 4)):
        start = time.thread_time()
        table = parquet.read_row_group(group, columns=columns, use_threads=False)
        seconds += time.thread_time() - start
        decoded += table.num_rows
    return seconds / decoded * batch_size * 1e3


def reader_ms(data, labels: list[str], batches: int) -> float:
    """The reader threads' CPU per batch while `batches` batches are drawn."""
    from tml.reader.dataset import build_dataset

    dataset = build_dataset(data, labels, 0, 1)
    iterator = iter(dataset)
    for _ in range(batches):
        next(iterator)
    iterator.close()
    return dataset.cpu_seconds_per_batch() * 1e3


def measure(name: str, args) -> None:
    from tml.projects.home.recap.build import task_names
    from tml.reader.ranking import ranking_decoder

    size = bench_recap.SIZES[name]
    rows, row_group, batch_size = size["rows"], size["row_group"], size["batch"]
    path = bench_recap.config_path(name)
    tml_folder = bench_recap.write_data(path, args.work, rows, row_group)
    folders = {
        "tml": tml_folder,
        "lists": bench_recap.list_copy(tml_folder),
        "default": default_copy(tml_folder),
    }
    config = bench_recap.bench_config(path, args.work)
    labels = task_names(config)
    data = {
        layout: config.train_data.model_copy(
            update={"inputs": os.path.join(folder, "*.parquet"), "global_batch_size": batch_size}
        )
        for layout, folder in folders.items()
    }
    columns = ranking_decoder(data["tml"], labels).columns()
    sizes = {
        layout: sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.parquet"))) / 2**20
        for layout, folder in folders.items()
    }
    figures: dict[tuple[str, str], list[float]] = {}
    layouts = list(folders)
    for repeat in range(args.repeat):
        for layout in layouts[repeat % 3 :] + layouts[: repeat % 3]:
            figures.setdefault(("pyarrow", layout), []).append(
                pyarrow_ms(folders[layout], columns, batch_size)
            )
            figures.setdefault(("reader", layout), []).append(reader_ms(data[layout], labels, args.batches))
    files = ", ".join(f"{sizes[layout]:.0f} MiB ({layout})" for layout in layouts)
    print(f"{name}.yaml: {rows:,} rows in row groups of {row_group:,}, batch {batch_size}, {args.repeat} "
          f"repeats; files {files}")  # fmt: skip

    def ratio(what: str, a: str, b: str) -> str:
        ratios = [x / y for x, y in zip(figures[(what, a)], figures[(what, b)], strict=True)]
        return f"{a} / {b} {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"

    for what in ("pyarrow", "reader"):
        medians = ", ".join(
            f"{layout} {statistics.median(figures[(what, layout)]):.2f}" for layout in layouts
        )
        print(f"  {what:7s} ms of CPU per batch: {medians}; {ratio(what, 'tml', 'default')}, "
              f"{ratio(what, 'lists', 'default')}, {ratio(what, 'tml', 'lists')}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["local", "prod"], choices=["local", "prod"])
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "tml-bench-recap"))
    args = parser.parse_args()

    import torch
    import torchrec  # noqa: F401  (before the reader's KeyedJaggedTensor import: torchrec's import order)

    torch.set_num_threads(1)
    for name in args.configs:
        measure(name, args)


if __name__ == "__main__":
    main()

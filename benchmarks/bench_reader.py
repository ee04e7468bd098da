"""Reader throughput against raw pyarrow, and peak memory reading 1x vs 10x the data.

Writes a segdense-like Parquet file (continuous floats, binary and discrete int lists, labels) to a temp
dir, then measures rows/s of `build_dataset` vs `ParquetFile.iter_batches` + the same Arrow -> torch
conversion on the same file (the reference, measured in the same run), and the peak RSS of a fresh process
reading the data for 1 epoch vs 10 epochs (bounded by the queue, so about equal).

Example:
    .venv/bin/python benchmarks/bench_reader.py --rows 200000 --num-workers 2
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

LABELS = ["is_favorited", "is_replied", "is_retweeted", "is_clicked"]


def write_file(path: Path, rows: int, continuous: int, binary: int, discrete: int, row_group: int) -> None:
    rng = np.random.default_rng(0)
    schema = None
    writer = None
    for start in range(0, rows, row_group):
        n = min(row_group, rows - start)
        columns = {
            "continuous": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.standard_normal(n * continuous, dtype=np.float32)), continuous
            ),
            "binary": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.integers(0, 2, n * binary, np.int8)), binary
            ),
            "discrete": pa.FixedSizeListArray.from_arrays(
                pa.array(rng.integers(0, 1000, n * discrete, np.int64)), discrete
            ),
            **{name: pa.array(rng.integers(0, 2, n, np.int8)) for name in LABELS},
        }
        table = pa.table(columns)
        if writer is None:
            schema = table.schema
            writer = pq.ParquetWriter(path, schema)
        writer.write_table(table, row_group_size=row_group)
    writer.close()


def config_for(path: Path, args, num_epochs: int):
    from tml.reader.config import DataConfig

    return DataConfig.model_validate(
        {
            "inputs": str(path),
            "global_batch_size": args.batch_size,
            "seg_dense_schema": {"features": [
                {"name": "continuous", "length": args.continuous},
                {"name": "binary", "length": args.binary},
                {"name": "discrete", "length": args.discrete, "dtype": "int64"},
            ]},
            "num_epochs": num_epochs,
            "num_workers": args.num_workers,
            "prefetch_batches": args.prefetch,
        }
    )  # fmt: skip


def _flat(column: pa.ChunkedArray | pa.Array, width: int, dtype: torch.dtype) -> torch.Tensor:
    values = column.flatten()
    tensor = (
        torch.from_dlpack(values)
        if values.type in (pa.float32(), pa.int64())
        else torch.from_numpy(values.to_numpy().astype(np.float32 if dtype == torch.float32 else np.int64))
    )
    return tensor.view(-1, width).to(dtype)


def raw_rows_per_s(path: Path, args) -> float:
    """The reference: pyarrow's own batch iterator and the minimal conversion, no checks, one thread."""
    start, rows = time.perf_counter(), 0
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=args.batch_size):
        dense = {
            "continuous": _flat(batch.column("continuous"), args.continuous, torch.float32),
            "binary": _flat(batch.column("binary"), args.binary, torch.float32),
            "discrete": _flat(batch.column("discrete"), args.discrete, torch.int64),
        }
        labels = torch.from_numpy(
            np.stack([batch.column(n).to_numpy() for n in LABELS], 1).astype(np.float32)
        )
        rows += labels.shape[0] + 0 * len(dense)
    return rows / (time.perf_counter() - start)


def reader_rows_per_s(path: Path, args) -> float:
    from tml.reader.dataset import build_dataset

    dataset = build_dataset(config_for(path, args, 1), LABELS, shuffle=False)
    start = time.perf_counter()
    rows = sum(batch.batch_size for batch in dataset)
    return rows / (time.perf_counter() - start)


def rss_child(path: str, epochs: int, args) -> None:
    from tml.reader.dataset import build_dataset

    before = _peak_rss_kib()
    rows = sum(batch.batch_size for batch in build_dataset(config_for(Path(path), args, epochs), LABELS))
    print(f"{before} {_peak_rss_kib()} {rows}")


def _peak_rss_kib() -> int:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--continuous", type=int, default=512)
    parser.add_argument("--binary", type=int, default=64)
    parser.add_argument("--discrete", type=int, default=32)
    parser.add_argument("--row-group", type=int, default=16_384)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="throughput runs each (best is kept)")
    parser.add_argument(
        "--rss-rows",
        type=int,
        default=100_000,
        help="rows of the file the RSS test reads (enough to fill the pipeline)",
    )
    parser.add_argument("--rss-child", nargs=2, metavar=("PATH", "EPOCHS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]), args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.parquet"
        write_file(path, args.rows, args.continuous, args.binary, args.discrete, args.row_group)
        size_mb = path.stat().st_size / 2**20
        raw = max(raw_rows_per_s(path, args) for _ in range(args.repeats))
        ours = max(reader_rows_per_s(path, args) for _ in range(args.repeats))
        print(
            f"file: {args.rows} rows, {size_mb:.0f} MiB, row groups of {args.row_group}, batch {args.batch_size}"
        )
        print(f"{'reader':<34}{'rows/s':>12}{'ratio':>8}")
        print(f"{'pyarrow iter_batches + to torch':<34}{raw:>12,.0f}{1.0:>8.2f}")
        print(f"{'tml build_dataset':<34}{ours:>12,.0f}{ours / raw:>8.2f}")

        small = Path(tmp) / "small.parquet"
        write_file(small, args.rss_rows, args.continuous, args.binary, args.discrete, args.row_group)
        passthrough = [f"--{k}={v}" for k, v in [("continuous", args.continuous), ("binary", args.binary),
                       ("discrete", args.discrete), ("batch-size", args.batch_size),
                       ("num-workers", args.num_workers), ("prefetch", args.prefetch)]]  # fmt: skip
        peaks = {}
        for epochs in (1, 10):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(small), str(epochs), *passthrough],
                check=True, capture_output=True, text=True,
            ).stdout.split()  # fmt: skip
            peaks[epochs] = (int(out[0]) / 1024, int(out[1]) / 1024, int(out[2]))
        print(f"\n{'peak RSS (fresh process)':<34}{'rows':>12}{'MiB':>8}{'ratio':>8}")
        for epochs, (_, peak, rows) in peaks.items():
            print(f"{f'{epochs}x data':<34}{rows:>12,}{peak:>8.0f}{peak / peaks[1][1]:>8.2f}")
        print(f"(after imports, before reading: {peaks[1][0]:.0f} MiB)")


if __name__ == "__main__":
    main()

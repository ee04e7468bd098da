"""The Parquet dataset: an iterable of RecapBatch-es for one rank, resumable by batch count.

Per batch (B = global_batch_size // world_size, T = len(label_names)): `dense` tensors [B, width],
`labels` / `weights` [B, T] float32, `ids` [B] int64, `sparse` a KeyedJaggedTensor or None. The last
batch of each epoch on a rank may be smaller; nothing is dropped. At construction every file's footer is
read (in parallel) to check its columns and count rows per row group; no data is decoded until iteration.

Example:
    dataset = build_dataset(config.train_data, label_names=["is_clicked"], rank=0, world_size=2)
    for batch in dataset:
        ...
    state = dataset.state_dict()          # {"batches_yielded": n}
    dataset.load_state_dict(state)        # the next iter() continues at batch n, nothing re-decoded
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import weakref
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tml.reader.arrow_to_torch import DataError, DecodePlan, check_schema
from tml.reader.config import DataConfig
from tml.reader.fs import list_inputs, open_input
from tml.reader.pipeline import BatchIterator, Source
from tml.reader.schema import resolve_dense_specs
from tml.reader.sharding import EpochPlan, Unit, epoch_plan
from tml.reader.sparse import SparseSpec

logger = logging.getLogger(__name__)

_FROM_CONFIG: Any = object()


def _read_footer(fs, path: str, plan: DecodePlan) -> pq.FileMetaData:
    with open_input(fs, path) as handle:
        parquet = pq.ParquetFile(handle)
        check_schema(parquet.schema_arrow, path, plan)
        return parquet.metadata


class ParquetDataset:
    """Iterable of RecapBatch-es over this rank's share of the files; built by `build_dataset`.

    Args:
        inputs: glob, directory, file or fsspec URL.
        decode: what to decode (see DecodePlan).
        batch_size: rows per batch on this rank.
        rank / world_size: this process's place among the readers.
        num_epochs: passes over the data, None for endless.
        seed / shuffle_units / buffer_size: shuffling (see tml.reader.sharding).
        num_workers / prefetch_batches: decoding threads and ready-batch queue size.
        skip_unreadable_files: skip (count, log) files that are not Parquet instead of raising.

    `stats` counts files, unreadable files, row groups, rows, rows decoded, batches and non-finite values.
    """

    def __init__(
        self,
        inputs: str,
        decode: DecodePlan,
        batch_size: int,
        rank: int,
        world_size: int,
        num_epochs: int | None,
        seed: int,
        shuffle_units: bool,
        buffer_size: int,
        num_workers: int,
        prefetch_batches: int,
        skip_unreadable_files: bool,
    ) -> None:
        fs, paths = list_inputs(inputs)
        self.stats: dict[str, int] = dict.fromkeys(
            ["files", "unreadable_files", "row_groups", "empty_row_groups", "rows", "rows_read", "batches",
             "nonfinite"], 0
        )  # fmt: skip
        footers = self._scan(fs, paths, decode, num_workers, skip_unreadable_files)
        units = []
        for index, footer in enumerate(footers):
            if footer is None:
                continue
            self.stats["files"] += 1
            for group in range(footer.num_row_groups):
                rows = footer.row_group(group).num_rows
                self.stats["row_groups"] += 1
                self.stats["empty_row_groups"] += rows == 0
                self.stats["rows"] += rows
                if rows:
                    units.append(Unit(index, group, rows))
        if num_epochs is None and self.stats["rows"] == 0:
            raise ValueError(
                f"inputs {inputs!r} hold no rows; with num_epochs None the reader would never yield"
            )
        if len(units) < world_size:
            message = (
                f"inputs {inputs!r} have {len(units)} non-empty row groups for {world_size} ranks: some "
                "ranks get no data (write smaller row groups or more files)"
            )
            if num_epochs is None:
                raise ValueError(message)
            logger.warning(message)
        self._units = units
        self._plans: dict[int, EpochPlan] = {}
        self._plans_lock = threading.Lock()
        self._batch_size = batch_size
        self._num_epochs = num_epochs
        self._plan_args = dict(
            rank=rank, world_size=world_size, seed=seed, shuffle_units=shuffle_units, buffer_size=buffer_size
        )
        self._source = Source(
            fs=fs,
            paths=tuple(paths),
            metadata=tuple(footers),
            decode=decode,
            batch_size=batch_size,
            num_epochs=num_epochs,
            plan_epoch=self.plan_epoch,
            num_workers=num_workers,
            prefetch_batches=prefetch_batches,
        )
        self._batches_yielded = 0
        self._start = 0
        self._iterator: weakref.ref | None = None

    def _scan(self, fs, paths, decode, num_workers, skip) -> list[pq.FileMetaData | None]:
        with concurrent.futures.ThreadPoolExecutor(max(num_workers, 4)) as pool:
            futures = [pool.submit(_read_footer, fs, path, decode) for path in paths]
            footers: list[pq.FileMetaData | None] = []
            for path, future in zip(paths, futures, strict=True):
                try:
                    footers.append(future.result())
                except (pa.ArrowException, OSError) as error:
                    if not skip:
                        raise DataError(f"{path}: not a readable Parquet file: {error}") from error
                    logger.warning("skipping unreadable file %s: %s", path, error)
                    self.stats["unreadable_files"] += 1
                    footers.append(None)
        return footers

    def plan_epoch(self, epoch: int) -> EpochPlan:
        """This rank's windows of `epoch` (the last few are cached: the driver and seeking both ask)."""
        with self._plans_lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = epoch_plan(self._units, epoch, **self._plan_args)
                if len(self._plans) >= 4:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[epoch] = plan
            return plan

    def num_batches(self) -> int | None:
        """Batches this rank yields over all epochs (None when endless)."""
        if self._num_epochs is None:
            return None
        return sum(self.plan_epoch(e).num_batches(self._batch_size) for e in range(self._num_epochs))

    def _position(self, batches: int) -> tuple[int, int] | None:
        """(epoch, rows to skip in it) of the `batches`-th batch, or None past the end."""
        epoch = 0
        while self._num_epochs is None or epoch < self._num_epochs:
            in_epoch = self.plan_epoch(epoch).num_batches(self._batch_size)
            if batches < in_epoch:
                return epoch, batches * self._batch_size
            batches -= in_epoch
            epoch += 1
        return None

    def __iter__(self) -> BatchIterator:
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()
        start, self._start = self._start, 0
        self._batches_yielded = start
        position = self._position(start)
        epoch, skip = position if position is not None else (self._num_epochs or 0, 0)
        iterator = BatchIterator(self._source, epoch, skip, self.stats, self._count_batch)
        self._iterator = weakref.ref(iterator)
        return iterator

    def _count_batch(self) -> None:
        self._batches_yielded += 1
        self.stats["batches"] += 1

    def state_dict(self) -> dict[str, int]:
        """Position of the current (or last) iterator: batches yielded since the stream's start."""
        return {"batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """The next `iter()` starts after `state["batches_yielded"]` batches, without decoding them."""
        count = state.get("batches_yielded") if isinstance(state, dict) else None
        if not isinstance(count, int) or count < 0:
            raise ValueError(f"reader state needs a non-negative int 'batches_yielded', got {state!r}")
        self._start = self._batches_yielded = count


def build_dataset(
    config: DataConfig,
    label_names: list[str],
    rank: int = 0,
    world_size: int = 1,
    apply_downsampling_weights: bool = False,
    num_epochs: int | None = _FROM_CONFIG,
    shuffle: bool = True,
) -> ParquetDataset:
    """A ParquetDataset for this rank (batch size global_batch_size // world_size).

    Args:
        config: the data section.
        label_names: label columns in batch order (matched by name).
        rank / world_size: this reader's share.
        apply_downsampling_weights: multiply weights by `label/pos_rate + (1-label)/neg_rate` per task.
        num_epochs: overrides config.num_epochs when given (None = endless).
        shuffle: False reads units and rows in file order (evaluation).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if config.global_batch_size % world_size:
        raise ValueError(
            f"global_batch_size {config.global_batch_size} is not divisible by the world size {world_size}"
        )
    duplicates = sorted({name for name in label_names if label_names.count(name) > 1})
    if duplicates:
        raise ValueError(f"label names repeat: {duplicates}")
    rates = None
    if apply_downsampling_weights:
        rates = []
        for name in label_names:
            task = config.tasks.get(name)
            rates.append((task.pos_downsampling_rate, task.neg_downsampling_rate) if task else (1.0, 1.0))
    decode = DecodePlan(
        dense=tuple(resolve_dense_specs(config)),
        labels=tuple(label_names),
        label_rates=tuple(rates) if rates is not None else None,
        weight_column=config.weight_column,
        id_columns=tuple(config.id_columns),
        sparse=tuple(SparseSpec(f.name, f.column, f.num_buckets) for f in config.sparse_features),
        nan_policy=config.preprocess.nan_policy,
    )
    return ParquetDataset(
        inputs=config.inputs,
        decode=decode,
        batch_size=config.global_batch_size // world_size,
        rank=rank,
        world_size=world_size,
        num_epochs=config.num_epochs if num_epochs is _FROM_CONFIG else num_epochs,
        seed=config.shuffle.seed,
        shuffle_units=shuffle and config.shuffle.shuffle_files,
        buffer_size=config.shuffle.buffer_size if shuffle else 0,
        num_workers=config.num_workers,
        prefetch_batches=config.prefetch_batches,
        skip_unreadable_files=config.skip_unreadable_files,
    )

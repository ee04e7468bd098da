"""The Parquet dataset: one rank's stream of batches over any table layout, resumable and checkable.

`ParquetDataset` is the engine: it resolves `inputs`, reads every footer (in parallel; the decoder checks
each file's columns there, before any training), deals non-empty row groups to ranks so every row is read
exactly once per epoch (tml.reader.sharding), and iterates in background threads (tml.reader.pipeline).
What a row becomes is the decoder's business (tml.reader.decoder); the engine knows nothing of labels,
dense features or KeyedJaggedTensors. Batches hold B = global_batch_size // world_size rows; the last
batch of each epoch on a rank may be smaller, nothing is dropped.

`build_dataset` is the ranking dataset (RecapBatch-es, tml.reader.ranking) of a `DataConfig` (training data);
`build_eval_dataset` that of a `ValidationDataConfig` (one pass in file order, reweighted by the inverse
downsampling rates).

Example:
    dataset = build_dataset(config.train_data, label_names=["is_clicked"], rank=0, world_size=2)
    for batch in dataset:
        ...
    state = dataset.state_dict(batches=120)   # plain JSON data: the data plan and the position
    dataset.load_state_dict(state)            # the next iter() continues after batch 120, nothing re-decoded
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import posixpath
import threading
import weakref
from typing import Any, Generic, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from tml.core.config.loader import ConfigError
from tml.core.cores import SHORT_SPIN, spin_wait_is_short
from tml.reader.config import DataConfig, DataSource, ValidationDataConfig
from tml.reader.decoder import DataError, Decoder
from tml.reader.fs import list_inputs, open_input
from tml.reader.pipeline import BatchIterator, Source, resolve_decoding
from tml.reader.ranking import ranking_decoder
from tml.reader.sharding import EpochPlan, Unit, epoch_plan
from tml.reader.state import DataPlan, InputFiles, Position, decode_state, encode_state, replan

logger = logging.getLogger(__name__)

_FROM_CONFIG: Any = object()
BatchT = TypeVar("BatchT")


def _read_footer(fs, path: str, decoder: Decoder) -> pq.FileMetaData:
    with open_input(fs, path) as handle:
        parquet = pq.ParquetFile(handle)
        decoder.check_schema(parquet.schema_arrow, path)
        return parquet.metadata


class ParquetDataset(Generic[BatchT]):
    """Iterable of the decoder's batches over this rank's share of the row groups.

    Args:
        inputs: glob, directory, file or fsspec URL (tml.reader.fs.list_inputs).
        decoder: what a row group becomes (tml.reader.decoder.Decoder).
        global_batch_size: rows per step over all ranks (divisible by world_size).
        rank / world_size: this process's place among the readers.
        num_epochs: passes over the data, None for endless.
        seed / shuffle_units / buffer_size: shuffling (see tml.reader.sharding).
        num_workers / prefetch_batches: decoding threads (0: the consuming thread decodes) and ready-batch
            queue size (of the threads).
        decode_process: a separate process decodes and shuffles, the consuming thread cuts batches
            (tml.reader.decode_process); None or False: not (tml.reader.pipeline.resolve_decoding).
        skip_unreadable_files: skip (count, log) files that are not Parquet instead of raising.

    `stats` counts files, unreadable files, row groups, rows, rows decoded, batches, and the decoder's own
    counters. `plan` is the data plan (tml.reader.state.DataPlan) that states record.
    """

    def __init__(
        self,
        inputs: str,
        decoder: Decoder[BatchT],
        global_batch_size: int,
        rank: int,
        world_size: int,
        num_epochs: int | None,
        seed: int,
        shuffle_units: bool,
        buffer_size: int,
        num_workers: int | None,
        prefetch_batches: int,
        skip_unreadable_files: bool,
        decode_process: bool | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if global_batch_size % world_size:
            raise ConfigError(
                f"global_batch_size {global_batch_size} is not divisible by the world size {world_size}: "
                f"use a multiple of {world_size}"
            )
        try:
            num_workers, decode_process = resolve_decoding(num_workers, decode_process)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if decode_process and not spin_wait_is_short() and rank == 0:
            logger.warning(
                "decode_process: torch's idle OpenMP threads spin for libgomp's default time and may starve "
                "the idle-priority decoding process; start the command with GOMP_SPINCOUNT=%d",
                SHORT_SPIN,
            )
        fs, paths = list_inputs(inputs)
        self.stats: dict[str, int] = dict.fromkeys(
            ["files", "unreadable_files", "row_groups", "empty_row_groups", "rows", "rows_read", "batches",
             *decoder.stat_names], 0
        )  # fmt: skip
        footers = self._scan(fs, paths, decoder, num_workers, skip_unreadable_files)
        units, readable, row_groups = [], [], []
        for index, footer in enumerate(footers):
            if footer is None:
                continue
            self.stats["files"] += 1
            readable.append(paths[index])
            row_groups.append([footer.row_group(group).num_rows for group in range(footer.num_row_groups)])
            for group, rows in enumerate(row_groups[-1]):
                self.stats["row_groups"] += 1
                self.stats["empty_row_groups"] += rows == 0
                self.stats["rows"] += rows
                if rows:
                    units.append(Unit(index, group, rows))
        if num_epochs is None and self.stats["rows"] == 0:
            raise ConfigError(
                f"inputs {inputs!r} hold no rows; with num_epochs None the reader would never yield"
            )
        if len(units) < world_size:
            message = (
                f"inputs {inputs!r} have {len(units)} non-empty row groups for {world_size} ranks: some "
                "ranks get no data (write smaller row groups or more files)"
            )
            if num_epochs is None:
                raise ConfigError(message)
            logger.warning(message)
        self.plan = DataPlan(
            inputs=InputFiles.of(readable, row_groups),
            global_batch_size=global_batch_size,
            world_size=world_size,
            rank=rank,
            num_epochs=num_epochs,
            seed=seed,
            shuffle_files=shuffle_units,
            buffer_size=buffer_size,
        )
        self._inputs = inputs
        self._units = units
        self._plans: dict[int, EpochPlan] = {}
        self._plans_lock = threading.Lock()
        self._epoch_rows: dict[int, int] = {}  # this rank's rows per epoch: one int each, kept for seeking
        self._batch_size = self.plan.batch_size
        self._num_epochs = num_epochs
        self._source = Source(
            fs=fs,
            paths=tuple(paths),
            metadata=tuple(footers),
            decoder=decoder,
            batch_size=self._batch_size,
            num_epochs=num_epochs,
            plan_epoch=self.plan_epoch,
            num_workers=num_workers,
            prefetch_batches=prefetch_batches,
            decode_process=decode_process,
        )
        self._start = Position(0, 0, 0)  # where the current (or next resumed) stream starts
        self._resume_next = False
        self._batches_yielded = 0
        self._iterator: weakref.ref | None = None
        if rank == 0:
            logger.info("%s", self.plan_summary())

    def _scan(self, fs, paths, decoder, num_workers, skip) -> list[pq.FileMetaData | None]:
        with concurrent.futures.ThreadPoolExecutor(max(num_workers, 4)) as pool:
            futures = [pool.submit(_read_footer, fs, path, decoder) for path in paths]
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

    @property
    def decoding(self) -> str | None:
        """Where rows are decoded when no thread of this process decodes beside the consuming one: "in the
        training thread" (num_workers 0) or "in a separate process" (decode_process); None for background
        threads. A training process then gives torch every core (tml.core.cpu_threads)."""
        if self._source.decode_process:
            return "in a separate process"
        return "in the training thread" if self._source.num_workers == 0 else None

    def cpu_seconds_per_batch(self) -> float | None:
        """CPU seconds the reading threads spend per batch (decoding, shuffling, batching; waiting costs
        none), averaged over the rows decoded so far by every iterator; None before the first row. A
        training process compares it with its step time (tml.core.cpu_threads)."""
        cpu = self._source.cpu
        return cpu.seconds / cpu.rows * self._batch_size if cpu.rows else None

    def plan_summary(self) -> str:
        """One paragraph: what this run reads (files, rows, folders, first and last files) and how."""
        files = self.plan.inputs
        names = [name for name, _ in files.files]
        shown = names if len(names) <= 6 else [*names[:3], "...", *names[-2:]]
        text = (
            f"inputs {self._inputs!r}: {len(names)} files, {files.num_rows} rows in {files.num_row_groups} "
            f"row groups under {files.root or '.'} ({', '.join(shown)})"
        )
        folders = collections.Counter(posixpath.dirname(name) or "." for name in names)
        if len(folders) > 1:
            most = [f"{folder}/ ({count})" for folder, count in folders.most_common(6)]
            text += (
                f"; files from {len(folders)} folders: {', '.join(most)}{', ...' if len(folders) > 6 else ''}"
            )
        if self.stats["unreadable_files"]:
            text += f"; {self.stats['unreadable_files']} unreadable files skipped"
        epochs = "endless" if self._num_epochs is None else f"{self._num_epochs} epochs"
        shuffle = f"shuffle seed {self.plan.seed}" if self.plan.shuffle_files else "file order"
        if self.plan.buffer_size:
            shuffle += f", rows shuffled in windows of {self.plan.buffer_size}"
        return (
            f"{text}; {self.plan.world_size} ranks x {self._batch_size} rows per batch, {epochs}, {shuffle}"
        )

    def plan_epoch(self, epoch: int) -> EpochPlan:
        """This rank's windows of `epoch` (the last few are cached: the driver and seeking both ask)."""
        with self._plans_lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = epoch_plan(
                    self._units,
                    epoch,
                    rank=self.plan.rank,
                    world_size=self.plan.world_size,
                    seed=self.plan.seed,
                    shuffle_units=self.plan.shuffle_files,
                    buffer_size=self.plan.buffer_size,
                )
                if len(self._plans) >= 4:
                    self._plans.pop(next(iter(self._plans)))
                self._plans[epoch] = plan
            return plan

    def num_batches(self) -> int | None:
        """Batches this rank yields over all epochs from the start (None when endless)."""
        if self._num_epochs is None:
            return None
        return sum(self.plan_epoch(e).num_batches(self._batch_size) for e in range(self._num_epochs))

    def _advance(self, start: Position, batches: int) -> Position:
        """The position `batches` batches after `start`; ValueError past the end of the stream."""
        epoch, row, left = start.epoch, start.row, batches
        while self._num_epochs is None or epoch < self._num_epochs:
            if epoch not in self._epoch_rows:
                self._epoch_rows[epoch] = self.plan_epoch(epoch).num_rows
            in_epoch = -(-max(0, self._epoch_rows[epoch] - row) // self._batch_size)
            if left < in_epoch:
                return Position(start.batches + batches, epoch, row + left * self._batch_size)
            left -= in_epoch
            epoch, row = epoch + 1, 0
        if left:
            raise ValueError(
                f"batches {start.batches + batches} is past the end of this rank's stream "
                f"({start.batches + batches - left} batches)"
            )
        return Position(start.batches + batches, epoch, 0)

    def __iter__(self) -> BatchIterator:
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()
        if not self._resume_next:
            self._start = Position(0, 0, 0)
        self._resume_next = False
        self._batches_yielded = self._start.batches
        epoch, row = self._start.epoch, self._start.row
        iterator = BatchIterator(self._source, epoch, row, self.stats, self._count_batch)
        self._iterator = weakref.ref(iterator)
        return iterator

    def _count_batch(self) -> None:
        self._batches_yielded += 1
        self.stats["batches"] += 1

    def state_dict(self, batches: int | None = None) -> dict[str, Any]:
        """The state after `batches` batches of the current (or last, or loaded) stream; JSON data.

        Args:
            batches: counted from the stream's start, resumed batches included (what a training loop
                that restored its count and kept counting has trained on); None: the batches yielded so far.
        """
        count = self._batches_yielded if batches is None else batches
        if count < self._start.batches:
            raise ValueError(
                f"batches {count} is before the start of this stream (it resumed after batch "
                f"{self._start.batches})"
            )
        return encode_state(self.plan, self._advance(self._start, count - self._start.batches))

    def load_state_dict(self, state: dict[str, Any], all_states: list[dict[str, Any]] | None = None) -> None:
        """The next `iter()` continues where `state` (from `state_dict`) left off, without decoding the past.

        Args:
            state: this rank's saved state; after a change of world size, the state of old rank 0.
            all_states: after a change of world size, the states of every old rank (old rank order): the
                re-plan then skips the rows they read in total rather than estimating it from `state`.

        Raises:
            ResumeError (a ValueError): the state cannot continue under this dataset's plan; the message
                names the setting (tml.reader.state). Changes it can bridge are logged.
        """
        saved, position = decode_state(state)
        all_saved = [decode_state(other) for other in all_states] if all_states is not None else None

        def old_share_rows(epoch: int, old_rank: int) -> int:
            # Only asked once inputs and shuffling are known to be unchanged: the same units, the old layout.
            plan = self.plan
            return epoch_plan(
                self._units,
                epoch,
                old_rank,
                saved.world_size,
                plan.seed,
                plan.shuffle_files,
                plan.buffer_size,
            ).num_rows

        position, notes = replan(saved, position, self.plan, all_saved, old_share_rows)
        for level, message in notes:
            logger.log(level, "rank %d: %s", self.plan.rank, message)
        self._start, self._resume_next = position, True
        self._batches_yielded = position.batches


def build_dataset(
    config: DataConfig,
    label_names: list[str],
    rank: int = 0,
    world_size: int = 1,
    num_epochs: int | None = _FROM_CONFIG,
    shuffle: bool = True,
) -> ParquetDataset:
    """A ParquetDataset of RecapBatch-es for this rank (batch size global_batch_size // world_size).

    Args:
        config: the training data section.
        label_names: label columns in batch order (matched by name).
        rank / world_size: this reader's share.
        num_epochs: overrides config.num_epochs when given (None = endless).
        shuffle: False reads units and rows in file order (`predict`, `compute-stats`).
    """
    return _ranking_dataset(
        config,
        ranking_decoder(
            config,
            label_names,
            id_columns=config.id_columns,
            sparse_stride=config.global_batch_size // world_size,
        ),
        rank,
        world_size,
        num_epochs=config.num_epochs if num_epochs is _FROM_CONFIG else num_epochs,
        seed=config.shuffle.seed,
        shuffle_units=shuffle and config.shuffle.shuffle_files,
        buffer_size=config.shuffle.buffer_size if shuffle else 0,
    )


def build_eval_dataset(
    config: ValidationDataConfig, label_names: list[str], rank: int = 0, world_size: int = 1
) -> ParquetDataset:
    """A validation partition for this rank: one pass per `iter()`, in file order, each task's weight
    multiplied by `label/pos_rate + (1-label)/neg_rate` so that metrics refer to the data before sampling."""
    return _ranking_dataset(
        config,
        ranking_decoder(
            config,
            label_names,
            apply_downsampling_weights=True,
            sparse_stride=config.global_batch_size // world_size,
        ),
        rank,
        world_size,
        num_epochs=1,
        seed=0,
        shuffle_units=False,
        buffer_size=0,
    )


def _ranking_dataset(
    config: DataSource,
    decoder: Decoder,
    rank: int,
    world_size: int,
    num_epochs: int | None,
    seed: int,
    shuffle_units: bool,
    buffer_size: int,
) -> ParquetDataset:
    return ParquetDataset(
        inputs=config.inputs,
        decoder=decoder,
        global_batch_size=config.global_batch_size,
        rank=rank,
        world_size=world_size,
        num_epochs=num_epochs,
        seed=seed,
        shuffle_units=shuffle_units,
        buffer_size=buffer_size,
        num_workers=config.num_workers,
        prefetch_batches=config.prefetch_batches,
        skip_unreadable_files=config.skip_unreadable_files,
        decode_process=config.decode_process,
    )

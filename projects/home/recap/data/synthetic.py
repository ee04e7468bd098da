"""Synthetic recap training data with real signal, in exactly the Parquet schema a DataConfig reads.

Columns written (N = rows; see docs/data.md):
- each segdense feature: a fixed-size list column (named by `renamed_features`) of its dtype; the role
  follows the logical name: `*continuous*` heavy-tailed values with NaN, `*binary*` 0/1, `*discrete*` (or
  any other int64 feature) categories in [0, 100), any other float32 feature an embedding vector;
- each `dense_columns` column: a scalar heavy-tailed column (float32 with NaN, or int64 counts);
- each sparse feature column: int64 ids in [0, min(num_buckets or 100000, 1000000)), power-law popular;
- each sparse continuous feature: a map<int64, float32> column, or the list<int64> ids column and the
  list<float32> values column, with a few distinct ids per row in [0, min(num_buckets, 1000000)) and
  zero-inflated heavy-tailed values;
- each `id_columns` column: int64 ids (one column when it is also a sparse column);
- one int64 0/1 label column per `tasks` key, drawn from the label function in labels.py;
- `weight_column` (float32 ones) when set.
Every column is non-nullable and the files have tml.reader.layout's layout (LZ4, no float dictionaries).
With an `Affinity` (Python only), a user id column and an author id column take their ids from the rows of
given latent factors, and the labels depend on the pair's affinity (the factors' dot product): e.g. the
factors of a synthetic TwHIN graph (projects/twhin/data/synthetic.py), so that vectors learned from that
graph tell the ranker about the labels (benchmarks/bench_twhin_to_recap.py).
Rows of a task with downsampling rates < 1 are kept with probability max over tasks of
(pos_downsampling_rate if label else neg_downsampling_rate), as the original's data was sampled (rows with
no engagement kept at the negative rate); the written counts then fall below `num_examples`.

Example:
    auc = generate(config.train_data, num_examples=100_000, output_dir="data/train", seed=0)
    # {"recap.engagement.is_favorited": 0.83, ...}, also in data/train/oracle_auc.json
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tml.core.config.loader import ConfigError
from tml.projects.home.recap.data.features import (
    LATENT_DIM,
    BinaryBlock,
    ContinuousBlock,
    DiscreteBlock,
    EmbeddingBlock,
    IdColumn,
    SparseContinuousBlock,
)
from tml.projects.home.recap.data.labels import SHARED_LATENT, AucHistogram, LabelModel, base_rate
from tml.reader.config import DataConfig, DataSource
from tml.reader.layout import parquet_writer, with_nullable
from tml.reader.schema import resolve_dense_specs

DEFAULT_VOCAB = 100_000
MAX_VOCAB = 1_000_000
CALIBRATION_ROWS = 50_000


@dataclasses.dataclass
class _Dense:
    """One dense source: a list column or a group of scalar columns, and the block that draws it."""

    name: str
    columns: tuple[str, ...]
    is_list: bool
    dtype: str
    width: int
    block: ContinuousBlock | BinaryBlock | DiscreteBlock | EmbeddingBlock


@dataclasses.dataclass
class _World:
    """Everything fixed by the seed: feature distributions and the label model."""

    dense: list[_Dense]
    sparse: dict[str, IdColumn]
    ids: dict[str, IdColumn]
    tasks: list[str]
    rates: np.ndarray  # [2, T]: neg / pos keep rates
    weight_column: str | None
    labels: LabelModel
    sparse_continuous: list[tuple[tuple[str, ...], SparseContinuousBlock]] = dataclasses.field(
        default_factory=list
    )  # (columns: the map, or ids and values; block)
    affinity: Affinity | None = None


@dataclasses.dataclass(frozen=True)
class Affinity:
    """A user-author affinity that enters every task's label logit (labels.py, component `affinity`).

    The affinity of a row is `user_factors[user] . author_factors[author] + author_bias[author]`, with
    `user` and `author` the row's ids in `user_column` / `author_column` (each an `id_columns` column or a
    sparse feature's column), which are then drawn in [0, rows of their factors) (power-law popular, as
    every id column). It is standardized on the calibration sample and weighs `weight` in the signal (the
    numeric features weigh 1, categorical 0.5, sparse ids 0.7) before the signal is scaled to its fixed
    std.

    Example (the graph's `fav` score: z_u . (z_a + t_fav) + b_a):
        graph = latent_graph({"user": 5000, "author": 2000}, 1, seed=0)
        Affinity("meta.user_id", graph.factors["user"], "meta.author_id",
                 graph.factors["author"] + graph.translations[0], graph.biases["author"])
    """

    user_column: str
    user_factors: np.ndarray  # [users, D]
    author_column: str
    author_factors: np.ndarray  # [authors, D]
    author_bias: np.ndarray | None = None  # [authors]
    weight: float = 1.0

    def score(self, users: np.ndarray, authors: np.ndarray) -> np.ndarray:
        out = np.einsum("nd,nd->n", self.user_factors[users], self.author_factors[authors])
        if self.author_bias is not None:
            out = out + self.author_bias[authors]
        return out.astype(np.float32)


def _affinity_vocab(affinity: Affinity, vocab: dict[str, int], id_columns: Sequence[str]) -> dict[str, int]:
    """Sets the vocab of the affinity's sparse columns to their factor rows; returns that of its id
    columns."""
    if affinity.user_column == affinity.author_column:
        raise ConfigError(f"affinity: user_column and author_column are both {affinity.user_column!r}")
    if (
        affinity.user_factors.shape[1:] != affinity.author_factors.shape[1:]
        or affinity.user_factors.ndim != 2
    ):
        raise ConfigError(
            f"affinity: user_factors {affinity.user_factors.shape} and author_factors "
            f"{affinity.author_factors.shape} need the shapes [users, D] and [authors, D]"
        )
    if affinity.author_bias is not None and affinity.author_bias.shape != affinity.author_factors.shape[:1]:
        raise ConfigError(
            f"affinity: author_bias {affinity.author_bias.shape} needs one value per author "
            f"({len(affinity.author_factors)})"
        )
    sizes = {}
    for column, rows in (
        (affinity.user_column, len(affinity.user_factors)),
        (affinity.author_column, len(affinity.author_factors)),
    ):
        if column in vocab:
            if rows > vocab[column]:
                raise ConfigError(
                    f"affinity: column {column!r} has {rows} factor rows but its sparse features take "
                    f"{vocab[column]} ids (num_buckets): ids past it would not be embedded"
                )
            vocab[column] = rows
        elif column in id_columns:
            sizes[column] = rows
        else:
            raise ConfigError(
                f"affinity: column {column!r} is neither a sparse feature's column nor in id_columns "
                f"{list(id_columns)}"
            )
    return sizes


def _affinity_values(world: _World, sample: dict) -> np.ndarray | None:
    if world.affinity is None:
        return None
    columns = dict(zip([*world.sparse, *world.ids], [*sample["sparse"], *sample["ids"]], strict=True))
    return world.affinity.score(columns[world.affinity.user_column], columns[world.affinity.author_column])


def _make_block(
    rng: np.random.Generator, spec
) -> ContinuousBlock | BinaryBlock | DiscreteBlock | EmbeddingBlock:
    if not spec.is_list:
        return ContinuousBlock.create(rng, spec.length, np.arange(spec.length))
    visible = np.arange(spec.truncation if spec.truncation is not None else spec.length)
    if spec.keep is not None:
        visible = visible[spec.keep]
    name = spec.name.lower()
    if "continuous" in name:
        return ContinuousBlock.create(rng, spec.length, visible)
    if "binary" in name:
        return BinaryBlock.create(rng, spec.length, visible)
    if "discrete" in name or spec.dtype == "int64":
        return DiscreteBlock.create(rng, spec.length, visible)
    return EmbeddingBlock.create(rng, spec.length)


def _check_columns(config: DataSource, dense: list[_Dense], id_columns: Sequence[str]) -> None:
    """Every file column has one role (a sparse feature may share its column with an id column)."""
    roles: dict[str, str] = {}

    def claim(column: str, role: str) -> None:
        if column in roles and {roles[column], role} != {"sparse feature", "id column"}:
            raise ConfigError(f"column {column!r} is both a {roles[column]} and a {role}; give it one role")
        roles.setdefault(column, role)

    for source in dense:
        for column in source.columns:
            claim(column, f"dense feature ({source.name})")
    for feature in config.sparse_features:
        claim(feature.column, "sparse feature")
    for feature in config.sparse_continuous_features:
        for column in feature.columns():
            claim(column, "sparse continuous feature")
    for column in dict.fromkeys(id_columns):
        claim(column, "id column")
    for task in config.tasks:
        claim(task, "label (tasks key)")
    if config.weight_column is not None:
        claim(config.weight_column, "weight_column")


def build_world(
    config: DataSource,
    seed: int,
    id_columns: Sequence[str] | None = None,
    affinity: Affinity | None = None,
) -> _World:
    """The generating model of `config` for `seed` (deterministic), calibrated on a fresh sample; id columns
    `id_columns` (None: the training section's own); `affinity`: see `Affinity`."""
    if id_columns is None:
        id_columns = config.id_columns if isinstance(config, DataConfig) else []
    rng = np.random.default_rng([seed, 0])
    dense = [
        _Dense(spec.name, spec.columns, spec.is_list, spec.dtype, spec.length, _make_block(rng, spec))
        for spec in resolve_dense_specs(config)
    ]
    _check_columns(config, dense, id_columns)
    vocab: dict[str, int] = {}
    for feature in config.sparse_features:
        # Several features may read one column with different bucket counts: keep ids within all of them.
        size = min(feature.num_buckets or DEFAULT_VOCAB, MAX_VOCAB)
        vocab[feature.column] = min(vocab.get(feature.column, size), size)
    id_vocab = _affinity_vocab(affinity, vocab, id_columns) if affinity is not None else {}
    sparse = {column: IdColumn.create(rng, size) for column, size in vocab.items()}
    ids = {
        c: IdColumn.create(rng, id_vocab.get(c, DEFAULT_VOCAB))
        for c in dict.fromkeys(id_columns)
        if c not in sparse
    }
    continuous = [
        (tuple(f.columns()), SparseContinuousBlock.create(rng, min(f.num_buckets, MAX_VOCAB)))
        for f in config.sparse_continuous_features
    ]
    tasks = list(config.tasks)
    rates = np.array(
        [[config.tasks[t].neg_downsampling_rate, config.tasks[t].pos_downsampling_rate] for t in tasks]
    )
    numeric = [s for s in dense if not isinstance(s.block, DiscreteBlock)]
    discrete = [s for s in dense if isinstance(s.block, DiscreteBlock)]
    labels = LabelModel.create(
        rng,
        phi_widths=[_signal_width(s.block) for s in numeric] + [len(b.informative) for _, b in continuous],
        discrete_cards=[list(s.block.cardinality[s.block.informative]) for s in discrete],
        sparse_ranks=[column.popularity_rank() for column in sparse.values()],
        num_tasks=len(tasks),
        affinity_weight=affinity.weight if affinity is not None else None,
    )
    world = _World(
        dense, sparse, ids, tasks, rates.T.reshape(2, len(tasks)), config.weight_column, labels, continuous
    )
    world.affinity = affinity
    if tasks:
        # Drawn in slices and reduced to the label inputs at once: wide schemas stay within memory.
        calibration_rng = np.random.default_rng([seed, 1])
        step = _slice_rows(world)
        parts = [
            _label_inputs(
                world, _sample_features(world, calibration_rng, min(step, CALIBRATION_ROWS - start))
            )
            for start in range(0, CALIBRATION_ROWS, step)
        ]
        phi, discrete, sparse = (
            [np.concatenate(arrays) for arrays in zip(*group, strict=True)]
            for group in list(zip(*parts, strict=True))[:3]
        )
        u = np.concatenate([part[3] for part in parts])
        scores = np.concatenate([part[4] for part in parts]) if affinity is not None else None
        labels.calibrate(phi, discrete, sparse, u, base_rates=[base_rate(t) for t in tasks], affinity=scores)
    return world


def _slice_rows(world: _World) -> int:
    """Rows drawn at once: about 8M values, so temporaries stay near 32 MB each."""
    width = sum(source.width for source in world.dense)
    return max(256, (1 << 23) // max(width, 1))


def _signal_width(block) -> int:
    return block.projection.shape[1] if isinstance(block, EmbeddingBlock) else len(block.informative)


def _sample_features(world: _World, rng: np.random.Generator, rows: int) -> dict:
    h = rng.standard_normal((rows, LATENT_DIM), dtype=np.float32)
    dense = [source.block.sample(rng, h) for source in world.dense]
    sparse = [column.sample(rng, rows) for column in world.sparse.values()]
    ids = [column.sample(rng, rows) for column in world.ids.values()]
    u = rng.standard_normal(rows).astype(np.float32)
    continuous = [block.sample(rng, h) for _, block in world.sparse_continuous]
    return {"dense": dense, "sparse": sparse, "ids": ids, "u": u, "sparse_continuous": continuous}


def _label_inputs(world: _World, sample: dict) -> tuple:
    phi, discrete = [], []
    for source, values in zip(world.dense, sample["dense"], strict=True):
        if isinstance(source.block, DiscreteBlock):
            discrete.append(values[:, source.block.informative])
        else:
            phi.append(source.block.signal(values))
    for (_, block), values in zip(world.sparse_continuous, sample["sparse_continuous"], strict=True):
        phi.append(block.signal(values))
    return phi, discrete, sample["sparse"], sample["u"], _affinity_values(world, sample)


def _dense_arrays(source: _Dense, values: np.ndarray) -> list[pa.Array]:
    if source.dtype == "int64":
        values = np.nan_to_num(values, nan=0.0).astype(np.int64) if values.dtype != np.int64 else values
    else:
        values = values.astype(np.float32, copy=False)
    if source.is_list:
        return [pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])]
    return [pa.array(np.ascontiguousarray(values[:, j])) for j in range(values.shape[1])]


def _sample_chunk(world: _World, rng: np.random.Generator, rows: int, auc: AucHistogram | None) -> pa.Table:
    sample = _sample_features(world, rng, rows)
    columns: dict[str, pa.Array] = {}
    for source, values in zip(world.dense, sample["dense"], strict=True):
        columns.update(zip(source.columns, _dense_arrays(source, values), strict=True))
    keep = None
    if world.tasks:
        inputs = _label_inputs(world, sample)
        logits = world.labels.logits(*inputs)
        labels = rng.random(logits.shape, dtype=np.float32) < 1.0 / (1.0 + np.exp(-logits))
        # The oracle ranks by what the features can tell: the logit without the unobserved factor u
        # (E_u[sigmoid(z + c u)] is increasing in z, so this is the AUC of the best possible model).
        observable = logits - SHARED_LATENT * inputs[3][:, None]
        if (world.rates < 1).any():
            keep_rate = np.where(labels, world.rates[1], world.rates[0]).max(axis=1)
            keep = rng.random(rows) < keep_rate
            observable, labels = observable[keep], labels[keep]
        if auc is not None:
            auc.add(observable, labels)
        for index, task in enumerate(world.tasks):
            columns[task] = pa.array(labels[:, index].astype(np.int64))
    for column, values in zip([*world.sparse, *world.ids], [*sample["sparse"], *sample["ids"]], strict=True):
        columns[column] = pa.array(values)
    for (names, _), (offsets, ids, values) in zip(
        world.sparse_continuous, sample["sparse_continuous"], strict=True
    ):
        offsets = pa.array(offsets.astype(np.int32))
        if len(names) == 1:
            columns[names[0]] = pa.MapArray.from_arrays(offsets, pa.array(ids), pa.array(values))
        else:
            columns[names[0]] = pa.ListArray.from_arrays(offsets, pa.array(ids))
            columns[names[1]] = pa.ListArray.from_arrays(offsets, pa.array(values))
    if keep is not None:
        mask = pa.array(keep)
        columns = {
            name: (array if name in world.tasks else array.filter(mask)) for name, array in columns.items()
        }
    if world.weight_column is not None:
        kept = int(keep.sum()) if keep is not None else rows
        columns[world.weight_column] = pa.array(np.ones(kept, dtype=np.float32))
    return pa.table(columns)


def _split(rows: int, step: int) -> list[int]:
    return [min(step, rows - start) for start in range(0, rows, step)] or [0]


def generate(
    config: DataSource,
    num_examples: int,
    output_dir: str,
    seed: int = 0,
    num_files: int = 4,
    rows_per_row_group: int = 16384,
    progress: bool = True,
    split: int = 0,
    id_columns: Sequence[str] | None = None,
    affinity: Affinity | None = None,
) -> dict[str, float]:
    """Write `num_examples` rows (before downsampling) as `num_files` Parquet files; return oracle AUCs.

    Args:
        config: the data section the files are for (its schema, sparse features, ids, tasks, weight).
        num_examples: rows drawn, split evenly over the files.
        output_dir: created if missing; files `part-NNNNN.parquet` and `oracle_auc.json`.
        seed: everything derives from it; the same arguments write the same files.
        num_files: number of shards.
        rows_per_row_group: rows drawn and written at a time (bounds memory).
        progress: show progress (a bar on a terminal, log lines otherwise).
        split: which sample of the same generating model to draw: train and validation data share `seed`
            (so they share the label function) and differ in `split`.
        id_columns: id columns written (None: the training section's own `id_columns`).
        affinity: a user-author affinity in the labels (`Affinity`); None: none.

    Returns:
        task -> AUC of the true probability against the drawn labels (the best any model can reach).
    """
    if num_examples < 0 or num_files < 1 or rows_per_row_group < 1:
        raise ConfigError(
            f"need num_examples >= 0, num_files >= 1, rows_per_row_group >= 1; got {num_examples}, "
            f"{num_files}, {rows_per_row_group}"
        )
    world = build_world(config, seed, id_columns, affinity)
    auc = AucHistogram(len(world.tasks))
    os.makedirs(output_dir, exist_ok=True)
    bar = None
    if progress:
        from tml.ml_logging.progress import progress_bar

        bar = progress_bar(num_examples, "generate")
    for file_index in range(num_files):
        rows = num_examples // num_files + (1 if file_index < num_examples % num_files else 0)
        path = os.path.join(output_dir, f"part-{file_index:05d}.parquet")
        writer = None
        step = _slice_rows(world)
        for chunk_index, start in enumerate(range(0, max(rows, 1), rows_per_row_group)):
            chunk_rows = min(rows_per_row_group, rows - start)
            table = pa.concat_tables(
                _sample_chunk(
                    world, np.random.default_rng([seed, 2, split, file_index, chunk_index, part]), size, auc
                )
                for part, size in enumerate(_split(chunk_rows, step))
            )
            if writer is None:
                schema = with_nullable(table.schema, False)  # the generator writes no nulls
                writer = parquet_writer(path, schema)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
            if bar is not None:
                bar.update(chunk_rows)
        writer.close()
    if bar is not None:
        bar.close()
    result = dict(zip(world.tasks, auc.auc(), strict=True))
    with open(os.path.join(output_dir, "oracle_auc.json"), "w") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
    return result


@dataclasses.dataclass(frozen=True)
class SplitSummary:
    name: str
    folder: str
    drawn: int  # rows drawn from the generating model
    kept: int  # rows written: drawn minus those the split's downsampling rates dropped
    oracle_auc: dict[str, float]


def generate_splits(
    train: DataConfig,
    validation: dict[str, DataSource],
    num_examples: int,
    output: str,
    seed: int = 0,
    validation_fraction: float = 0.2,
    affinity: Affinity | None = None,
) -> list[SplitSummary]:
    """`tml-recap generate-data`: `<output>/train` and `<output>/<partition>` for every validation partition,
    each in its own section's schema and downsampling.

    Every split shares the seed, hence the label function, and draws different rows (`split`); every split
    holds train_data's id columns (`predict` reads them from whatever it scores). A validation partition
    draws `num_examples * validation_fraction` rows (at least one). `affinity` (`Affinity`) is shared by
    every split.
    """
    if not 0 < validation_fraction <= 1:
        raise ValueError(f"--validation-fraction must be in (0, 1], got {validation_fraction}")
    splits = [("train", train, num_examples)]
    splits += [
        (name, data, max(1, int(num_examples * validation_fraction))) for name, data in validation.items()
    ]
    summaries = []
    for index, (name, data, count) in enumerate(splits):
        folder = os.path.join(output, name)
        oracle = generate(
            data, count, folder, seed=seed, split=index, id_columns=train.id_columns, affinity=affinity
        )
        kept = sum(
            pq.ParquetFile(os.path.join(folder, entry)).metadata.num_rows
            for entry in os.listdir(folder)
            if entry.endswith(".parquet")
        )
        summaries.append(SplitSummary(name, folder, count, kept, oracle))
    return summaries


def generate_data(
    config, num_examples: int, output: str, seed: int = 0, validation_fraction: float = 0.2
) -> None:
    """`tml-recap generate-data`: `generate_splits` for a RecapConfig, logging what each split holds."""
    from tml.ml_logging.log import get_logger

    logger = get_logger(__name__)
    for split in generate_splits(
        config.train_data, config.validation_data, num_examples, output, seed, validation_fraction
    ):
        oracle = ", ".join(f"{task.rsplit('.', 1)[-1]} {auc:.3f}" for task, auc in split.oracle_auc.items())
        logger.info("%s: %d rows in %s (%d drawn)", split.name, split.kept, split.folder, split.drawn)
        logger.info("%s: oracle AUC %s", split.name, oracle)

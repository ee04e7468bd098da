"""The discretizer: continuous values -> percentile bins -> bin ids that survive re-calibration.

A **feature** is one column of a dense tensor (`continuous[17]`: the tensor's logical name and the column's
index in the file's list, before truncation and masks, so that masking other columns keeps its key; a
`dense_columns` group member is `<group>.<column>`) or one id of a sparse continuous feature
(`engagement_counts:42`, the id after `num_buckets`). `tml-recap calibrate-discretizer` cuts each feature
at the quantiles `i / num_bins` of a sample of train_data (tied quantiles merge into one boundary) and
writes the boundaries file (`write_boundaries`; format below).

**Bin ids.** A bin is identified by its feature and the quantile level at which it starts: `level 0` below
the first boundary, then the level `i / num_bins` (as a reduced fraction) of each boundary; NaN (under
`nan_policy: keep`) has a bin of its own, `missing` (+inf falls into the last bin, -inf into the first).
The id is the 64-bit FNV-1a hash of `"<feature>|<level>"` (e.g. `"continuous[17]|3/16"`, `"continuous[17]|missing"`) modulo `2**out_bits`,
as TWML's hashing discretizer did. Re-calibrating on new data moves the boundaries with the data, and
every bin whose feature and starting level are unchanged - "the values between the 3rd and the 4th
16-quantile of feature 17" - keeps its id, so warm-started weights keep their meaning; only bins whose
starting level moved (ties appearing or vanishing) and new features get new ids. Different (feature,
bin) pairs may share an id (hashing); `build_discretizer` logs how many.

Nothing is hashed at run time: at build every (feature, bin) id is precomputed into an int64 table
`[features, boundaries + 2]` next to the boundaries `[features, boundaries]` (+inf padded), so the
forward is a comparison with the boundaries and a lookup (torch.export and AOTInductor take it as it is).

Boundaries file (JSON):
    {"format": "tml-discretizer-boundaries", "version": 1,
     "calibration": {"num_bins": 16, "relative_accuracy": 0.005, "max_rows": 1000000},
     "inputs": [{"name": "continuous", "keys": ["continuous[0]", ...]},
                {"name": "engagement_counts", "num_buckets": 256}],
     "rows": 100000, "row_groups": 8,
     "features": {"continuous[0]": {"levels": [1, 2, ...], "boundaries": [0.0, 3.0, ...], "count": 99000},
                  "engagement_counts:42": {...}, ...}}

Shapes: B = batch, W = columns of a dense tensor, N = ids of a sparse feature in the batch.

Example:
    inputs = discretized_inputs(["continuous"], config.train_data)
    discretizer = build_discretizer(inputs, read_boundaries(path), out_bits=16, num_bins=16)
    bins = discretizer(batch.dense, batch.sparse_continuous)   # [(ids [B, W], None) or (ids [N], offsets [B + 1])]
"""

from __future__ import annotations

import dataclasses
import json
import math

import fsspec
import numpy as np
import pyarrow as pa
import torch
from torch import nn

from tml.core.config.loader import ConfigError
from tml.ml_logging.log import get_logger
from tml.reader.batch import SparseValues
from tml.reader.config import DataSource
from tml.reader.fs import write_text
from tml.reader.schema import DenseSpec, resolve_dense_specs
from tml.reader.sparse import stable_hash

logger = get_logger(__name__)

FORMAT = "tml-discretizer-boundaries"
VERSION = 1
KEY = "model.discretizer"


@dataclasses.dataclass(frozen=True)
class DiscretizedInput:
    """One discretized input: a dense tensor (`keys`: the feature of each column) or a sparse continuous
    feature (`num_buckets` ids, feature `<name>:<id>` each)."""

    name: str
    keys: tuple[str, ...] | None = None
    num_buckets: int | None = None

    def describe(self) -> dict:
        return (
            {"name": self.name, "keys": list(self.keys)}
            if self.keys is not None
            else {
                "name": self.name,
                "num_buckets": self.num_buckets,
            }
        )


def column_keys(spec: DenseSpec) -> tuple[str, ...]:
    """The feature key of every column of a dense tensor (module docstring)."""
    if not spec.is_list:
        return tuple(f"{spec.name}.{column}" for column in spec.columns)
    indices = np.arange(spec.truncation if spec.truncation is not None else spec.length)
    if spec.keep is not None:
        indices = indices[spec.keep]
    return tuple(f"{spec.name}[{int(i)}]" for i in indices)


def discretized_inputs(features: list[str], data: DataSource) -> list[DiscretizedInput]:
    """The inputs `model.discretizer.features` names, resolved against the data section."""
    from tml.projects.home.recap.config.discretizer import MAX_DISCRETIZED_IDS

    dense = {spec.name: spec for spec in resolve_dense_specs(data)}
    sparse = {f.name: f for f in data.sparse_continuous_features}
    inputs = []
    for name in features:
        if name in dense:
            if dense[name].dtype != "float32":
                raise ConfigError(
                    f"{KEY}.features: dense tensor {name!r} is {dense[name].dtype}; only float32 tensors "
                    "hold continuous values (categories go to small_embeddings)"
                )
            inputs.append(DiscretizedInput(name, keys=column_keys(dense[name])))
        elif name in sparse:
            buckets = sparse[name].num_buckets
            if buckets > MAX_DISCRETIZED_IDS:
                raise ConfigError(
                    f"{KEY}.features: sparse continuous feature {name!r} has num_buckets {buckets}; every id "
                    f"gets its own boundaries, so at most {MAX_DISCRETIZED_IDS}"
                )
            inputs.append(DiscretizedInput(name, num_buckets=buckets))
        else:
            raise ConfigError(
                f"{KEY}.features: {name!r} is neither a float32 dense tensor ({sorted(dense)}) nor a "
                f"sparse continuous feature ({sorted(sparse)}) of the data"
            )
    return inputs


def level_text(level: int | None, num_bins: int) -> str:
    """The bin's starting quantile level as a reduced fraction ("0", "3/16", "1/2"), or "missing"."""
    if level is None:
        return "missing"
    if level == 0:
        return "0"
    divisor = math.gcd(level, num_bins)
    return f"{level // divisor}/{num_bins // divisor}"


def hash_ids(texts: list[str], out_bits: int) -> np.ndarray:
    """FNV-1a 64 of each `"<feature>|<level>"` text modulo 2**out_bits, int64."""
    if not texts:
        return np.zeros(0, dtype=np.int64)
    return stable_hash(pa.array(texts, pa.large_string())) & ((1 << out_bits) - 1)


def read_boundaries(path: str) -> dict:
    """The boundaries file at `path`; errors name the config key and say how to write it."""
    where = f"{KEY}.boundaries_path {path!r}"
    try:
        with fsspec.open(path, "r") as f:
            document = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{where}: no such file; write it with `tml-recap calibrate-discretizer --config <this config>`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{where}: not a JSON boundaries file ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ConfigError(f"{where}: not a boundaries file written by `tml-recap calibrate-discretizer`")
    if document.get("version") != VERSION:
        raise ConfigError(f"{where}: version {document.get('version')!r}, this tml reads version {VERSION}")
    return document


def write_boundaries(path: str, document: dict) -> None:
    """Write the boundaries file (a local file is replaced atomically)."""
    write_text(path, json.dumps(document, indent=None, separators=(",", ":")))


def check_calibration(document: dict, path: str, calibration: dict, inputs: list[DiscretizedInput]) -> None:
    """The file must come from this config's calibration settings and hold every input, as configured."""
    where = f"{KEY}.boundaries_path {path!r}"
    saved = document.get("calibration", {})
    for name, value in calibration.items():
        if saved.get(name) != value:
            raise ConfigError(
                f"{where} was calibrated with {name} {saved.get(name)!r}, but {KEY}.{name} is {value!r}: run "
                "`tml-recap calibrate-discretizer` again (--overwrite replaces the file)"
            )
    held = {entry["name"]: entry for entry in document.get("inputs", [])}
    for item in inputs:
        entry = held.get(item.name)
        if entry is None:
            raise ConfigError(
                f"{where} holds the bins of {sorted(held)}, not of {item.name!r} ({KEY}.features): run "
                "`tml-recap calibrate-discretizer` again for these features"
            )
        if entry != item.describe():
            what = (
                f"num_buckets {entry.get('num_buckets')}, the data has {item.num_buckets}"
                if item.keys is None
                else "other columns than the data's (truncation, masks or schema changed)"
            )
            raise ConfigError(
                f"{where}: {item.name!r} was calibrated with {what}: run `tml-recap calibrate-discretizer` again"
            )


def _tables(
    keys: list[str], features: dict, num_bins: int, out_bits: int
) -> tuple[np.ndarray, np.ndarray, list]:
    """(boundaries [F, K] float32 +inf padded, bin ids [F, K + 2] int64, the texts hashed) of the features
    `keys` (those absent from `features` have a single bin)."""
    entries = [features.get(key) for key in keys]
    # At least one (+inf) column, so that searchsorted always has a row to search.
    width = max([len(e["boundaries"]) for e in entries if e is not None] + [1])
    boundaries = np.full((len(keys), width), np.inf, dtype=np.float32)
    counts = np.zeros(len(keys), dtype=np.int64)
    texts = []
    for row, (key, entry) in enumerate(zip(keys, entries, strict=True)):
        levels = [] if entry is None else entry["levels"]
        if levels:
            boundaries[row, : len(levels)] = entry["boundaries"]
        counts[row] = len(levels)
        texts += [f"{key}|{level_text(level, num_bins)}" for level in (0, *levels, None)]
    # Row r's texts start at starts[r]: bin 0, one bin per boundary, missing. Column c <= K takes bin
    # min(c, own boundaries) (the +inf padding is reached only by +inf: the feature's last bin); column
    # K + 1 is the missing bin.
    starts = np.concatenate([[0], np.cumsum(counts + 2)[:-1]]).astype(np.int64)
    index = starts[:, None] + np.minimum(np.arange(width + 1)[None, :], counts[:, None])
    index = np.concatenate([index, (starts + counts + 1)[:, None]], axis=1)
    return boundaries, hash_ids(texts, out_bits)[index], texts


class Discretizer(nn.Module):
    """Bin ids of continuous inputs (module docstring); build it with `build_discretizer`.

    Args:
        inputs: the discretized inputs.
        tables: per input, (boundaries [F, K] float32, bin ids [F, K + 2] int64).

    Shapes: (dense {name: [B, W]}, sparse_continuous {name: SparseValues}) -> per input in order, dense:
    (ids [B, W], None); sparse: (ids [N], offsets [B + 1]). Ids lie in [0, 2**out_bits).
    """

    def __init__(self, inputs: list[DiscretizedInput], tables: list[tuple[np.ndarray, np.ndarray]]) -> None:
        super().__init__()
        self.inputs = list(inputs)
        for index, (boundaries, ids) in enumerate(tables):
            # Derived from the boundaries file, like the config's constants: not in checkpoints, so a warm
            # start from a run with other boundaries keeps this calibration.
            self.register_buffer(f"boundaries_{index}", torch.from_numpy(boundaries), persistent=False)
            self.register_buffer(f"ids_{index}", torch.from_numpy(ids), persistent=False)

    def dense_names(self) -> list[str]:
        return [item.name for item in self.inputs if item.keys is not None]

    def sparse_names(self) -> list[str]:
        return [item.name for item in self.inputs if item.keys is None]

    def forward(
        self, dense: dict[str, torch.Tensor], sparse_continuous: dict[str, SparseValues]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        out = []
        for index, item in enumerate(self.inputs):
            boundaries, table = getattr(self, f"boundaries_{index}"), getattr(self, f"ids_{index}")
            width = table.shape[1]
            if item.keys is not None:
                values = dense[item.name].float()  # [B, W]; feature f's boundaries are row f
                rows = torch.arange(boundaries.shape[0], device=values.device) * width
            else:
                feature = sparse_continuous[item.name]
                values = feature.values.float()  # [N]; feature = the id
                rows, boundaries = feature.ids * width, boundaries[feature.ids]
            # The bin is the number of boundaries <= the value (a comparison, not searchsorted: that
            # would need the values transposed, and a transpose's layout pins the exported batch size).
            bins = (values.unsqueeze(-1) >= boundaries).sum(dim=-1)
            bins = torch.where(torch.isnan(values), torch.full_like(bins, width - 1), bins)
            out.append((table.view(-1)[rows + bins], None if item.keys is not None else feature.offsets))
        return out


def build_discretizer(
    inputs: list[DiscretizedInput], document: dict, out_bits: int, num_bins: int
) -> Discretizer:
    """The Discretizer of `inputs` from a boundaries file's `document` (checked by `check_calibration`)."""
    features = document["features"]
    tables, texts = [], []
    for item in inputs:
        if item.keys is not None:
            keys = list(item.keys)
        else:
            keys = [f"{item.name}:{i}" for i in range(item.num_buckets)]
        boundaries, ids, hashed = _tables(keys, features, num_bins, out_bits)
        tables.append((boundaries, ids))
        texts += hashed
    distinct = len(set(texts))
    shared = distinct - len(np.unique(hash_ids(sorted(set(texts)), out_bits)))
    if shared:
        logger.info(
            "discretizer: %d of %d (feature, bin) pairs share an id with another in %d bits (hashing)",
            shared,
            distinct,
            out_bits,
        )
    return Discretizer(inputs, tables)

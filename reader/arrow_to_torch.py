"""Arrow -> torch conversions shared by the decoders, and `DataError`, the error of bad data.

Flat Arrow arrays become 1-D tensors: float32 / int64 arrays without nulls go Arrow buffer -> torch
without a copy (DLPack); other types take one numpy cast. No per-row python anywhere. `where` in the
signatures is how an error names the place: a file, or `file (row group N)` (tml.reader.decoder.location).

Example:
    values = single(table.column("label"))                      # one pa.Array of n values
    tensor, maybe_nonfinite = to_tensor(values, "float32", "a.parquet (row group 0)", "label")  # [n]
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tml.reader.decoder import DataError

__all__ = ["DataError", "numeric", "single", "to_tensor", "writable"]


def numeric(dtype: pa.DataType, target: str) -> bool:
    """Whether a column of `dtype` converts to `target` ("float32": any number; "int64": int or bool)."""
    if pa.types.is_integer(dtype) or pa.types.is_boolean(dtype):
        return True
    return target == "float32" and pa.types.is_floating(dtype)


def single(column: pa.ChunkedArray) -> pa.Array:
    """The column of one row group as one array."""
    if column.num_chunks == 1:
        return column.chunk(0)
    if column.num_chunks == 0:
        return pa.array([], type=column.type)
    return column.combine_chunks()


def writable(array: np.ndarray) -> np.ndarray:
    """`array`, copied only when it is a read-only view of Arrow memory (torch wants writable arrays)."""
    return array if array.flags.writeable else array.copy()


def to_tensor(values: pa.Array, target: str, where: str, column: str) -> tuple[torch.Tensor, bool]:
    """Flat values -> 1-D tensor of `target` dtype; second item: whether non-finite values are possible.

    Nulls become NaN for float32 and raise DataError for int64.
    """
    np_dtype = np.float32 if target == "float32" else np.int64
    floating = pa.types.is_floating(values.type)
    if values.null_count:
        if target == "int64":
            raise DataError(f"{where}: column {column!r} has {values.null_count} null values, expected none")
        values = pc.fill_null(pc.cast(values, pa.float32(), safe=False), float("nan"))
        floating = True
    if values.type == pa.from_numpy_dtype(np_dtype):
        return torch.from_dlpack(values), floating
    array = values.to_numpy(zero_copy_only=False).astype(np_dtype, copy=False)
    return torch.from_numpy(writable(array)), floating

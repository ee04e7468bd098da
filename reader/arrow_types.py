"""Arrow type predicates the reader, its decoders and the torch-free tools (tml-pq, the layout) share.

Example:
    is_list(pa.list_(pa.float32(), 64))   # True: list, large_list and fixed_size_list alike
"""

from __future__ import annotations

import pyarrow as pa


def is_list(dtype: pa.DataType) -> bool:
    """Whether `dtype` is a list of any kind (variable, large or fixed size)."""
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)

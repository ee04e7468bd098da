"""Fixed-size numeric vectors stored packed: one `fixed_size_binary` value per row instead of a list.

Parquet stores a `fixed_size_list` column as a leaf of values with a repetition level per value, and
decoding those levels and rebuilding the lists is most of what pyarrow spends on a wide vector (6,000 floats
per row: benchmarks/RESULTS.md, "Parquet layout", vectors). The same bytes as `fixed_size_binary(length *
item size)` are one value per row that pyarrow copies out whole. tml's layout (tml.reader.layout) writes
vectors so, and the field's metadata `tml.vector` names the element type (pyarrow's name: b"float" for
float32, b"int64", ...), from which the reader (tml.reader.ranking), `tml-recap score`, discretizer
calibration and `tml-pq` see `fixed_size_list<element>[length]` again, without a copy. Values are
little-endian, as Arrow holds them. Row nulls are kept; a vector with a null element cannot be packed and stays
a list. Other Parquet readers (pandas, Spark, DuckDB) see bytes: `tml-pq rewrite --vectors list` writes the
lists back.

Example:
    field = pa.field("continuous", pa.list_(pa.field("item", pa.float32(), nullable=False), 6000))
    pack_field(field)                       # fixed_size_binary[24000], metadata {b"tml.vector": b"float"}
    logical_schema(pq.ParquetFile(path).schema_arrow)   # packed fields as fixed_size_list again
    unpack_table(parquet.read_row_group(0))             # the same for the data, zero-copy
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

VECTOR_KEY = b"tml.vector"


def packable(field: pa.Field) -> bool:
    """Whether `field` is a fixed-size list of non-nullable integers or floats (what packing keeps exactly)."""
    dtype = field.type
    if not pa.types.is_fixed_size_list(dtype) or dtype.value_field.nullable:
        return False
    element = dtype.value_type
    return pa.types.is_integer(element) or pa.types.is_floating(element)


def pack_field(field: pa.Field) -> pa.Field:
    """The packed form of a `packable` field: same name and nullability, `fixed_size_binary`, tagged."""
    element = field.type.value_type
    metadata = {**(field.metadata or {}), VECTOR_KEY: str(element).encode()}
    width = field.type.list_size * element.bit_width // 8
    return pa.field(field.name, pa.binary(width), field.nullable, metadata)


def vector_type(field: pa.Field) -> pa.DataType | None:
    """`fixed_size_list<element>[length]` of a packed field, None for any other field.

    Raises:
        ValueError: the field is tagged `tml.vector` but its type or tag does not describe a vector (naming
            the column and what was expected).
    """
    tag = (field.metadata or {}).get(VECTOR_KEY)
    if tag is None:
        return None
    name = tag.decode(errors="replace")
    try:
        element = pa.type_for_alias(name)
    except ValueError:
        element = None
    if element is None or not (pa.types.is_integer(element) or pa.types.is_floating(element)):
        raise ValueError(
            f"column {field.name!r} is tagged {VECTOR_KEY.decode()}={name!r}, expected an integer or floating "
            "point type name such as 'float' or 'int64'"
        )
    size = element.bit_width // 8
    dtype = field.type
    if not pa.types.is_fixed_size_binary(dtype) or dtype.byte_width % size:
        raise ValueError(
            f"column {field.name!r} is tagged {VECTOR_KEY.decode()}={name!r} but is {dtype}, expected "
            f"fixed_size_binary of a multiple of {size} bytes"
        )
    return pa.list_(pa.field("item", element, nullable=False), dtype.byte_width // size)


def unpack_field(field: pa.Field) -> pa.Field:
    """A packed field as the fixed-size list it holds (the tag dropped); any other field unchanged."""
    dtype = vector_type(field)
    if dtype is None:
        return field
    metadata = {key: value for key, value in (field.metadata or {}).items() if key != VECTOR_KEY}
    return pa.field(field.name, dtype, field.nullable, metadata or None)


def logical_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with every packed field as the fixed-size list it holds."""
    return pa.schema([unpack_field(field) for field in schema], metadata=schema.metadata)


def packed_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with every `packable` field packed."""
    return pa.schema(
        [pack_field(field) if packable(field) else field for field in schema], metadata=schema.metadata
    )


def pack(array: pa.Array, field: pa.Field) -> pa.Array:
    """A fixed-size list array of the `packable` field -> its packed array over the same memory.

    Raises:
        ValueError: a vector that is not null holds a null element (naming the column).
    """
    nulls = pc.list_flatten(array).null_count
    if nulls:
        raise ValueError(f"column {field.name!r} has {nulls} null elements in its vectors, expected none")
    values = array.values  # the child from the first row of the unsliced array, whatever `array.offset` is
    item = values.type.bit_width // 8
    data = values.buffers()[1].slice(values.offset * item)
    return pa.Array.from_buffers(
        pack_field(field).type, len(array), [array.buffers()[0], data], array.null_count, array.offset
    )


def unpack(array: pa.Array, dtype: pa.DataType) -> pa.Array:
    """A packed array -> the `fixed_size_list` array `dtype` (vector_type) over the same memory."""
    length = (array.offset + len(array)) * dtype.list_size
    values = pa.Array.from_buffers(dtype.value_type, length, [None, array.buffers()[1]])
    return pa.Array.from_buffers(
        dtype, len(array), [array.buffers()[0]], array.null_count, array.offset, children=[values]
    )


def _map_columns(table: pa.Table, schema: pa.Schema, convert) -> pa.Table:
    columns = [
        column
        if new.equals(old, check_metadata=True)
        else pa.chunked_array([convert(chunk, old) for chunk in column.chunks], new.type)
        for column, old, new in zip(table.columns, table.schema, schema, strict=True)
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def unpack_table(table: pa.Table) -> pa.Table:
    """`table` with every packed column as the fixed-size lists it holds (zero-copy); ValueError as
    `vector_type`."""
    schema = logical_schema(table.schema)
    if schema.equals(table.schema, check_metadata=True):
        return table
    return _map_columns(table, schema, lambda chunk, field: unpack(chunk, vector_type(field)))


def pack_table(table: pa.Table) -> pa.Table:
    """`table` with every `packable` column packed (zero-copy)."""
    return _map_columns(table, packed_schema(table.schema), pack)

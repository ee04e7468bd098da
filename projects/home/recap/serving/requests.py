"""Request bodies of `POST /predict` -> an Arrow table, and responses <- the artifact's outputs.

Two body formats, told apart by Content-Type:
- `application/json`: `{"records": [{"<column>": value, ...}, ...]}`, one object per row, keyed by the
  Parquet column names of the training data (a list for a list column, a number or string for a scalar);
  columns the artifact does not read are ignored.
- `application/vnd.apache.arrow.stream`: an Arrow IPC stream with those columns (the fast path).
Either way the table then goes through the reader's ranking decoder (serving/schema.py), so a request is
checked and decoded exactly as a training file is. The response has the request's format: JSON
`{"score": [...], "probabilities": {task: [...]}}` (ranker) or `{"embeddings": {group: [[...], ...]}}`,
or an Arrow stream with the columns `predict` writes.

Every problem is a RequestError with an HTTP status (400 malformed, 413 too large, 415 unknown format, 422
well-formed but wrong for the model) and a message naming the field.

Example:
    table = parse_body(body, "application/json", columns, max_records=4096)
"""

from __future__ import annotations

import json

import pyarrow as pa

ARROW = "application/vnd.apache.arrow.stream"
JSON = "application/json"


class RequestError(Exception):
    """A bad request: `status` (4xx) and a message naming what is wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def body_format(content_type: str | None) -> str:
    """JSON or ARROW from a Content-Type header (parameters such as charset ignored)."""
    kind = (content_type or JSON).split(";")[0].strip().lower()
    if kind not in (JSON, ARROW):
        raise RequestError(415, f"Content-Type {content_type!r}: expected {JSON!r} or {ARROW!r}")
    return kind


def _check_rows(rows: int, max_records: int) -> None:
    if rows == 0:
        raise RequestError(422, "the request holds no records")
    if rows > max_records:
        raise RequestError(
            413, f"{rows} records in one request, at most {max_records} (--max-request-records)"
        )


def _json_table(body: bytes, columns: list[str], max_records: int) -> pa.Table:
    try:
        document = json.loads(body)
    except ValueError as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    records = document.get("records") if isinstance(document, dict) else None
    if not isinstance(records, list):
        raise RequestError(400, 'expected a JSON object {"records": [{"<column>": value, ...}, ...]}')
    _check_rows(len(records), max_records)
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise RequestError(400, f"records[{i}] is {type(record).__name__}, expected an object of columns")
    arrays = {}
    for column in columns:
        values = [record.get(column) for record in records]
        if all(value is None for value in values):
            continue  # absent: the decoder's schema check names it with its role
        try:
            arrays[column] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise RequestError(
                422, f"column {column!r}: values of mixed or unsupported types ({error})"
            ) from None
    return pa.table(arrays) if arrays else pa.table({"_": pa.nulls(len(records))})


def _arrow_table(body: bytes, max_records: int) -> pa.Table:
    try:
        table = pa.ipc.open_stream(body).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        raise RequestError(400, f"the body is not an Arrow IPC stream: {error}") from None
    _check_rows(table.num_rows, max_records)
    return table


def parse_body(body: bytes, kind: str, columns: list[str], max_records: int) -> pa.Table:
    """The request's rows as an Arrow table (`kind`: JSON or ARROW; `columns`: those the artifact reads)."""
    return _json_table(body, columns, max_records) if kind == JSON else _arrow_table(body, max_records)


def parse_tasks(text: str | None, tasks: list[str], kind: str) -> list[str]:
    """The `tasks` query parameter (comma-separated task names): which probabilities to return."""
    if text is None:
        return list(tasks)
    if kind == "embeddings":
        raise RequestError(422, "tasks: this artifact computes split-tower embeddings, it has no tasks")
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in tasks]
    if unknown or not wanted:
        raise RequestError(
            422, f"tasks: unknown task(s) {unknown or [text]}; the artifact's tasks are {tasks}"
        )
    return wanted


def json_response(outputs: dict, tasks: list[str], wanted: list[str]) -> bytes:
    """The JSON body of a response (module docstring)."""
    if "score" in outputs:
        probabilities = outputs["probabilities"]
        document = {
            "score": outputs["score"].tolist(),
            "probabilities": {task: probabilities[:, tasks.index(task)].tolist() for task in wanted},
        }
    else:
        document = {
            "embeddings": {name.removeprefix("embedding/"): t.tolist() for name, t in outputs.items()}
        }
    return json.dumps(document).encode()


def arrow_response(table: pa.Table) -> bytes:
    """An Arrow IPC stream of `table`."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()

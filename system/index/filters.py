"""Metadata filters: parse and validate one, and evaluate it over an index's attribute columns.

    from system.index.filters import parse_filter, FilterError
    parse_filter('{"label": [3, 5], "year": {"gte": 2020}}', index.idmap.schema)

A filter is a JSON object that applies to every query of a search call:

    {"col": value}                       equality
    {"col": [v1, v2]}                    membership (an empty list matches nothing)
    {"col": {"gte": a, "lt": b}}         ranges: gt, gte, lt, lte, ne (several = AND)
    {"a": 1, "b": {"lt": 3}}             several keys: AND
    {"$or": [{...}, {...}]}              OR of filters (beside other keys: AND with them)

The attributes are the scalar passthrough columns of the embeddings (ints, floats, strings,
booleans, dates and timestamps), kept in the index's id map (Parquet, one per shard). A
bad filter (unknown column, a value of the wrong type, an unknown operator, a malformed
shape) raises FilterError with a one-line message; it is a ValueError and an
IndexInputError, so the CLI exits 2 and HTTP answers 4xx. Rows with a null in a column
never match a condition on it.
"""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from system.index.recipes import IndexInputError

RANGE_OPS = {
    "gt": pc.greater,
    "gte": pc.greater_equal,
    "lt": pc.less,
    "lte": pc.less_equal,
    "ne": pc.not_equal,
}
HIDDEN = ("id", "faiss_id")  # id map columns that are not attributes
MAX_DEPTH = 8


class FilterError(IndexInputError):
    """A bad metadata filter; the message is one line starting with 'filter'."""


def _kind(dtype: pa.DataType) -> str | None:
    """The kind of values a column holds, or None when it cannot be filtered on."""
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "str"
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        return "time"
    return None


def filterable_columns(schema: pa.Schema) -> dict[str, str]:
    """{column: kind} of the attribute columns a filter may name."""
    return {f.name: kind for f in schema if f.name not in HIDDEN and (kind := _kind(f.type)) is not None}


def _value(column: str, kind: str | None, value):
    """The value checked against the column's kind (time values: ISO strings -> datetime)."""
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, (int, float)) and not isinstance(value, bool),  # 2.0 from JSON is 2
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "time": isinstance(value, str),
    }
    if value is None or isinstance(value, (dict, list)):
        raise FilterError(f"filter: {column}: {json.dumps(value)} is not a single value")
    if kind is None:  # no schema: any JSON scalar
        return value
    if not ok[kind]:
        raise FilterError(f"filter: {column} holds {kind} values, not {type(value).__name__} {value!r}")
    if kind == "time":
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            raise FilterError(f"filter: {column}: {value!r} is not an ISO date or time") from None
        return parsed.replace(tzinfo=parsed.tzinfo or dt.timezone.utc)
    if isinstance(value, float) and not np.isfinite(value):
        raise FilterError(f"filter: {column}: {value} is not a finite number")
    return value


def _condition(column: str, spec, columns: dict[str, str] | None) -> dict:
    if columns is not None and column not in columns:
        names = ", ".join(columns) or "none"
        raise FilterError(f"filter: unknown column {column!r} (filterable: {names})")
    kind = columns[column] if columns is not None else None
    if isinstance(spec, list):
        return {"col": column, "op": "in", "value": [_value(column, kind, v) for v in spec]}
    if isinstance(spec, dict):
        if not spec:
            raise FilterError(f"filter: {column}: an empty condition {{}}")
        bad = [op for op in spec if op not in RANGE_OPS]
        if bad:
            raise FilterError(f"filter: {column}: unknown operator {bad[0]!r} (use {', '.join(RANGE_OPS)})")
        if kind == "bool" and set(spec) - {"ne"}:
            raise FilterError(f"filter: {column} holds booleans: only equality, a list or 'ne'")
        return {"col": column, "op": "and", "value": {op: _value(column, kind, v) for op, v in spec.items()}}
    return {"col": column, "op": "eq", "value": _value(column, kind, spec)}


def _parse(spec, columns: dict[str, str] | None, depth: int) -> list[dict]:
    if not isinstance(spec, dict):
        raise FilterError(f"filter: expected a JSON object, got {type(spec).__name__}")
    if depth > MAX_DEPTH:
        raise FilterError(f"filter: nested deeper than {MAX_DEPTH} levels of $or")
    terms = []
    for key, value in spec.items():
        if not isinstance(key, str):
            raise FilterError(f"filter: keys must be column names, got {key!r}")
        if key == "$or":
            if not isinstance(value, list) or not value:
                raise FilterError("filter: $or takes a non-empty list of filters")
            terms.append({"op": "or", "value": [_parse(v, columns, depth + 1) for v in value]})
        elif key.startswith("$"):
            raise FilterError(f"filter: unknown operator {key!r} (only $or)")
        else:
            terms.append(_condition(key, value, columns))
    return terms


def parse_filter(spec, schema: pa.Schema | None = None) -> list[dict] | None:
    """A validated filter from a dict or its JSON text: a list of AND-ed terms, None when empty.

    With `schema` (the index's id map schema, `VectorIndex.idmap.schema`), column names and
    value types are checked too; without it only the shape is. Raises FilterError. Pure.
    """
    if spec is None:
        return None
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except ValueError as e:
            raise FilterError(f"filter: not valid JSON ({e})") from None
    columns = filterable_columns(schema) if schema is not None else None
    return _parse(spec, columns, 0) or None


def _scalar(value, dtype: pa.DataType) -> pa.Scalar:
    dtype = dtype.value_type if pa.types.is_dictionary(dtype) else dtype
    if pa.types.is_date(dtype) and isinstance(value, dt.datetime):
        value = value.date()
    if pa.types.is_timestamp(dtype) and isinstance(value, dt.datetime) and dtype.tz is None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    if pa.types.is_integer(dtype):  # compared in a wide type: 100000 against int16 matches nothing
        wide = isinstance(value, int) and -(2**63) <= value < 2**63
        return pa.scalar(value, pa.int64()) if wide else pa.scalar(float(value), pa.float64())
    return pa.scalar(value, dtype)


def _term_mask(term: dict, table: pa.Table) -> pa.ChunkedArray:
    if term["op"] == "or":
        masks = [_terms_mask(t, table) for t in term["value"]]
        out = masks[0]
        for m in masks[1:]:
            out = pc.or_(out, m)
        return out
    column = table.column(term["col"])
    dtype = column.type
    if term["op"] == "eq":
        return pc.equal(column, _scalar(term["value"], dtype))
    if term["op"] == "in":
        if not term["value"]:
            return pa.chunked_array([np.zeros(len(table), bool)])
        scalars = [_scalar(v, dtype) for v in term["value"]]
        kinds = {s.type for s in scalars}
        value_type = pa.float64() if pa.float64() in kinds else scalars[0].type
        values = pa.array([s.as_py() for s in scalars], type=value_type)
        return pc.is_in(column, value_set=values)
    out = None
    for op, value in term["value"].items():
        mask = RANGE_OPS[op](column, _scalar(value, dtype))
        out = mask if out is None else pc.and_(out, mask)
    return out


def _terms_mask(terms: list[dict], table: pa.Table) -> pa.ChunkedArray:
    out = pa.chunked_array([np.ones(len(table), bool)])
    for term in terms:
        out = pc.and_(out, _term_mask(term, table))
    return out


def filter_mask(spec, table: pa.Table) -> np.ndarray:
    """Boolean mask over the rows of `table` (an id map) of the rows the filter matches."""
    return terms_mask(parse_filter(spec, table.schema), table)


def terms_mask(terms: list[dict] | None, table: pa.Table) -> np.ndarray:
    """filter_mask of a filter parse_filter has already validated against `table`'s schema."""
    if not terms:
        return np.ones(len(table), bool)
    try:
        mask = _terms_mask(terms, table)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OverflowError) as e:
        raise FilterError(f"filter: {str(e).splitlines()[0]}") from None
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False).astype(bool, copy=False)

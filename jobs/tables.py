"""Tables in, typed columns out: the rows of a CSV, TSV, Parquet or JSONL file made into
requests through a template (``submit --template``), and the types of their columns,
kept so that the export gives every column back as it came in.

A template is text with ``{column}`` fields, and nothing else: it is parsed with
``string.Formatter().parse`` and filled by this module, never by ``str.format``, so a
field cannot reach an attribute, an index or a conversion (``{x.__class__}`` is an
error at submit). ``{{`` and ``}}`` are a literal ``{`` and ``}``.

A row's values are stored with its request as a JSON object (``requests.input_row``),
and the columns with their types once per job (``jobs.input_columns``: a JSON list of
``{"name", "type"}``). A type is an Arrow type's name, or ``json`` for a column held as
JSON values:

* booleans, integers, floats and text are stored as JSON values;
* timestamps (any unit, any time zone), dates and decimals as Arrow's text for them,
  which casts back exactly (``2024-03-01 09:30:00.000000Z``, ``12.50``);
* times of day and durations become text; lists, structs, maps and binary become
  ``json`` (binary as base64 text);
* a Parquet float NaN is stored as null (missing), as JSON has no NaN.

CSV cells are text. A JSONL column's type is read from its values over the whole
file: all booleans, all whole numbers, numbers (``double``), all text; any other mix,
or arrays and objects, is ``json``.

Nothing here runs at import: pyarrow is imported by the functions that need it.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import difflib
import io
import re
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson
from nightshift.jobs.errors import NightshiftError
from nightshift.jobs.formats import (
    MAX_CUSTOM_ID_CHARS,
    MAX_LINE_BYTES,
    LineError,
    OversizedLine,
    Params,
    RequestSpec,
    _json_reason,
    iter_lines,
)

if TYPE_CHECKING:
    import pyarrow as pa

# The formats a table may come in, told by the file's name (see ``table_format``).
FORMATS = ("csv", "tsv", "parquet", "jsonl")
_EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet",
               ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PARQUET_MAGIC = b"PAR1"
# Parquet rows converted at a time: a few megabytes of Python values for rows of a
# few kilobytes. Bytes read ahead per column: what bounds memory when a file has
# one huge row group (pyarrow's default reads each column chunk whole).
PARQUET_BATCH_ROWS = 1024
PARQUET_BUFFER_BYTES = 1 << 20

JSON = "json"  # the type of a column held as JSON values
_NO_PARAMS = Params()
_UTF8_ERRORS = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bad bytes
_KIND_OF_JSON = {bool: "bool", int: "int64", float: "double", str: "string"}
_INT64 = (-(2**63), 2**63 - 1)
_ZONED = re.compile(r"timestamp\[(s|ms|us|ns), tz=(.+)\]$")  # type_for_alias has no zones
_DECIMAL = re.compile(r"decimal(128|256)\((\d+), (\d+)\)$")


class TemplateError(NightshiftError, ValueError):
    """A ``--template`` that cannot be used; the message says why and what to write."""


class _FileProblem(LineError):
    """A problem of the whole file (not a Parquet file, ...): ``FILE: reason``."""

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


# --- which format ------------------------------------------------------------------------


def format_of_name(source: str) -> str | None:
    """The table format a file's name says (.csv, .tsv/.tab, .parquet/.pq, .jsonl/.ndjson),
    or None."""
    return _EXTENSIONS.get(PurePath(source).suffix.lower())


def table_format(source: str, head: bytes) -> str:
    """The format of a table: from its name, else from its first bytes (standard input,
    other names): Parquet's magic bytes; a ``{`` opening a JSONL file; a first line with
    tabs and no commas, TSV; else CSV."""
    named = format_of_name(source)
    if named:
        return named
    if head.startswith(PARQUET_MAGIC):
        return "parquet"
    head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"{"):
        return "jsonl"
    first = head.split(b"\n", 1)[0]
    return "tsv" if b"\t" in first and b"," not in first else "csv"


# --- templates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A prompt with ``{column}`` fields, checked (``Template.parse``)."""

    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal text, column or None), in order

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns it names, each once, in order."""
        return tuple(dict.fromkeys(c for _, c in self.parts if c is not None))

    @classmethod
    def parse(cls, text: str) -> Template:
        """Check a template: only plain ``{column}`` fields, at least one.

        Raises:
            TemplateError: a lone brace, an empty field, a conversion (``{x!r}``), a format
                spec (``{x:>10}``), attribute or index access (``{x.y}``, ``{x[0]}``), or
                no field at all; the message says what to write instead.
        """
        braces = "write {{ or }} for a literal brace"
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TemplateError(f"--template: {exc} ({braces})") from None
        parts = []
        for literal, field, spec, conversion in parsed:
            if field is None:
                parts.append((literal, None))
                continue
            shown = "{" + field + (f"!{conversion}" if conversion else "") + \
                (f":{spec}" if spec else "") + "}"
            if conversion is not None or spec:
                raise TemplateError(
                    f"--template: {shown} formats its value; a field is a plain column name "
                    "like {text} (conversions like !r and format specs like :>10 are not "
                    "supported)")
            if not field:
                raise TemplateError("--template: {} names no column; write {text} with the "
                                    f"column's name ({braces})")
            if "." in field or "[" in field or "]" in field:
                raise TemplateError(
                    f"--template: {shown}: a field is a plain column name, without attribute "
                    "or index access (. and [ ]); rename the column if its name has them")
            parts.append((literal, field))
        if not any(column for _, column in parts):
            raise TemplateError(f"--template: no {{column}} field, so every row would get the "
                                f"same prompt; write {{text}} with a column's name ({braces})")
        return cls(text, tuple(parts))

    def fill(self, row: Mapping[str, Any]) -> str:
        """The prompt for a row that has every column, none null (see ``value_text``)."""
        return "".join(literal + ("" if column is None else value_text(row[column]))
                       for literal, column in self.parts)


def value_text(value: Any) -> str:
    """A value as a template writes it: text as is, numbers as Python writes them, true
    and false, lists and objects as JSON (timestamps, dates and decimals are text already)."""
    if type(value) is str:
        return value
    if type(value) is bool:
        return "true" if value else "false"
    if type(value) is int or type(value) is float:
        return repr(value)
    return orjson.dumps(value, default=_json_default).decode()


def _json_default(value: Any) -> Any:
    """orjson's fallback for what a Parquet nested column holds."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, (decimal.Decimal, dt.time, dt.timedelta)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON")


def _names(names: Iterable[str]) -> str:
    shown = [repr(n) for n in names]
    return ", ".join(shown[:20]) + (f" and {len(shown) - 20} more" if len(shown) > 20 else "")


def _no_column(column: str, names: list[str], flag: str = "", where: str = "") -> str:
    close = difflib.get_close_matches(column, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"no column {column!r}{flag}{where} (columns: {_names(names) or 'none'}){hint}"


# --- the requests of a table -------------------------------------------------------------


class TableRequests:
    """The requests of one table file: iterate for a ``RequestSpec`` per row and a
    ``LineError`` per bad one (``FILE:ROW: reason``); then ``columns_json()``.

    Rows are numbered as errors and the export name them: a CSV's header is row 1 (as
    a spreadsheet numbers them), a Parquet file's first row is 1, a JSONL table's rows
    are its lines. Blank lines, and CSV rows with every cell empty, are skipped. A
    problem of the whole file (the header, the schema) is reported once, and reading
    stops there.
    """

    def __init__(self, stream: BinaryIO, source: str, fmt: str, template: Template, *,
                 id_column: str | None = None, raw: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"unknown table format {fmt!r}")
        self.stream, self.source, self.fmt = stream, source, fmt
        self.template, self.id_column, self.raw = template, id_column, raw
        self.columns: dict[str, str | None] = {}  # name -> type, None while unknown
        self._unit = "line" if fmt == "jsonl" else "row"
        # The columns every row needs, each with how a message names it.
        self._needed = [(c, "") for c in template.columns]
        if id_column is not None and id_column not in template.columns:
            self._needed.append((id_column, " (--id-column)"))

    def __iter__(self) -> Iterator[RequestSpec | LineError]:
        reader = {"csv": self._csv, "tsv": self._csv, "parquet": self._parquet,
                  "jsonl": self._jsonl}[self.fmt]
        seen: dict[str, int] = {}
        for item in reader():
            if isinstance(item, LineError):
                yield item
            else:
                yield self._request(*item, seen)

    def columns_json(self) -> str:
        """The columns read, with their types, as ``jobs.input_columns`` keeps them."""
        return orjson.dumps([{"name": name, "type": kind or "string"}
                             for name, kind in self.columns.items()]).decode()

    def _missing(self, names: list[str]) -> str | None:
        """Why a file with these columns cannot fill the template, or None."""
        for column, flag in self._needed:
            if column not in names:
                return _no_column(column, names, flag)
        return None

    def _request(self, row_no: int, row: dict[str, Any],
                 seen: dict[str, int]) -> RequestSpec | LineError:
        for column, flag in self._needed:
            if column not in row:  # JSONL: each row has its own columns
                return LineError(self.source, row_no,
                                 _no_column(column, list(row), flag, f" in this {self._unit}"))
            if row[column] is None:
                return LineError(self.source, row_no, f"column {column!r}{flag} is null in "
                                 f"this {self._unit}: it needs a value")
        custom_id = None
        if self.id_column is not None:
            value = row[self.id_column]
            if type(value) is int:
                value = str(value)
            elif type(value) is not str:
                return LineError(self.source, row_no, f"--id-column {self.id_column!r} must "
                                 f"hold text or whole numbers, got {value_text(value)[:40]}")
            if not value:
                return LineError(self.source, row_no,
                                 f"--id-column {self.id_column!r} is empty in this {self._unit}")
            if len(value) > MAX_CUSTOM_ID_CHARS:
                return LineError(self.source, row_no, f"id in column {self.id_column!r} is "
                                 f"{len(value)} characters long; at most {MAX_CUSTOM_ID_CHARS}")
            first = seen.get(value)
            if first is not None:
                return LineError(self.source, row_no, f"duplicate id {value!r} in column "
                                 f"{self.id_column!r} (first on {self._unit} {first})")
            seen[value] = row_no
            custom_id = value
        prompt = self.template.fill(row)
        if not prompt or prompt.isspace():
            return LineError(self.source, row_no,
                             f"empty prompt: the template filled from this {self._unit} is blank")
        stored = orjson.dumps(row, default=_json_default).decode()
        if self.raw:
            return RequestSpec(row_no, custom_id, "completion", None, prompt, _NO_PARAMS,
                               None, None, stored)
        return RequestSpec(row_no, custom_id, "chat", [{"role": "user", "content": prompt}],
                           None, _NO_PARAMS, None, None, stored)

    # -- CSV and TSV ---------------------------------------------------------------------

    def _csv(self) -> Iterator[tuple[int, dict] | LineError]:
        """UTF-8 (a BOM, as Excel writes, is dropped); the first row that is not blank is
        the header; quoted cells may hold the delimiter, quotes (doubled) and newlines."""
        # A cell may be as long as a JSONL line (the module's default is 128 KiB).
        csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
        text = io.TextIOWrapper(self.stream, encoding="utf-8-sig", errors="surrogateescape",
                                newline="")
        try:
            reader = csv.reader(text, dialect="excel-tab" if self.fmt == "tsv" else "excel",
                                strict=True)
            header: list[str] | None = None
            row_no = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    row_no += 1
                    yield LineError(self.source, row_no, _csv_reason(exc))
                    if header is None:
                        return
                    continue
                row_no += 1
                if not any(cells):
                    continue
                if any(_UTF8_ERRORS.search(cell) for cell in cells):
                    yield LineError(self.source, row_no, "not valid UTF-8: save the file as "
                                    "UTF-8 (in a spreadsheet: CSV UTF-8)")
                    if header is None:
                        return
                    continue
                if header is None:
                    header, problem = _header(cells)
                    problem = problem or self._missing(header)
                    if problem:
                        yield LineError(self.source, row_no, f"header: {problem}")
                        return
                    self.columns = dict.fromkeys(header, "string")
                    header_row = row_no
                    continue
                if len(cells) != len(header):
                    yield LineError(self.source, row_no, f"{len(cells)} cells; the header (row "
                                    f"{header_row}) has {len(header)} (a cell holding the "
                                    "delimiter or a newline must be quoted)")
                    continue
                yield row_no, dict(zip(header, cells))
        finally:
            text.detach()  # the caller closes the stream

    # -- Parquet -------------------------------------------------------------------------

    def _parquet(self) -> Iterator[tuple[int, dict] | LineError]:
        """Read batch by batch (never the whole file), in the file's column order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            file = pq.ParquetFile(self.stream, buffer_size=PARQUET_BUFFER_BYTES,
                                  pre_buffer=False)
            schema = file.schema_arrow
        except (pa.ArrowException, OSError) as exc:
            yield _FileProblem(self.source, 0, f"not a Parquet file that can be read ({exc})")
            return
        names = schema.names
        problem = _duplicate(names) or self._missing(names)
        kinds = {field.name: kind_of(field.type) for field in schema}
        if problem is None and self.id_column is not None:
            kind = kinds[self.id_column]
            if kind != "string" and not re.fullmatch(r"u?int\d+", kind):
                found = schema.field(self.id_column).type
                problem = (f"--id-column {self.id_column!r} is of type {found}: ids must be "
                           "text or whole numbers")
        if problem:
            yield LineError(self.source, 1, problem)
            return
        self.columns = dict(kinds)
        row_no = 0
        try:
            for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS):
                columns = [_stored_values(batch.column(i), kinds[name], name)
                           for i, name in enumerate(names)]
                for i in range(batch.num_rows):
                    row_no += 1
                    yield row_no, {name: values[i] for name, values in zip(names, columns)}
        except (pa.ArrowException, OSError) as exc:
            yield LineError(self.source, row_no + 1, f"cannot read the file from here: {exc}")
        except _ColumnError as exc:
            yield LineError(self.source, row_no + 1, str(exc))

    # -- JSONL ---------------------------------------------------------------------------

    def _jsonl(self) -> Iterator[tuple[int, dict] | LineError]:
        """One JSON object of columns per line; its types are found over the whole file."""
        columns = self.columns
        for line_no, raw in iter_lines(self.stream):
            if type(raw) is OversizedLine:
                yield LineError(self.source, line_no, f"line is {raw.size} bytes long; at "
                                f"most {raw.limit} are allowed")
                continue
            if not raw or raw.isspace():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                yield LineError(self.source, line_no, _json_reason(raw, exc))
                continue
            if type(row) is not dict:
                yield LineError(self.source, line_no, "expected a JSON object of columns, got "
                                f"{value_text(row)[:40]}")
                continue
            for name, value in row.items():
                if value is not None or name not in columns:
                    columns[name] = _merge(columns.get(name), _json_kind(value))
            yield line_no, row


def _csv_reason(exc: csv.Error) -> str:
    text = str(exc)
    if "unexpected end of data" in text:
        return "a quoted cell opened in this row is never closed (a missing \")"
    if "expected after '\"'" in text:
        return ("text after a closing quote: a quote inside a quoted cell is written twice "
                '("")')
    if "field larger than field limit" in text:
        return f"a cell is longer than {MAX_LINE_BYTES} characters"
    return f"not valid CSV: {text}"


def _header(cells: list[str]) -> tuple[list[str], str | None]:
    """The column names of a header row; a cell left empty names its column
    ``column_N`` (N from 1), as pandas' unnamed index column is."""
    names = [cell or f"column_{i}" for i, cell in enumerate(cells, 1)]
    return names, _duplicate(names)


def _duplicate(names: list[str]) -> str | None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names, 1):
        if name in seen:
            return f"column {name!r} appears twice (columns {seen[name]} and {i}); names " \
                   "must be unique"
        seen[name] = i
    return None


def _json_kind(value: Any) -> str | None:
    if value is None:
        return None
    kind = _KIND_OF_JSON.get(type(value), JSON)
    if kind == "int64" and not _INT64[0] <= value <= _INT64[1]:
        return JSON
    return kind


def _merge(old: str | None, new: str | None) -> str | None:
    if old is None or old == new:
        return new
    if new is None:
        return old
    if {old, new} == {"int64", "double"}:
        return "double"
    return JSON


# --- column types ------------------------------------------------------------------------


class _ColumnError(NightshiftError):
    """A Parquet column whose values cannot be kept."""


def _via_text(kind: str) -> bool:
    """Whether a type's values are stored as Arrow's text for them."""
    return kind.startswith(("timestamp", "date", "decimal"))


def kind_of(arrow_type: pa.DataType) -> str:
    """The stored type of a Parquet column of this Arrow type (see the module's docstring)."""
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(arrow_type):
        return kind_of(arrow_type.value_type)
    if t.is_boolean(arrow_type):
        return "bool"
    if t.is_integer(arrow_type):
        return str(arrow_type)
    if t.is_floating(arrow_type):
        return "double" if arrow_type.bit_width == 64 else "float"
    if (t.is_string(arrow_type) or t.is_large_string(arrow_type) or t.is_null(arrow_type)
            or getattr(t, "is_string_view", lambda _: False)(arrow_type)
            or t.is_time(arrow_type) or t.is_duration(arrow_type)):
        return "string"
    if t.is_date(arrow_type) or t.is_timestamp(arrow_type) or t.is_decimal(arrow_type):
        return str(arrow_type)
    return JSON


def arrow_type(kind: str) -> pa.DataType:
    """The Arrow type of a stored type (``kind_of``'s names; ``json`` is text).

    Raises:
        ValueError: a name no release of nightshift writes.
    """
    import pyarrow as pa

    if kind == JSON:
        return pa.string()
    found = _ZONED.match(kind)
    if found:
        return pa.timestamp(found[1], tz=found[2])
    found = _DECIMAL.match(kind)
    if found:
        make = pa.decimal128 if found[1] == "128" else pa.decimal256
        return make(int(found[2]), int(found[3]))
    return pa.type_for_alias(kind)


def _stored_values(array: pa.Array, kind: str, name: str) -> list:
    """A Parquet column's values as stored (JSON values, or text for ``_via_text``)."""
    import pyarrow as pa

    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if kind == "string" or _via_text(kind):
        if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
            array = array.cast(pa.string())
        return array.to_pylist()
    if kind == "float" or kind == "double":
        if array.type.bit_width == 16:
            array = array.cast(pa.float32())
        return [None if v != v else v for v in array.to_pylist()]  # NaN: missing
    try:
        return array.to_pylist()
    except (pa.ArrowException, ValueError) as exc:
        raise _ColumnError(f"column {name!r} ({array.type}) cannot be kept: {exc}; drop or "
                           "convert it") from None


# --- the export's side -------------------------------------------------------------------


@dataclass(frozen=True)
class InputColumn:
    """A column of the input, as the export writes it."""

    name: str  # in the input, and in requests.input_row
    kind: str  # its stored type
    export_name: str  # its name in a flat export: ``input_NAME`` where NAME is taken

    @property
    def text(self) -> bool:
        """Whether its cells are text a spreadsheet might run (see export.neutralise)."""
        return self.kind in ("string", JSON)


def input_columns(stored: str | None, taken: Iterable[str]) -> list[InputColumn]:
    """A job's input columns from ``jobs.input_columns`` (None: none). A column named like
    one of the export's own (``taken``) is exported as ``input_NAME``."""
    if not stored:
        return []
    used = set(taken)
    out = []
    for column in orjson.loads(stored):
        name = export_name = column["name"]
        while export_name in used:
            export_name = f"input_{export_name}"
        used.add(export_name)
        out.append(InputColumn(name, column["type"], export_name))
    return out


def cell_text(value: Any, column: InputColumn) -> str | None:
    """A stored value as a CSV cell: None stays empty; a ``json`` column's as JSON text."""
    if value is None:
        return None
    if column.kind == JSON:
        return orjson.dumps(value).decode()
    return value_text(value)


def arrow_array(values: list, column: InputColumn) -> pa.Array:
    """A column of stored values as the Arrow array of its type."""
    import pyarrow as pa

    if column.kind == JSON:
        return pa.array([None if v is None else orjson.dumps(v).decode() for v in values],
                        pa.string())
    kind = arrow_type(column.kind)
    if _via_text(column.kind):
        return pa.array(values, pa.string()).cast(kind)
    return pa.array(values, kind)


def timestamps(seconds: list[float | None]) -> pa.Array:
    """Unix times in seconds as ``timestamp[us, tz=UTC]``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    micros = pc.round(pc.multiply(pa.array(seconds, pa.float64()), 1e6))
    return micros.cast(pa.int64()).cast(pa.timestamp("us", tz="UTC"))


class ParquetChunks:
    """A Parquet file written one row group at a time and handed out as bytes, so it can
    go to any sink (a file, a pipe) with only a row group in memory."""

    def __init__(self, schema: pa.Schema):
        import pyarrow.parquet as pq

        self._sink = _Sink()
        # zstd: smaller than snappy on text, and read by pandas, polars and DuckDB alike.
        self._writer = pq.ParquetWriter(self._sink, schema, compression="zstd")
        self.schema = schema

    def write(self, arrays: list[pa.Array]) -> bytes:
        """Write one row group; returns the file's bytes written since the last call."""
        import pyarrow as pa

        self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
        return self._sink.take()

    def close(self) -> bytes:
        """End the file (its footer); returns the last bytes."""
        self._writer.close()
        return self._sink.take()


class _Sink(io.RawIOBase):
    """A write-only file that keeps what is written until ``take``."""

    def __init__(self):
        super().__init__()
        self._chunks: list[bytes] = []
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        chunk = bytes(data)
        self._chunks.append(chunk)
        self._position += len(chunk)
        return len(chunk)

    def tell(self) -> int:
        return self._position

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks = []
        return out

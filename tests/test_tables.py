"""Tables in, Parquet out (issue 13, items 1 and 2): CSV, TSV, Parquet and JSONL rows
made into requests through a template that cannot run code, every bad row reported as
FILE:ROW with nothing stored, and the rows' columns given back, typed, by the export."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import io
import json
import sqlite3
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nightshift.jobs import tables
from nightshift.jobs.export import export
from nightshift.jobs.store import Store
from nightshift.jobs.submit import JobOptions, submit
from nightshift.jobs.vocabulary import Result
from sqlalchemy import text


@pytest.fixture
def model(fake_model) -> str:
    return fake_model


def submit_table(invoke, path, template, *args, expect=0):
    result = invoke("submit", path, "--model", "fake", "--template", template, "--json",
                    *args, expect=expect)
    return json.loads(result.output)["id"] if expect == 0 else result.output


def stored(job_id: str) -> list:
    """The job's request rows, in input order."""
    store = Store()
    try:
        return list(store.iter_requests(job_id))
    finally:
        store.close()


def prompts(job_id: str) -> list[str]:
    return [json.loads(r.body)[0]["content"] for r in stored(job_id)]


def nothing_stored() -> bool:
    store = Store()
    with store.read() as conn:
        counts = (conn.execute(text("SELECT COUNT(*) FROM jobs")).scalar(),
                  conn.execute(text("SELECT COUNT(*) FROM requests")).scalar())
    store.close()
    return counts == (0, 0)


def finish(job_id: str, answers: dict[int, str]) -> None:
    """Store answers for the requests at these positions, as a worker would; the rest
    stay queued."""
    store = Store()
    claimed = store.claim(store.chunks(job_id)[0], "w", 10_000)
    now = time.time()
    store.finish([Result(c.id, job_id, now - 2, now, first_token_at=now - 1.5,
                         response=answers[c.seq], finish_reason="stop", prompt_tokens=7,
                         completion_tokens=3)
                  for c in claimed if c.seq in answers], "w")
    store.release([c.id for c in claimed if c.seq not in answers], "w")
    store.close()


# -- tables in ---------------------------------------------------------------------------


def test_a_csv_with_quoted_commas_newlines_and_quotes_becomes_one_request_a_row(
        invoke, model, tmp_path):
    path = tmp_path / "reviews.csv"
    # Excel's BOM, CRLF line ends, a blank line and an all-empty row (both skipped).
    path.write_bytes("\ufeffid,text,stars\r\n"
                     'r1,"Great, fast delivery",5\r\n'
                     'r2,"Broke after a week.\nWould not buy again.",1\r\n'
                     "\r\n"
                     ",,\r\n"
                     'r3,"She said ""wow""",4\r\n'.encode())
    job = submit_table(invoke, path, "Summarise in one sentence: {text}", "--id-column", "id")
    rows = stored(job)
    assert [r.custom_id for r in rows] == ["r1", "r2", "r3"]
    assert [r.line_no for r in rows] == [2, 3, 6]  # rows as a spreadsheet numbers them
    assert prompts(job) == ["Summarise in one sentence: Great, fast delivery",
                            "Summarise in one sentence: Broke after a week.\nWould not buy "
                            "again.",
                            'Summarise in one sentence: She said "wow"']
    assert [r.kind for r in rows] == ["chat"] * 3
    assert json.loads(rows[1].input_row) == {
        "id": "r2", "text": "Broke after a week.\nWould not buy again.", "stars": "1"}


def test_bad_rows_are_each_reported_as_file_row_and_nothing_is_stored(invoke, model, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b'id,text\n'
                     b'1,fine\n'
                     b'2,one,too many\n'        # row 3: three cells
                     b'3,"closed"then text\n'   # row 4: text after a closing quote
                     b'4,\xff\xfe\n'            # row 5: not UTF-8
                     b'5,\n'                    # row 6: a blank prompt
                     b'1,dup\n'                 # row 7: id 1 again
                     b',no id\n'                # row 8: no id
                     b'6,"never closed\n')      # row 9: runs to the end of the file
    out = submit_table(invoke, path, "{text}", "--id-column", "id", expect=1)
    assert f"{path}:3: 3 cells; the header (row 1) has 2" in out
    assert f"{path}:4: text after a closing quote" in out
    assert f"{path}:5: not valid UTF-8" in out
    assert f"{path}:6: empty prompt" in out
    assert f"{path}:7: duplicate id '1' in column 'id' (first on row 2)" in out
    assert f"{path}:8: --id-column 'id' is empty in this row" in out
    assert f"{path}:9: a quoted cell opened in this row is never closed" in out
    assert "nothing was queued" in out and "Traceback" not in out
    assert nothing_stored()


@pytest.mark.parametrize("template, says", [
    ("{text.__class__}", "without attribute or index access"),
    ("{text[0]}", "without attribute or index access"),
    ("{text!r}", "conversions like !r"),
    ("{text:>10}", "format specs"),
    ("{}", "{} names no column"),
    ("Summarise } this", "Single '}'"),
    ("Summarise {text", "expected '}'"),
    ("no field, only {{braces}}", "no {column} field"),
])
def test_a_template_that_could_format_or_reach_attributes_is_refused_at_submit(
        invoke, model, tmp_path, template, says):
    path = tmp_path / "t.csv"
    path.write_text("text\nhello\n")
    out = submit_table(invoke, path, template, expect=2)
    assert "Invalid value for --template" in out and says in out, out
    assert nothing_stored()


def test_braces_doubled_are_literal_and_values_are_never_formatted():
    template = tables.Template.parse("{{json}}: {a} {{ {b} }}")
    assert template.columns == ("a", "b")
    # A value that looks like a field stays as it is: filling is not str.format.
    assert template.fill({"a": "{b.__class__}", "b": 7}) == "{json}: {b.__class__} { 7 }"


@given(st.lists(st.one_of(
    st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8),
    st.sampled_from(["a", "b", "long_name"]).map(lambda name: (name,))), max_size=8))
def test_a_template_fills_as_str_format_would_on_plain_fields(parts):
    """Literal text (braces escaped) and plain fields (here in a tuple), in any order:
    filled exactly as str.format fills them, without ever calling it."""
    row = {"a": "x", "b": 2, "long_name": "{a}"}
    source = "".join("{" + p[0] + "}" if type(p) is tuple
                     else p.replace("{", "{{").replace("}", "}}") for p in parts)
    if not any(type(p) is tuple for p in parts):
        with pytest.raises(tables.TemplateError):
            tables.Template.parse(source)
        return
    assert tables.Template.parse(source).fill(row) == source.format(**row)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)),
                                 max_size=12), min_size=2, max_size=2),
                min_size=1, max_size=6))
def test_any_cells_csv_writes_come_back_exactly(cells):
    """Whatever csv.writer writes (delimiters, quotes, newlines, CRs in cells) is read
    back cell for cell."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["n", "a", "b"])
    for i, (a, b) in enumerate(cells):
        writer.writerow([str(i), a, b])
    table = tables.TableRequests(io.BytesIO(buf.getvalue().encode()), "t.csv", "csv",
                                 tables.Template.parse("{n}|{a}|{b}"))
    specs = list(table)
    assert [json.loads(s.row) for s in specs] == [
        {"n": str(i), "a": a, "b": b} for i, (a, b) in enumerate(cells)]
    assert [s.messages[0]["content"] for s in specs] == [
        f"{i}|{a}|{b}" for i, (a, b) in enumerate(cells)]


def test_a_missing_column_names_the_file_row_and_column_before_anything_is_stored(
        invoke, model, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,text\n1,hello\n")
    out = submit_table(invoke, path, "Summarise: {txt}", expect=1)
    assert f"{path}:1: header: no column 'txt' (columns: 'id', 'text'); did you mean 'text'?" \
        in out
    out = submit_table(invoke, path, "{text}", "--id-column", "key", expect=1)
    assert "no column 'key' (--id-column)" in out

    rows = tmp_path / "t.jsonl"
    rows.write_text('{"text": "a"}\n\n{"txt": "b"}\n{"text": null}\n')
    out = submit_table(invoke, rows, "Summarise: {text}", expect=1)
    assert f"{rows}:3: no column 'text' in this line (columns: 'txt')" in out
    assert f"{rows}:4: column 'text' is null in this line: it needs a value" in out

    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1.5], "body": ["x"]}), parquet)
    out = submit_table(invoke, parquet, "{text}", expect=1)
    assert f"{parquet}:1: no column 'text' (columns: 'id', 'body')" in out
    out = submit_table(invoke, parquet, "{body}", "--id-column", "id", expect=1)
    assert "--id-column 'id' is of type double: ids must be text or whole numbers" in out
    assert nothing_stored()


def test_a_table_without_a_template_is_a_clear_error_and_jsonl_is_unchanged(
        invoke, model, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text\nhello\n")
    out = invoke("submit", path, "--model", "fake", expect=1).output
    assert "a CSV file is a table: give --template" in out
    out = invoke("submit", path, "--model", "fake", "--id-column", "text", expect=2).output
    assert "--id-column names a column of a table: give --template too" in out
    assert nothing_stored()
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "hi", "custom_id": "a"}\n')
    job = json.loads(invoke("submit", lines, "--model", "fake", "--json").output)["id"]
    [row] = stored(job)
    assert (row.custom_id, row.input_row, json.loads(row.body)) == (
        "a", None, [{"role": "user", "content": "hi"}])
    assert "columns" not in json.loads(invoke("export", job).output)["nightshift"]


def test_system_and_raw_apply_to_table_rows(invoke, model, tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("word\tn\nfox\t1\n")
    job = submit_table(invoke, path, "Define {word}", "--system", "Be brief.")
    store = Store()
    assert json.loads(store._rows("SELECT defaults FROM jobs")[0]["defaults"])["system"] == \
        "Be brief."
    store.close()
    job = submit_table(invoke, path, "The word {word} means", "--raw")
    [row] = stored(job)
    assert (row.kind, json.loads(row.body)) == ("completion", "The word fox means")


def test_a_table_on_standard_input_is_told_by_its_first_bytes(invoke, model, tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"q": ["from parquet"]}), buf)
    for data, expected in [(buf.getvalue(), "from parquet"),
                           (b"q\tz\nfrom tsv, with a comma\t1\n", "from tsv, with a comma"),
                           (b'{"q": "from jsonl"}\n', "from jsonl"),
                           (b"q,z\nfrom csv,1\n", "from csv")]:
        out = invoke("submit", "-", "--model", "fake", "--template", "{q}", "--json",
                     input=data).output
        assert prompts(json.loads(out)["id"]) == [expected]


def typed_table() -> pa.Table:
    paris = pa.timestamp("ns", tz="Europe/Paris")
    return pa.table({
        "id": pa.array([7, 8, 9], pa.int32()),
        "text": ["first", "second", "third"],
        "at": pa.array([1_700_000_000_123_456_789, None, 0], paris),
        "day": pa.array([dt.date(2024, 2, 29), None, dt.date(1970, 1, 1)]),
        "price": pa.array([decimal.Decimal("12.50"), decimal.Decimal("-0.01"), None],
                          pa.decimal128(8, 2)),
        "score": [0.5, float("nan"), None],
        "ok": [True, False, None],
        "tags": [["a", "b"], [], None],
        "kind": pa.array(["x", "y", "x"]).dictionary_encode(),
        # An input column named like one of the export's own.
        "status": ["new", "old", "new"],
    })


def test_a_parquet_file_round_trips_its_columns_typed_through_the_parquet_export(
        invoke, model, tmp_path):
    source = tmp_path / "in.parquet"
    pq.write_table(typed_table(), source, row_group_size=2)  # two row groups to read
    job = submit_table(invoke, source, "Summarise: {text} ({kind}, {id})", "--id-column", "id")
    assert prompts(job) == ["Summarise: first (x, 7)", "Summarise: second (y, 8)",
                            "Summarise: third (x, 9)"]
    assert json.loads(stored(job)[0].input_row) == {
        "id": 7, "text": "first", "at": "2023-11-14 23:13:20.123456789+0100",
        "day": "2024-02-29", "price": "12.50", "score": 0.5, "ok": True, "tags": ["a", "b"],
        "kind": "x", "status": "new"}
    finish(job, {0: "one", 2: "three"})
    out = tmp_path / "out.parquet"
    result = invoke("export", job, "--format", "parquet", "-o", out)
    assert "wrote 3 records" in result.output

    got = pq.read_table(out)
    want = typed_table()
    assert got.column_names == [
        "line", "custom_id", "id", "text", "at", "day", "price", "score", "ok", "tags", "kind",
        "input_status", "status", "response", "finish_reason", "prompt_tokens",
        "cached_tokens", "completion_tokens", "queued_at", "started_at", "first_token_at",
        "finished_at", "ttft_s", "prompt_tps", "generation_tps", "attempts", "error",
        "metadata"]
    for name in ("id", "text", "at", "day", "price", "ok"):
        assert got[name].equals(want[name]), name
    assert got["score"].to_pylist() == [0.5, None, None]  # NaN: missing
    assert got["tags"].to_pylist() == ['["a","b"]', "[]", None]  # JSON text
    assert got["kind"].to_pylist() == ["x", "y", "x"]
    assert got["input_status"].to_pylist() == ["new", "old", "new"]
    assert got["custom_id"].to_pylist() == ["7", "8", "9"]

    # As a data person reads it: DuckDB, with the types of the columns.
    con = duckdb.connect()
    types = dict(con.execute(f"SELECT column_name, column_type FROM "
                             f"(DESCRIBE SELECT * FROM '{out}')").fetchall())
    assert types["id"] == "INTEGER" and types["price"] == "DECIMAL(8,2)"
    assert types["finished_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["at"] in ("TIMESTAMPTZ_NS", "TIMESTAMP WITH TIME ZONE")  # ns since DuckDB 1.2
    assert types["day"] == "DATE" and types["completion_tokens"] == "BIGINT"
    assert types["ttft_s"] == "DOUBLE" and types["response"] == "VARCHAR"
    rows = con.execute(f"SELECT id, text, status, response, finish_reason, completion_tokens, "
                       f"ttft_s, error IS NULL FROM '{out}' ORDER BY line").fetchall()
    assert rows == [(7, "first", "done", "one", "stop", 3, 0.5, True),
                    (8, "second", "queued", None, None, None, None, True),
                    (9, "third", "done", "three", "stop", 3, 0.5, True)]


def test_input_columns_come_back_in_the_csv_and_jsonl_exports(invoke, model, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "text": "x", "n": 1, "line": "mine", "extra": {"k": [1]}}\n'
                    '{"id": "b", "text": "=1+1", "n": 2.5, "line": null}\n')
    job = submit_table(invoke, path, "{text}", "--id-column", "id")
    finish(job, {0: "answer a", 1: "answer b"})

    lines = [json.loads(x) for x in invoke("export", job).output.splitlines()]
    assert [x["nightshift"]["columns"] for x in lines] == [
        {"id": "a", "text": "x", "n": 1, "line": "mine", "extra": {"k": [1]}},
        {"id": "b", "text": "=1+1", "n": 2.5, "line": None}]
    assert [x["response"]["body"]["choices"][0]["message"]["content"] for x in lines] == [
        "answer a", "answer b"]

    table = list(csv.DictReader(io.StringIO(invoke("export", job, "--format", "csv").output)))
    assert list(table[0])[:7] == ["line", "custom_id", "id", "text", "n", "input_line", "extra"]
    assert [(r["line"], r["id"], r["text"], r["n"], r["input_line"], r["extra"], r["response"])
            for r in table] == [("1", "a", "x", "1", "mine", '{"k":[1]}', "answer a"),
                                ("2", "b", "'=1+1", "2.5", "", "", "answer b")]
    raw = list(csv.DictReader(io.StringIO(
        invoke("export", job, "--format", "csv", "--raw-cells").output)))
    assert raw[1]["text"] == "=1+1"

    out = tmp_path / "out.parquet"
    invoke("export", job, "--format", "parquet", "-o", out)
    got = pq.read_table(out)
    assert got.schema.field("n").type == pa.float64()  # whole and decimal numbers: double
    assert got.schema.field("extra").type == pa.string()  # an object: JSON text
    assert got["n"].to_pylist() == [1.0, 2.5] and got["extra"].to_pylist() == ['{"k":[1]}', None]


def test_a_job_of_request_lines_exports_parquet_too(invoke, model, tmp_path):
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "hi", "custom_id": "a", "metadata": {"k": 1}}\n')
    job = json.loads(invoke("submit", lines, "--model", "fake", "--json").output)["id"]
    out = tmp_path / "out.parquet"
    invoke("export", job, "--format", "parquet", "-o", out)
    row = duckdb.sql(f"SELECT custom_id, status, metadata FROM '{out}'").fetchall()
    assert row == [("a", "queued", '{"k":1}')]
    # Not onto a terminal; into a pipe or a file, yes.
    piped = invoke("export", job, "--format", "parquet").stdout_bytes
    assert pq.read_table(io.BytesIO(piped)).num_rows == 1


def test_a_parquet_table_is_read_in_batches_on_each_database(store, tmp_path):
    """A Parquet file of several batches and row groups, stored and exported on SQLite
    and PostgreSQL alike."""
    n = 3 * tables.PARQUET_BATCH_ROWS + 5
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"k": pa.array(range(n), pa.int64()),
                             "q": [f"question {i}" for i in range(n)]}), source,
                   row_group_size=1000)
    with open(source, "rb") as f:
        job, count = submit(store, f, str(source), JobOptions(model="m", template="{q}?",
                                                              id_column="k"), lambda m: m)
    assert count == n
    rows = list(store.iter_requests(job))
    assert (rows[-1].custom_id, rows[-1].line_no) == (str(n - 1), n)
    buf = io.BytesIO()
    assert export(store, job, "parquet", None, stdout=buf) == n
    got = pq.read_table(io.BytesIO(buf.getvalue()))
    assert got["k"].to_pylist() == list(range(n)) and got["k"].type == pa.int64()
    assert store.input_columns(job) == '[{"name":"k","type":"int64"},{"name":"q","type":"string"}]'


def test_column_types_name_arrow_types_that_cast_back():
    for kind in ("int8", "uint64", "double", "float", "bool", "string", "date32[day]",
                 "timestamp[ns, tz=Europe/Paris]", "timestamp[us]", "decimal128(8, 2)",
                 "decimal256(40, 3)"):
        assert str(tables.arrow_type(kind)) == kind
    assert tables.kind_of(pa.list_(pa.int64())) == tables.JSON
    assert tables.kind_of(pa.time64("us")) == tables.kind_of(pa.large_string()) == "string"
    assert tables.arrow_type(tables.JSON) == pa.string()


# -- in bounded memory -------------------------------------------------------------------

# A child's own peak: Linux's VmHWM, of this process image. (Linux's ru_maxrss keeps the
# high-water mark of the process it was forked from, across exec: the test's own.)
PEAK_RSS = """
import resource, sys
from nightshift.cli.main import cli
cli(sys.argv[1:], standalone_mode=False)
try:
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
except OSError:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # macOS: bytes
print(kb // 1024)
"""


def peak_mb(*args) -> int:
    """Run a nightshift command in a child process; its peak resident memory in MB."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[-1])


def million_row_job(home, n: int) -> str:
    """A job of ``n`` finished requests from a table of two columns, each row holding ~330
    characters of input and answer. The job is made by the store; its finished rows are
    written in one pass, as the worker's results would leave them (n calls of
    Store.finish would take minutes)."""
    store = Store()
    job, _ = store.create_job(model="m", defaults={}, specs=iter(()), input_columns=json.dumps(
        [{"name": "id", "type": "int64"}, {"name": "text", "type": "string"}]))
    store.close()
    text_, answer = "t" * 150, "a" * 150
    conn = sqlite3.connect(home / "nightshift.db", isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO requests (job_id, seq, line_no, custom_id, kind, body, status, attempts, "
        "lost, response, finish_reason, prompt_tokens, completion_tokens, started_at, "
        "first_token_at, finished_at, prompt_tps, generation_tps, input_row) VALUES (?, ?, ?, "
        "?, 'chat', '[]', 'done', 1, 0, ?, 'stop', 20, 30, ?, ?, ?, 40.0, 15.0, ?)",
        ((job, i, i + 1, f"r{i}", f"{answer} {i}", 1e9 + i, 1e9 + i + 0.5, 1e9 + i + 2,
          f'{{"id":{i},"text":"{text_} {i}"}}') for i in range(n)))
    conn.execute("UPDATE jobs SET total = ?, n_done = ? WHERE id = ?", (n, n, job))
    conn.execute("COMMIT")
    conn.close()
    return job


@pytest.mark.slow
def test_a_million_row_job_exports_to_parquet_in_bounded_memory(home, tmp_path, model):
    n = 1_000_000
    job = million_row_job(home, n)
    small = tmp_path / "small.csv"
    small.write_text("text\nhello\n")
    small_job = json.loads(subprocess.run(
        [sys.executable, "-m", "nightshift.cli", "submit", small, "--model", "fake",
         "--template", "{text}", "--json"], check=True, capture_output=True).stdout)["id"]
    baseline = peak_mb("export", small_job, "--format", "parquet", "-o", tmp_path / "s.parquet")

    out = tmp_path / "million.parquet"
    peak = peak_mb("export", job, "--format", "parquet", "-o", out)
    # Held at once, the million answers and inputs alone are ~330 MB of text (and several
    # times that as Python objects); streamed, a row group at a time, ~100 MB.
    assert peak - baseline < 160, (peak, baseline)

    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == n and meta.num_row_groups >= n // 20_000
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*), sum(id), max(line), sum(completion_tokens), "
                       f"count(DISTINCT custom_id), min(finished_at - started_at) "
                       f"FROM '{out}'").fetchone() == (
        n, n * (n - 1) // 2, n, 30 * n, n, dt.timedelta(seconds=2))
    assert con.execute(f"SELECT text, response FROM '{out}' WHERE id = 123456").fetchone() == (
        "t" * 150 + " 123456", "a" * 150 + " 123456")


@pytest.mark.slow
def test_a_parquet_file_is_submitted_a_batch_at_a_time(home, tmp_path, model):
    """One row group of 200 MB of text, decompressed: submit never holds it whole."""
    n = 200_000
    source = tmp_path / "big.parquet"
    pq.write_table(pa.table({"k": pa.array(range(n), pa.int64()),
                             "text": pa.array([f"{i} " + "w" * 1000 for i in range(n)])}),
                   source, row_group_size=n)
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"k": [0], "text": ["w"]}), small)
    baseline = peak_mb("submit", small, "--model", "fake", "--template", "{text}", "-q")
    peak = peak_mb("submit", source, "--model", "fake", "--template", "Summarise: {text}",
                   "--id-column", "k", "-q")
    assert peak - baseline < 120, (peak, baseline)
    store = Store()
    [big] = [j for j in store.list_jobs() if j.total == n]
    assert store.input_columns(big.id) == \
        '[{"name":"k","type":"int64"},{"name":"text","type":"string"}]'
    store.close()

"""What `status` reads: the per-status counts kept in ``jobs`` always equal the
requests' own statuses and the percentiles are exact (on SQLite and PostgreSQL);
sqlite3 and SQLAlchemy read the same figures; an older database is upgraded in place;
`status` never imports SQLAlchemy."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

from nightshift.jobs import migrations, settings
from nightshift.jobs.database import open_reads
from nightshift.jobs.reads import SqliteReads
from nightshift.jobs.schema import jobs
from nightshift.jobs.store import Store
from nightshift.jobs.vocabulary import CANCELLED, EXPIRED, STATUSES, Result, count_column
from sqlalchemy import text

from tests.test_store import make_job

REPO = Path(__file__).resolve().parent.parent


def row_counts(store: Store, job_id: str) -> dict[str, int]:
    with store.read() as conn:
        rows = conn.execute(text("SELECT status, COUNT(*) FROM requests WHERE job_id = :j "
                                 "GROUP BY status"), {"j": job_id}).all()
    return dict(rows)


def test_counts_follow_every_move(store):
    """Random claims, results, failures, releases, recoveries, cancels, retries, model
    failures and deadlines passing over three jobs: after each, every job's counts are
    its rows'."""
    rng = random.Random(7)
    job_ids = [make_job(store, 40, model=m)[0] for m in ("a", "a", "b")]
    held: dict[str, list] = {"w1": [], "w2": []}
    seen: set[str] = set()
    for step in range(300):
        [op] = rng.choices(["claim", "finish", "release", "recover", "drop", "retry",
                            "cancel", "fail_model", "claim_lost", "expire"],
                           weights=[4, 4, 1, 1, 1, 1, 0.2, 0.2, 1, 0.3])
        worker = rng.choice(list(held))
        if op == "claim":
            job_id = rng.choice(job_ids)
            for chunk in store.chunks(job_id):
                held[worker] += store.claim(chunk, worker, rng.randint(1, 6))
        elif op == "finish" and held[worker]:
            now = time.time()
            batch, held[worker] = held[worker][:3], held[worker][3:]
            store.finish([Result(c.id, c.job_id, now - 1, now, first_token_at=now - rng.random(),
                                 response="x", prompt_tokens=4, completion_tokens=2,
                                 error="boom" if rng.random() < 0.3 else None)
                          for c in batch], worker)
        elif op == "claim_lost":
            held[worker] += store.claim_lost(worker, rng.choice(["a", "b"]), 3)
        elif op == "release" and held[worker]:
            store.release([c.id for c in held[worker]], worker)
            held[worker] = []
        elif op == "recover":  # neither worker registered: both are taken as gone
            store.recover("me")
            held = {w: [] for w in held}
        elif op == "cancel":
            store.cancel(rng.choice(job_ids))
        elif op == "retry":
            store.retry(rng.choice(job_ids))
        elif op == "fail_model":
            store.fail_model("b", "cannot load")
        elif op == "drop" and held[worker]:
            store.mark_dropped([c.id for c in held[worker]], worker,
                               rng.choice([CANCELLED, EXPIRED]))
            held[worker] = []
        elif op == "expire":  # a deadline passes (retry lifts it again)
            with store.write() as conn:
                conn.execute(jobs.update().where(jobs.c.id == rng.choice(job_ids))
                             .values(deadline=time.time() - 1))
            store.expire()
        for job_id in job_ids:
            job = store.job(job_id)
            assert job.counts == row_counts(store, job_id), (step, op, job_id)
            assert sum(job.counts.values()) == job.total
            seen |= set(job.counts)
    assert seen == set(STATUSES)  # every move was made


def finish_with_ttfts(store: Store, job_id: str, ttfts: list[float]) -> None:
    claimed = store.claim(store.chunks(job_id)[0], "w", len(ttfts))
    now = time.time()
    store.finish([Result(c.id, job_id, now - 10, now, first_token_at=now - 10 + t,
                         response="x", prompt_tokens=10 + i, completion_tokens=3)
                  for i, (c, t) in enumerate(zip(claimed, ttfts))], "w")


def test_request_stats_are_the_nearest_rank_percentiles(store):
    rng = random.Random(3)
    for n in (1, 2, 7, 100):
        job_id, _ = make_job(store, n + 2)  # two stay queued: not counted
        ttfts = [round(rng.uniform(0.1, 9.0), 3) for _ in range(n)]
        finish_with_ttfts(store, job_id, ttfts)
        stats = store.request_stats(job_id)
        ranked = sorted(ttfts)
        for q, key in ((0.5, "ttft_p50"), (0.95, "ttft_p95")):
            expected = ranked[min(n - 1, round(q * (n - 1)))]
            assert abs(stats[key] - expected) < 1e-6, (n, key, stats[key], expected)
        # Each request's prompt rate is tokens / time to first token.
        rates = [(10 + i) / t for i, t in enumerate(ttfts)]
        assert abs(stats["prompt_tps_mean"] - sum(rates) / n) < 1e-6 * stats["prompt_tps_mean"]
    empty, _ = make_job(store, 1)
    assert store.request_stats(empty) == {"ttft_p50": None, "ttft_p95": None,
                                          "prompt_tps_mean": None}


def test_sqlite_reads_equal_the_store_reads(home):
    store = Store()  # SQLite: the file sqlite3 reads
    job_id, _ = make_job(store, 6, name="n")
    finish_with_ttfts(store, job_id, [0.5, 1.5, 2.5])
    make_job(store, 2, model="other")
    store.register_worker("h:1:1", "elsewhere", 1, None)  # another host: no pid check
    store.record_switch("h:1:1", "m", "other", 0.1, 1.0, 0.2)

    reads = open_reads()
    assert isinstance(reads, SqliteReads)
    assert reads.job(job_id) == store.job(job_id)  # every stored field
    assert reads.request_stats(job_id) == store.request_stats(job_id)
    assert reads.list_jobs(1) == store.list_jobs(1) and len(store.list_jobs(1)) == 1
    assert reads.models_waiting() == store.models_waiting() == {"m": 3, "other": 2}
    assert [w.id for w in reads.live_workers()] == [w.id for w in store.live_workers()]
    assert len(store.live_workers()) == 1
    assert reads.switches() == store.switches() and store.switches()[0].to_model == "other"


def test_open_reads_creates_or_migrates_through_the_store(home, tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    assert isinstance(open_reads(url), Store)  # no file yet: the store creates it
    assert isinstance(open_reads(url), SqliteReads)
    assert isinstance(open_reads("sqlite://"), Store)  # in memory: never sqlite3 directly


def test_m002_upgrades_a_database_made_before_it(home):
    store = Store()
    job_id, _ = make_job(store, 5)
    finish_with_ttfts(store, job_id, [1.0, 2.0])
    store.cancel(job_id)
    expected = (store.job(job_id), store.request_stats(job_id))
    store.close()
    # Back to what m001 made: no counters, no index, m002 not recorded.
    db = settings.home() / "nightshift.db"
    import sqlite3

    conn = sqlite3.connect(db)
    conn.execute("DROP INDEX requests_done_ttft")
    # The counters m002 adds (expired's came later, with m010).
    for column in ([count_column(s) for s in STATUSES if s != EXPIRED]
                   + ["prompt_tps_sum", "prompt_tps_n"]):
        conn.execute(f"ALTER TABLE jobs DROP COLUMN {column}")
    conn.execute("DELETE FROM nightshift_migrations WHERE name = 'm002_job_counts'")
    conn.commit()
    conn.close()
    assert not SqliteReads(db).migrated()

    upgraded = Store()
    assert (upgraded.job(job_id), upgraded.request_stats(job_id)) == expected
    assert SqliteReads(db).migrated()
    with upgraded.read() as c:
        recorded = c.execute(text("SELECT name FROM nightshift_migrations")).scalars()
        assert sorted(recorded) == sorted(migrations.names())  # m002 recorded after m003


def heavy_imports(*args: str) -> tuple[str, list[str]]:
    """Run `nightshift ARGS` in a fresh interpreter; its output, and which of SQLAlchemy,
    MLX and rich it imported."""
    code = ("import sys; from nightshift.cli.main import cli\n"
            f"cli({list(args)!r}, standalone_mode=False)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'sqlalchemy', 'mlx', 'mlx_lm', 'rich'}), file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, check=True, timeout=60)
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1].replace("'", '"'))


def test_status_does_not_import_sqlalchemy(home):
    job_id, _ = make_job(Store(), 3)
    out, heavy = heavy_imports("status", job_id, "--json")
    assert json.loads(out)["counts"]["queued"] == 3
    assert heavy == []
    out, heavy = heavy_imports("status")
    assert job_id in out
    assert heavy == ["rich"]  # the jobs table

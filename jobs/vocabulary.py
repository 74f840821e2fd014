"""The words every layer shares: request statuses, worker states, the request, claim and
result types, and how timings are defined. It imports nothing of the project, so any
module may import it, the schema and the engine included.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class _Word(str, Enum):
    """A state stored as its text: equal to, hashed and formatted as that text, so rows
    read back as plain strings compare and index the same."""

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class RequestStatus(_Word):
    """Where a request is: queued, running (claimed by one worker), or one of the ends:
    expired is not run (or not finished) by its job's deadline (``submit --deadline``)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED = RequestStatus
TERMINAL = (DONE, FAILED, CANCELLED, EXPIRED)
STATUSES = tuple(RequestStatus)


class WorkerState(_Word):
    """What a worker reports in its heartbeat."""

    LOADING = "loading"  # loading a model (at start, or switching)
    WARMING = "warming"  # loaded, running its warm-up batch
    IDLE = "idle"  # ready, nothing to run
    RUNNING = "running"  # generating
    STOPPED = "stopped"  # exited (the last heartbeat says so)


def count_column(status: str) -> str:
    """The ``jobs`` column counting a job's requests in ``status``."""
    return f"n_{status}"


# Time to first token: from admission into the batch to the first generated token. In
# SQL (status reads p50/p95 off an index on this very expression) and in Python.
TTFT = "first_token_at - started_at"
# The partial index over done requests' time to first token (jobs/schema.py): queries
# repeat its condition word for word, as SQLite needs to use it.
DONE_TTFT_WHERE = "status = 'done' AND first_token_at IS NOT NULL"


def ttft_seconds(started_at: float | None, first_token_at: float | None) -> float | None:
    """Time to first token, as ``TTFT`` computes it in SQL."""
    return first_token_at - started_at if first_token_at and started_at else None


@dataclass(frozen=True)
class Chunk:
    """A range of a job's requests, as the queue carries it."""

    job_id: str
    lo: int
    hi: int  # inclusive
    priority: int = 0
    not_before: float | None = None
    model: str = ""


@dataclass
class Claimed:
    """A request taken by a worker, with what it needs to run it."""

    id: int
    job_id: str
    seq: int
    kind: str
    body: object  # messages list or prompt string
    params: dict  # job defaults merged with the line's overrides
    system: str | None
    lost: int = 0  # times a worker died while running it


@dataclass
class Result:
    """The outcome of one request, as the worker reports it."""

    id: int
    job_id: str
    started_at: float
    finished_at: float
    first_token_at: float | None = None
    response: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    # The answer's tokens, each {"token", "logprob", "bytes", "top_logprobs"} (OpenAI's
    # chat shape), where the request asked for log-probabilities.
    logprobs: list[dict] | None = None
    # A reasoning model's thinking, apart from the answer (response).
    reasoning: str | None = None
    # Every sample of a request with n > 1, each {"text", "finish_reason", "logprobs",
    # "reasoning", "completion_tokens"}; the first is also response, finish_reason,
    # logprobs and reasoning.
    choices: list[dict] | None = None

    @property
    def status(self) -> RequestStatus:
        return FAILED if self.error is not None else DONE

    @property
    def prompt_tps(self) -> float | None:
        """Prompt tokens computed here (not taken from a shared prefix) per second of
        prefill, from admission to the first token."""
        prefill_time = (self.first_token_at - self.started_at) if self.first_token_at else None
        computed = (self.prompt_tokens or 0) - (self.cached_tokens or 0)
        return computed / prefill_time if prefill_time else None

    @property
    def generation_tps(self) -> float | None:
        """Tokens per second of decode: the first token comes from prefill, the rest
        from decode steps."""
        gen_time = (self.finished_at - self.first_token_at) if self.first_token_at else None
        return ((self.completion_tokens or 1) - 1) / gen_time if gen_time else None


@dataclass(frozen=True)
class Recovered:
    """What taking back a dead worker's requests did."""

    requeued: int  # queued again, to run isolated (see ``claim_lost``)
    failed: int  # lost too often: failed with the reason

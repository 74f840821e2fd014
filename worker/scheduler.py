"""The worker's schedule: the chunks of work it knows of, best first.

Chunks arrive from queue tasks (Huey's thread) and from the worker's own sweeps of the
database (the engine thread); the engine thread claims from the best chunk of the
loaded model and drops a chunk once nothing in it is left to claim. Best is the
highest job priority, then the earliest to arrive. The database decides what actually
runs (worker/dispatch.py): a chunk here is only where to look.
"""

from __future__ import annotations

import threading
from collections.abc import Collection
from dataclasses import dataclass, field

from nightshift.jobs.vocabulary import Chunk


@dataclass(order=True)
class _Entry:
    neg_priority: int
    arrival: int
    chunk: Chunk = field(compare=False)


class Scheduler:
    """Chunks by priority and arrival, shared by threads: each method takes the lock,
    and ``changed`` (a Condition on it) is notified whenever the set changes."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self._entries: list[_Entry] = []
        self._arrivals = 0

    def __len__(self) -> int:
        with self.changed:
            return len(self._entries)

    def add(self, chunk: Chunk) -> bool:
        """Add a chunk unless the same range is already here; returns whether added."""
        with self.changed:
            key = (chunk.job_id, chunk.lo, chunk.hi)
            if any((e.chunk.job_id, e.chunk.lo, e.chunk.hi) == key for e in self._entries):
                return False
            self._arrivals += 1
            self._entries.append(_Entry(-chunk.priority, self._arrivals, chunk))
            self._entries.sort()
            self.changed.notify_all()
            return True

    def best_for(self, model: str | None) -> Chunk | None:
        """The best chunk a worker with ``model`` loaded can claim from (a chunk that
        names no model fits any)."""
        with self.changed:
            return next((e.chunk for e in self._entries if _fits(e.chunk, model)), None)

    def has_for(self, model: str | None) -> bool:
        return self.best_for(model) is not None

    def next_model(self, skip: Collection[str] = ()) -> str | None:
        """The model of the best chunk whose model is not in ``skip``."""
        with self.changed:
            return next((e.chunk.model for e in self._entries if e.chunk.model not in skip),
                        None)

    def drop(self, chunk: Chunk) -> None:
        """Forget a chunk (nothing left in it to claim)."""
        with self.changed:
            self._entries = [e for e in self._entries if e.chunk != chunk]
            self.changed.notify_all()

    def drop_model(self, model: str) -> None:
        """Forget every chunk of a model (it cannot load, or its work is gone)."""
        with self.changed:
            self._entries = [e for e in self._entries if e.chunk.model != model]
            self.changed.notify_all()


def _fits(chunk: Chunk, model: str | None) -> bool:
    return model is not None and (not chunk.model or chunk.model == model)

"""The worker's schedule: best first (priority, then arrival), per model, no duplicates."""

from __future__ import annotations

from nightshift.jobs.vocabulary import Chunk
from nightshift.worker.scheduler import Scheduler


def test_best_first_by_priority_then_arrival_for_the_loaded_model():
    s = Scheduler()
    old = Chunk("a", 0, 9, priority=0, model="m")
    urgent = Chunk("b", 0, 9, priority=5, model="other")
    later = Chunk("c", 0, 9, priority=0, model="m")
    for chunk in (old, urgent, later):
        assert s.add(chunk)
    assert not s.add(Chunk("a", 0, 9, priority=0, model="m"))  # the same range again
    assert len(s) == 3
    assert s.best_for("m") == old and s.best_for("other") == urgent
    assert s.best_for(None) is None and not s.has_for("nothing")
    assert s.next_model() == "other" and s.next_model(skip={"other"}) == "m"
    s.drop(old)
    assert s.best_for("m") == later
    s.drop_model("m")
    assert len(s) == 1 and s.next_model(skip={"other"}) is None

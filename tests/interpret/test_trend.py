from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance.interpret.priors import with_priors
from appliance.interpret.trend import compare, with_trend
from appliance.journal import Journal
from appliance.result import Result, Sentence, Severity
from testsupport.results import make_result

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def with_extent(n: int, extent: float, when: datetime) -> Result:
    result = make_result(n, acquired_at=when)
    sentences = [
        Sentence(text="Frontal view.", source="view.frontal"),
        Sentence(text="Not for diagnostic use.", source="disclaimer"),
    ]
    return result.model_copy(
        update={"severity": Severity(extent=extent, opacity=2.0), "sentences": sentences, "text": "x"}
    )


def test_worse_two_days_later_gets_a_sentence_before_the_disclaimer() -> None:
    prior = with_extent(1, 3.0, T0)
    current = with_extent(2, 5.0, T0 + timedelta(days=2))
    result = with_trend(current, prior)
    assert result.trend is not None and result.trend.direction == "worse"
    assert result.trend.interval_hours == 48.0
    assert [s.source for s in result.sentences] == ["view.frontal", "trend", "disclaimer"]
    assert result.sentences[1].text == "Worse than 2 days ago: extent 3.0 → 5.0 of 8."
    assert result.text.endswith("Worse than 2 days ago: extent 3.0 → 5.0 of 8. Not for diagnostic use.")


def test_small_changes_are_unchanged_and_improvement_is_better() -> None:
    assert (
        compare(with_extent(2, 3.4, T0 + timedelta(hours=6)), with_extent(1, 3.0, T0)).direction
        == "unchanged"
    )
    trend = compare(with_extent(2, 1.0, T0 + timedelta(hours=12)), with_extent(1, 4.0, T0))
    assert trend.direction == "better" and trend.interval_hours == 12.0


def test_the_journal_finds_the_prior_across_time_zones(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    # 09:00+01:00 is 08:00 UTC: earlier than 08:30 UTC although its wall-clock reads later.
    earlier = make_result(1, acquired_at=datetime(2026, 3, 1, 9, 0, tzinfo=timezone(timedelta(hours=1))))
    later = make_result(2, acquired_at=datetime(2026, 3, 1, 8, 30, tzinfo=timezone.utc))
    journal.record_result(earlier)
    journal.record_result(later)
    priors = journal.priors(str(later.patient_key), later.image.acquired_at, limit=1)
    assert [p.image.image_id for p in priors] == [earlier.image.image_id]
    assert journal.priors(str(earlier.patient_key), earlier.image.acquired_at, limit=1) == []
    journal.close()


@pytest.mark.parametrize(
    ("before", "now", "said"),
    [
        # Found by a review run: "Unchanged since ...: extent 2 → 3 of 8" (whole numbers, 0.9 apart).
        (2.5, 3.4, "No change of 1 point or more since 6 hours ago: extent 2.5 → 3.4 of 8."),
        # One decimal each would read 2.4 -> 3.4, a whole point, beside "no change": two decimals then.
        (2.44, 3.43, "No change of 1 point or more since 6 hours ago: extent 2.44 → 3.43 of 8."),
        (2.4, 3.4, "Worse than 6 hours ago: extent 2.4 → 3.4 of 8."),  # 3.4 - 2.4 is 0.9999999 unrounded
        (3.5, 2.5, "Better than 6 hours ago: extent 3.5 → 2.5 of 8."),
    ],
)
def test_the_trend_sentence_says_the_change_it_quotes(before: float, now: float, said: str) -> None:
    result = with_trend(with_extent(2, now, T0 + timedelta(hours=6)), with_extent(1, before, T0))
    assert result.sentences[1].text == said


def test_a_prior_read_by_another_model_is_not_compared(tmp_path: Path) -> None:
    """Another model's (or version's) extent is on another scale: a change of model is not a change of
    the patient. The last prior of the same model is compared instead, when there is one."""
    journal = Journal(tmp_path / "j.sqlite3")
    same = with_extent(1, 1.0, T0)
    other = with_extent(2, 1.0, T0 + timedelta(hours=1))
    other = other.model_copy(
        update={"provenance": other.provenance.model_copy(update={"model": "some-other-model"})}
    )
    for result in (same, other):
        journal.record_result(result)
    current = with_extent(3, 4.0, T0 + timedelta(hours=2))
    trended = with_priors(current, journal, None)
    assert trended.trend is not None and trended.trend.prior_image_id == same.image.image_id
    journal.close()
    alone = Journal(tmp_path / "alone.sqlite3")
    alone.record_result(other)
    assert with_priors(current, alone, None).trend is None
    alone.close()


def test_the_trend_quotes_an_extent_on_its_side_of_the_urgent_extent() -> None:
    """5.96 is below the urgent 6: "5.96", as the severity sentence says it, never "6.0" (review run)."""
    result = with_trend(with_extent(2, 5.96, T0 + timedelta(hours=30)), with_extent(1, 3.0, T0), 6.0)
    assert result.sentences[1].text == "Worse than 30 hours ago: extent 3.00 → 5.96 of 8."

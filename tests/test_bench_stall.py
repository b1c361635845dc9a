"""``membrain bench stall``: how the decoding stream's gaps are split (pure arithmetic on
timestamps; the benchmark itself runs vLLM and is not a test)."""

from __future__ import annotations

import pytest

from membrain.bench.stall import gap_stats


def _phase(stamps, arrive, first):
    return {"decode_stamps": stamps, "long_arrive": arrive, "long_first_token": first}


def test_gaps_split_into_before_waiting_and_compute_step():
    # 10 ms steps; the request arrives at 0.045; two 30 ms gaps while its KV loads; the step that
    # computes its remaining tokens takes 80 ms and ends with its first token (0.225).
    stamps = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.08, 0.11, 0.12, 0.2, 0.21, 0.22]
    s = gap_stats(_phase(stamps, 0.045, 0.2001))
    assert s["median_gap_before_s"] == pytest.approx(0.01)
    assert s["gaps_while_waiting"] == 4  # 0.05, 0.08, 0.11, 0.12
    assert s["max_gap_while_waiting_s"] == pytest.approx(0.03)
    assert s["max_wait_gap_ratio"] == pytest.approx(3.0)
    assert s["excess_while_waiting_s"] == pytest.approx(0.0 + 0.02 + 0.02 + 0.0)
    assert s["compute_step_s"] == pytest.approx(0.08)
    assert s["ttft_s"] == pytest.approx(0.1551)


def test_request_served_in_the_next_step_has_no_waiting_gaps():
    stamps = [0.0, 0.01, 0.02, 0.07, 0.08]
    s = gap_stats(_phase(stamps, 0.025, 0.07))
    assert s["gaps_while_waiting"] == 0 and s["max_gap_while_waiting_s"] == 0.0
    assert s["compute_step_s"] == pytest.approx(0.05)


def test_a_stream_that_ends_before_the_first_token_is_flagged():
    # The stream's last token (0.05) comes before the long request's first (0.3): its gaps do not
    # cover the wait, and its last gap is not the step that computed the request's tokens.
    stamps = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05]
    s = gap_stats(_phase(stamps, 0.025, 0.3))
    assert s["stream_covered_wait"] is False
    assert gap_stats(_phase([0.0, 0.01, 0.02, 0.07, 0.08], 0.025, 0.07))["stream_covered_wait"] is True

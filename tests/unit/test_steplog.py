"""Tests of the steps.jsonl reader (bevdepth_npu/steplog.py).

Run: python -m pytest tests/unit/test_steplog.py -q
The fixtures are in tests/fixtures/steps/: clean.jsonl (steps 1-8 of one process),
resumed.jsonl (steps 1-6, then a second process resuming at step 4 up to 8), malformed.jsonl
(every kind of unusable line, a nan loss and a cut-off last line).
"""
from __future__ import annotations

import json
import math
import os

import pytest

from bevdepth_npu.steplog import parse_record, read_step_lines, read_steps

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "steps")

GOOD = {"step": 3, "epoch": 1, "step_time_s": 0.5, "data_time_s": 0.125, "loss": 2.5,
        "lr": 1e-4, "global_batch": 16, "images_per_sample": 12, "process_step": 1}


def line(**changes) -> str:
    return json.dumps(dict(GOOD, **changes)) + "\n"


def test_a_clean_log_reads_back_every_field():
    log = read_steps(os.path.join(FIXTURES, "clean.jsonl"))
    assert [r.step for r in log.records] == list(range(1, 9))
    assert [r.epoch for r in log.records] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r.step_time_s for r in log.records] == [9.5, 3.25, 2.5, 2.25, 2.125, 2.0, 2.0, 4.0]
    assert all(r.global_batch == 64 and r.images_per_sample == 12 and r.total_steps == 8
               for r in log.records)
    assert not log.malformed and log.restarts == 0 and log.duplicates_dropped == 0
    assert [r.step for r in log.measured(5)] == [6, 7, 8]
    assert log.measured(0) == log.records


def test_a_resumed_log_keeps_the_last_occurrence_and_warms_up_again():
    log = read_steps(os.path.join(FIXTURES, "resumed.jsonl"))
    assert [r.step for r in log.records] == list(range(1, 9))
    assert [r.loss for r in log.records] == [11, 12, 13, 24, 25, 26, 27, 28]
    assert log.duplicates_dropped == 3 and log.restarts == 1
    # Warm-up counts per process: steps 1-2 of the first, 4-5 (its first two) of the second.
    assert [r.step for r in log.measured(2)] == [3, 6, 7, 8]


def test_process_runs_come_from_process_step_not_from_the_step_numbers():
    """A resume whose step numbers simply go on is still a new process that warms up."""
    text = [line(step=1, process_step=1), line(step=2, process_step=2),
            line(step=3, process_step=1), line(step=4, process_step=2)]
    log = read_step_lines(text)
    assert log.restarts == 1 and log.duplicates_dropped == 0
    assert [r.step for r in log.measured(1)] == [2, 4]


def test_malformed_lines_are_counted_with_their_reason():
    log = read_steps(os.path.join(FIXTURES, "malformed.jsonl"))
    assert [r.step for r in log.records] == [1, 2, 3]
    assert math.isnan(log.records[1].loss)   # null loss: a diverged step is data
    reasons = [(m.line_no, m.reason) for m in log.malformed]
    assert reasons[0] == (2, "missing key(s): images_per_sample")
    assert (3, "step_time_s is not a number: 'fast'") in reasons
    assert (4, "step is not an integer: 2.0") in reasons
    assert any(no == 5 and "Expecting" in why for no, why in reasons)   # not JSON
    assert (6, "not a JSON object") in reasons
    assert (7, "step must be >= 1, got 0") in reasons
    assert (8, "step_time_s must be > 0, got 0") in reasons
    assert (9, "lr must be >= 0.0, got -0.1") in reasons
    assert (10, "global_batch is not an integer: True") in reasons
    assert (13, "step_time_s is not finite: nan") in reasons
    assert reasons[-1] == (17, "truncated: last line of the file has no newline")
    assert len(log.malformed) == 13
    assert log.malformed[0].excerpt.startswith('{"step": 2, "epoch": 0')


def test_only_the_last_line_may_be_cut():
    lines = [line(step=1), line(step=2, process_step=2)[:-1]]
    log = read_step_lines(lines)
    assert [r.step for r in log.records] == [1]
    assert log.malformed[0].reason.startswith("truncated")
    # The same record with its newline counts.
    assert [r.step for r in read_step_lines([line(step=1), line(step=2)]).records] == [1, 2]


def test_optional_fields_and_unknown_keys():
    record = parse_record(dict(GOOD, total_steps=None, time_s=12.5, note="ignored"))
    assert record.total_steps is None and record.time_s == 12.5
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        parse_record(dict(GOOD, total_steps=0))
    with pytest.raises(ValueError, match="missing key"):
        parse_record({"step": 1})


def test_measured_rejects_negative_warmup():
    with pytest.raises(ValueError):
        read_step_lines([line()]).measured(-1)


def test_blank_lines_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_bytes(line(step=1).replace("\n", "\r\n").encode() + b"\n" + line(step=2).encode())
    log = read_steps(path)
    assert [r.step for r in log.records] == [1, 2] and not log.malformed

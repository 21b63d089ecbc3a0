"""Tests of the step-log format and its parser (bevdepth_npu/steplog.py).

Run: python -m pytest tests/unit/test_steplog.py -q
The fixture logs live in tests/fixtures/steplogs/; each test says what it expects of them.
"""
from __future__ import annotations

import math
import os

import pytest

from bevdepth_npu.steplog import (
    FIELD_NAMES,
    MARKER,
    MalformedStepLine,
    StepRecord,
    format_step_line,
    log_has_step_marker,
    parse_step_line,
    parse_step_lines,
    parse_step_log,
)

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "steplogs")

GOOD = ("BEVDEPTH_STEP step=12 epoch=0 step_time_s=1.98234 data_time_s=0.0123 loss=3.5 "
        "lr=0.0002 global_batch=64 images_per_sample=12")


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


# ----- the writer ------------------------------------------------------------------------------

def test_format_exact_text():
    line = format_step_line(12, 0, 1.98234, 0.0123, 3.5, 0.0002, 64, 12)
    assert line == GOOD


def test_format_uses_6_significant_digits():
    line = format_step_line(1, 3, 2.123456789, 1e-7, 12.3456789, 3.125e-06, 8, 12)
    assert line == ("BEVDEPTH_STEP step=1 epoch=3 step_time_s=2.12346 data_time_s=1e-07 "
                    "loss=12.3457 lr=3.125e-06 global_batch=8 images_per_sample=12")


def test_format_then_parse_round_trips():
    values = (7, 2, 0.731234567, 0.25, 1.234567e-3, 1.5e-4, 16, 12)
    record = parse_step_line(format_step_line(*values))
    assert record == StepRecord(7, 2, 0.731235, 0.25, 0.00123457, 0.00015, 16, 12)


def test_format_nan_loss_is_written_and_read_back():
    record = parse_step_line(format_step_line(3, 0, 1.0, 0.1, float("nan"), 1e-4, 64, 12))
    assert record is not None and math.isnan(record.loss)
    record = parse_step_line(format_step_line(3, 0, 1.0, 0.1, float("-inf"), 1e-4, 64, 12))
    assert record is not None and record.loss == float("-inf")


def test_format_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    line = format_step_line(np.int64(5), np.int32(0), np.float32(0.5), np.float64(0.125),
                            np.float32(2.0), np.float64(2e-4), np.int64(64), 12)
    assert line == ("BEVDEPTH_STEP step=5 epoch=0 step_time_s=0.5 data_time_s=0.125 loss=2 "
                    "lr=0.0002 global_batch=64 images_per_sample=12")


@pytest.mark.parametrize("field, value, error", [
    ("step", 0, ValueError),
    ("step", 1.0, TypeError),
    ("step", True, TypeError),
    ("epoch", -1, ValueError),
    ("step_time_s", 0.0, ValueError),
    ("step_time_s", float("nan"), ValueError),
    ("data_time_s", -0.5, ValueError),
    ("lr", float("inf"), ValueError),
    ("loss", "3.0", TypeError),
    ("global_batch", 0, ValueError),
    ("images_per_sample", 0, ValueError),
])
def test_format_rejects_what_the_parser_would_drop(field, value, error):
    values = dict(step=1, epoch=0, step_time_s=1.0, data_time_s=0.1, loss=1.0, lr=1e-4,
                  global_batch=8, images_per_sample=12)
    values[field] = value
    with pytest.raises(error, match=field):
        format_step_line(**values)


# ----- one line --------------------------------------------------------------------------------

def test_parse_good_line():
    assert parse_step_line(GOOD + "\n") == StepRecord(12, 0, 1.98234, 0.0123, 3.5, 0.0002, 64, 12)


@pytest.mark.parametrize("line", [
    "",
    "\n",
    "Epoch 0:  10%|█         | 4/40 [00:08<01:12,  2.00s/it]\n",
    "BEVDEPTH_STEPS are written by rank 0 only\n",
    "bevdepth_step step=1\n",
])
def test_non_step_lines_give_none(line):
    assert parse_step_line(line) is None


@pytest.mark.parametrize("suffix", ["", "\n", "\r\n", "   \n", "\t\n"])
def test_line_endings_and_trailing_blanks_are_tolerated(suffix):
    assert parse_step_line(GOOD + suffix) is not None


def test_marker_after_a_progress_bar_fragment_and_prefix():
    line = "Epoch 0:   3%|▎         | 12/439 [00:30<17:00]\rINFO:root:" + GOOD + "\n"
    record = parse_step_line(line)
    assert record is not None and record.step == 12


@pytest.mark.parametrize("line, reason", [
    ("BEVDEPTH_STEP \n", "no fields"),
    (GOOD.replace(" images_per_sample=12", ""), "missing key(s): images_per_sample"),
    (GOOD.replace("loss=3.5", "loss=three"), "loss='three' is not a number"),
    (GOOD.replace("step=12", "step=12.0"), "not a decimal integer"),
    (GOOD.replace("step=12", "step=-1"), "not a decimal integer"),
    (GOOD.replace("global_batch=64", "global_batch=6_4"), "not a decimal integer"),
    (GOOD.replace("lr=0.0002", "lr=1e999"), "not finite"),
    (GOOD.replace("step_time_s=1.98234", "step_time_s=inf"), "not a number"),
    (GOOD + " extra=1", "unexpected key(s): extra"),
    (GOOD.replace("epoch=0 ", "epoch=0  "), "single spaces"),
    (GOOD.replace("step=12 epoch=0", "epoch=0 step=12"), "keys out of order"),
    (GOOD.replace("epoch=0", "epoch"), "is not key=value"),
    (GOOD + " step=13", "key step appears twice"),
    (GOOD.replace("data_time_s=0.0123", "data_time_s=-0.1"), "data_time_s must be >= 0"),
    (GOOD.replace("step_time_s=1.98234", "step_time_s=0"), "step_time_s must be > 0"),
    (GOOD + "\rEpoch 0: 5%|", "interrupted"),
])
def test_malformed_lines_raise_with_reason(line, reason):
    with pytest.raises(MalformedStepLine) as err:
        parse_step_line(line)
    assert reason in str(err.value)


def test_a_cut_record_followed_by_a_whole_one_gives_the_whole_one():
    line = GOOD[:40] + GOOD.replace("step=12", "step=13") + "\n"
    record = parse_step_line(line)
    assert record is not None and record.step == 13


def test_field_names_match_the_record():
    assert FIELD_NAMES == tuple(StepRecord.__dataclass_fields__)
    assert MARKER == "BEVDEPTH_STEP "


# ----- whole logs ------------------------------------------------------------------------------

def test_clean_log_with_other_output():
    log = parse_step_log(fixture("clean.log"))
    assert [r.step for r in log.records] == list(range(1, 9))
    assert log.malformed == [] and log.duplicates_dropped == 0 and log.restarts == 0
    assert log.records[0] == StepRecord(1, 0, 9.5, 5.0, 4.0, 6.66667e-05, 64, 12)
    assert log.records[7] == StepRecord(8, 0, 4.0, 0.75, 2.0, 0.0002, 64, 12)
    assert log.lines_read == 18
    assert [r.step for r in log.measured(5)] == [6, 7, 8]
    assert [r.step for r in log.measured(0)] == list(range(1, 9))


def test_progress_bar_interleaving():
    path = fixture("progress_cr.log")
    with open(path, "rb") as handle:
        raw = handle.read()
    # Guard: the fixture must keep its carriage returns and its unterminated last line.
    assert raw.count(b"\r") >= 5 and not raw.endswith(b"\n")
    log = parse_step_log(path)
    assert [r.step for r in log.records] == [1, 2, 4]
    assert log.records[1].step_time_s == 3.25
    # Step 3 had a progress bar land inside it (its "2" of images_per_sample came after the
    # bar); step 4's line starts with a cut-off copy of itself.
    assert [(m.line_no, "interrupted" in m.reason) for m in log.malformed] == [(3, True), (4, True)]
    assert log.malformed[0].excerpt.startswith("BEVDEPTH_STEP step=3 ")
    # The last line (a progress bar without a newline) is not a step line: nothing to report.
    assert log.lines_read == 6


def test_malformed_fixture_is_counted_line_by_line():
    log = parse_step_log(fixture("malformed.log"))
    assert [r.step for r in log.records] == [1, 2, 3]
    assert math.isnan(log.records[1].loss)   # a nan loss is data, not a broken line
    reasons = {m.line_no: m.reason for m in log.malformed}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 17]
    assert reasons[3] == "missing key(s): images_per_sample"
    assert reasons[4] == "step_time_s='fast' is not a number"
    assert reasons[5] == "step='2.0' is not a decimal integer"
    assert reasons[6].startswith("keys out of order")
    assert reasons[7] == "unexpected key(s): extra"
    assert reasons[8] == "fields must be separated by single spaces"
    assert reasons[9] == "step must be >= 1, got 0"
    assert reasons[10] == "step_time_s must be > 0, got 0.0"
    assert reasons[11] == "step_time_s='nan' is not a number"
    assert reasons[12] == "global_batch='1_000' is not a decimal integer"
    assert reasons[13] == "field 'step' is not key=value"
    assert reasons[16] == "lr must be >= 0.0, got -0.1"
    assert reasons[17] == "key step appears twice"


def test_resumed_run_keeps_the_last_occurrence_and_warms_up_again():
    log = parse_step_log(fixture("resumed.log"))
    assert [r.step for r in log.records] == list(range(1, 9))
    assert log.duplicates_dropped == 3 and log.restarts == 1
    # Steps 4-6 come from the resumed process (loss 20 + step), not the crashed one (10 + step).
    assert [r.loss for r in log.records] == [11, 12, 13, 24, 25, 26, 27, 28]
    # Positions within each process run: 0, 1, 2 for the first; the resumed one restarts at 0.
    assert log.run_positions == [0, 1, 2, 0, 1, 2, 3, 4]
    assert [r.step for r in log.measured(2)] == [3, 6, 7, 8]
    with pytest.raises(ValueError, match="warmup_steps"):
        log.measured(-1)


def test_log_without_steps():
    log = parse_step_log(fixture("no_steps.log"))
    assert log.records == [] and log.malformed == [] and log.lines_read == 5
    assert not log_has_step_marker(fixture("no_steps.log"))
    assert log_has_step_marker(fixture("clean.log"))


def test_empty_log(tmp_path):
    path = tmp_path / "train.log"
    path.write_bytes(b"")
    log = parse_step_log(path)
    assert log.records == [] and log.malformed == [] and log.lines_read == 0


def test_truncated_last_line_is_reported_not_used(tmp_path):
    with open(fixture("clean.log"), "rb") as handle:
        clean = handle.read()
    # A complete-looking record without its newline: the writer may have been stopped
    # between "images_per_sample=1" and "2".
    whole = format_step_line(9, 0, 2.0, 0.5, 1.75, 0.0002, 64, 12).encode()
    path = tmp_path / "train.log"
    path.write_bytes(clean + whole[:-1])
    log = parse_step_log(path)
    assert [r.step for r in log.records] == list(range(1, 9))
    assert len(log.malformed) == 1
    assert log.malformed[0].line_no == 19 and log.malformed[0].reason.startswith("truncated")
    # Cut mid-key: reported once, with the parse error (not also as truncated).
    path.write_bytes(clean + whole[:45])
    log = parse_step_log(path)
    assert len(log.records) == 8 and len(log.malformed) == 1
    assert log.malformed[0].reason == "field 'da' is not key=value"


def test_parse_step_lines_takes_any_iterable():
    lines = [GOOD.replace("step=12", "step=1") + "\n", "noise\n", GOOD + "\n"]
    log = parse_step_lines(iter(lines))
    assert [r.step for r in log.records] == [1, 12] and log.lines_read == 3


def test_undecodable_bytes_do_not_stop_the_parse(tmp_path):
    path = tmp_path / "train.log"
    path.write_bytes(b"\xff\xfe garbage \x80\n" + GOOD.encode() + b"\n")
    log = parse_step_log(path)
    assert [r.step for r in log.records] == [12] and log.malformed == []


def test_marker_found_across_read_chunks(tmp_path):
    path = tmp_path / "train.log"
    # The 1 MiB read boundary falls inside the marker.
    path.write_bytes(b"x" * ((1 << 20) - 5) + GOOD.encode() + b"\n")
    assert log_has_step_marker(path)

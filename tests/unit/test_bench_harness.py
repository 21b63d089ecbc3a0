"""Tests of the benchmark harness (bench/harness.py, bench/worker.py, bench/__main__.py).

They check the logic that turns measurements into figures: interleaving and warm-up, medians,
ratios against targets, tables, JSON files, machine facts, the worker protocol (with a trivial
case in a real subprocess) and the command line. Nothing here times anything or asserts on
speed; the benchmarks themselves are run with `python -m bench`.

Run: python -m pytest tests/unit/test_bench_harness.py -q
"""
from __future__ import annotations

import json
import os
import sys

import pytest

from bench import BENCHMARKS, harness, load
from bench.__main__ import build_parser, main


# ----- cases the worker tests load by name ("tests.unit.test_bench_harness:...") --------------

class CounterCase:
    """Counts its runs; reports a made-up figure so that the worker's merging shows."""

    def __init__(self, params):
        self.count = 0
        self.step = params.get("step", 1)

    def describe(self):
        return dict(step=self.step)

    def run(self):
        self.count += self.step
        return dict(count=self.count)

    def total(self, times=1):
        return self.count * times


def make_counter_case(params):
    return CounterCase(params)


class OwnTimeCase:
    def run(self):
        return dict(time_s=123.0)


def make_own_time_case(params):
    return OwnTimeCase()


def make_failing_case(params):
    raise ValueError("no such shape: 42")


class ExitingCase:
    def run(self):
        os._exit(3)


def make_exiting_case(params):
    return ExitingCase()


# ----- statistics and interleaving -------------------------------------------------------------

def test_stats_of_values():
    stats = harness.Stats.of([3.0, 1.0, 2.0, 10.0])
    assert stats.median == 2.5
    assert (stats.minimum, stats.maximum, stats.count) == (1.0, 10.0, 4)
    assert stats.values == [3.0, 1.0, 2.0, 10.0]
    assert stats.spread == pytest.approx(9.0 / 2.5)
    assert json.loads(json.dumps(stats.to_json()))["median"] == 2.5


def test_stats_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        harness.Stats.of([])


def test_rotation_puts_each_item_first_once_per_cycle():
    items = ["a", "b", "c"]
    orders = [harness.rotation(items, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert harness.rotation(items, 4) == orders[1]
    assert harness.rotation([], 2) == []


def _recording_runners(names, calls):
    def make(name):
        def runner():
            calls.append(name)
            return dict(time_s=float(len(calls)), flag=True, label="x")
        return runner
    return {name: make(name) for name in names}


def test_interleave_discards_warmup_and_rotates_rounds():
    calls = []
    runners = _recording_runners(["a", "b", "c"], calls)
    samples = harness.interleave(runners, repeats=3, warmup=2)
    assert calls[:6] == ["a", "b", "c", "a", "b", "c"]          # warm-up, in order
    assert calls[6:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # only timed rounds are kept; each value is the call number at which it ran
    assert samples["a"]["time_s"] == [7.0, 12.0, 14.0]
    assert samples["b"]["time_s"] == [8.0, 10.0, 15.0]
    assert samples["c"]["time_s"] == [9.0, 11.0, 13.0]
    # booleans and strings are not figures
    assert set(samples["a"]) == {"time_s"}
    assert harness.median_of(samples, "b") == 10.0
    assert harness.median_of(samples, "b", "missing") is None
    assert harness.median_of(samples, "nobody") is None


def test_interleave_without_warmup_and_bad_counts():
    calls = []
    samples = harness.interleave(_recording_runners(["x"], calls), repeats=2, warmup=0)
    assert calls == ["x", "x"] and samples["x"]["time_s"] == [1.0, 2.0]
    with pytest.raises(ValueError):
        harness.interleave(_recording_runners(["x"], []), repeats=0)
    with pytest.raises(ValueError):
        harness.interleave(_recording_runners(["x"], []), repeats=1, warmup=-1)


def test_interleave_requires_a_time():
    with pytest.raises(harness.BenchError, match="no time_s"):
        harness.interleave({"a": lambda: dict(samples_per_s=3.0)}, repeats=1, warmup=0)


# ----- ratios ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, target, status", [
    (3.0, (">=", 3.0), harness.PASS),      # the threshold itself passes
    (2.999, (">=", 3.0), harness.FAIL),
    (1.05, ("<=", 1.05), harness.PASS),
    (1.0501, ("<=", 1.05), harness.FAIL),
    (None, (">=", 2.0), harness.SKIP),     # not measured
    (5.0, None, harness.INFO),             # context, no target
    (None, None, harness.INFO),
])
def test_ratio_status(value, target, status):
    ratio = harness.Ratio("r", value, "meaning", target)
    assert ratio.status == status
    as_json = ratio.to_json()
    assert as_json["status"] == status and as_json["value"] == value
    assert (as_json["target"] is None) == (target is None)


def test_ratio_target_text_and_unknown_operator():
    assert harness.Ratio("r", 1.0, "m", ("<=", 1.05)).target_text == "<= 1.05"
    assert harness.Ratio("r", 1.0, "m").target_text == "-"
    with pytest.raises(ValueError, match="operator"):
        _ = harness.Ratio("r", 1.0, "m", ("==", 1.0)).status


def test_safe_ratio():
    assert harness.safe_ratio(6.0, 2.0) == 3.0
    assert harness.safe_ratio(None, 2.0) is None
    assert harness.safe_ratio(1.0, None) is None
    assert harness.safe_ratio(1.0, 0.0) is None


# ----- tables ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value, text", [
    (None, "-"), (True, "yes"), (7, "7"), (0.0, "0"), (1.23456, "1.235"), (1234.5, "1234"),
    (123456.0, "1.235e+05"), (0.0001234, "1.234e-04"), ("text", "text"), (float("nan"), "nan"),
])
def test_format_cell(value, text):
    assert harness.format_cell(value) == text


def test_format_table_aligns_numbers_right_and_text_left():
    text = harness.format_table(["name", "ms"], [["upstream", 75.5], ["port", 14.7]], "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["name", "ms"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    assert lines[3] == "upstream  75.5"
    assert lines[4] == "port      14.7"


def test_format_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        harness.format_table(["a", "b", "c"], [[1, 2]])


def test_format_result_shows_tables_ratios_notes_and_skip():
    result = harness.BenchResult("demo", "a demo", skipped="no GPU")
    result.tables.append(harness.Table("t", ["k", "v"], [["x", 1.5]]))
    result.ratios.append(harness.Ratio("demo.x", 2.0, "speed-up", (">=", 3.0)))
    result.notes.append("a note")
    text = harness.format_result(result)
    assert "SKIPPED: no GPU" in text
    assert "demo.x" in text and "FAIL" in text and ">= 3" in text
    assert "note: a note" in text


# ----- JSON and machine facts --------------------------------------------------------------------

def test_write_json_is_complete_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "deep" / "r.json"
    result = harness.BenchResult("demo", "t", ratios=[harness.Ratio("x", 1.0, "m", (">=", 1))])
    harness.write_json(path, dict(result.to_json(), where=tmp_path, pair=(1, 2)))
    data = json.loads(path.read_text())
    assert data["name"] == "demo" and data["ratios"][0]["status"] == harness.PASS
    assert data["where"] == str(tmp_path) and data["pair"] == [1, 2]
    harness.write_json(path, dict(name="second"))
    assert json.loads(path.read_text()) == dict(name="second")
    assert os.listdir(path.parent) == ["r.json"]


def test_machine_info_names_the_machine():
    info = harness.machine_info()
    assert info["cpu_model"]
    assert info["usable_cores"] >= 1
    assert info["python"].count(".") == 2
    assert "torch_version" in info
    if info["torch_version"]:
        assert info["torch_cpu_capability"] in (  # torch/backends/cpu/__init__.py
            "DEFAULT", "VSX", "Z VECTOR", "NO AVX", "AVX2", "AVX512")
    json.dumps(info)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_figures_on_linux():
    assert harness.rss_bytes() > 0
    harness.reset_peak_rss()
    assert harness.peak_rss_bytes() >= harness.rss_bytes() // 2


@pytest.mark.parametrize("requested, load, cores, threads", [
    (3, 9.0, 2, 3),        # the flag wins
    (None, 1.6, 2, 1),     # busy: one thread
    (None, 1.4, 2, None),  # idle enough: torch's default
    (None, 5.0, 1, None),  # one core: nothing to choose
])
def test_choose_threads(requested, load, cores, threads):
    chosen, reason = harness.choose_threads(requested, dict(load_average=[load, 0, 0],
                                                            usable_cores=cores))
    assert chosen == threads and reason


def test_repeats_for_prefers_the_flag_then_the_mode(tmp_path):
    assert harness.Context(work_dir=tmp_path).repeats_for(9, 5) == 9
    assert harness.Context(work_dir=tmp_path, quick=True).repeats_for(9, 5) == 5
    assert harness.Context(work_dir=tmp_path, quick=True, repeats=2).repeats_for(9, 5) == 2


def test_upstream_worker_needs_a_checkout(tmp_path):
    ctx = harness.Context(work_dir=tmp_path, upstream_source=tmp_path / "nowhere",
                          log=lambda line: None)
    with pytest.raises(harness.BenchError, match="bevdepth-npu fetch bevdepth"):
        ctx.worker(harness.ROLE_UPSTREAM_CPU)


# ----- the worker protocol, in a real subprocess -------------------------------------------------

FACTORY = "tests.unit.test_bench_harness"


def test_worker_sets_up_runs_and_calls(tmp_path):
    with harness.Worker(harness.ROLE_PLAIN, log_dir=tmp_path) as worker:
        assert worker.info["role"] == harness.ROLE_PLAIN and worker.info["pid"] != os.getpid()
        reply = worker.setup("c", f"{FACTORY}:make_counter_case", dict(step=2))
        assert reply["info"] == dict(step=2)
        first = worker.run("c")
        second = worker.run("c")
        assert (first["count"], second["count"]) == (2.0, 4.0)
        assert first["time_s"] >= 0.0
        if sys.platform.startswith("linux"):
            assert first["peak_rss_bytes"] > 0 and first["peak_rss_increase_bytes"] >= 0
        assert worker.call("c", "total", times=3) == 12
        runner = worker.runner("c")
        assert runner()["count"] == 6.0
        worker.drop("c")
        with pytest.raises(harness.BenchError, match="KeyError"):
            worker.run("c")


def test_worker_lets_a_case_report_its_own_time(tmp_path):
    with harness.Worker(harness.ROLE_PLAIN, log_dir=tmp_path) as worker:
        worker.setup("own", f"{FACTORY}:make_own_time_case")
        assert worker.run("own")["time_s"] == 123.0


def test_worker_reports_a_failing_setup(tmp_path):
    with harness.Worker(harness.ROLE_PLAIN, log_dir=tmp_path) as worker:
        with pytest.raises(harness.BenchError, match="no such shape: 42"):
            worker.setup("bad", f"{FACTORY}:make_failing_case")
        # the worker survives a failed request
        worker.setup("c", f"{FACTORY}:make_counter_case")
        assert worker.run("c")["count"] == 1.0


def test_worker_that_dies_is_an_error_naming_its_log(tmp_path):
    worker = harness.Worker(harness.ROLE_PLAIN, log_dir=tmp_path, name="dying")
    try:
        worker.setup("x", f"{FACTORY}:make_exiting_case")
        with pytest.raises(harness.BenchError, match="exit code 3") as caught:
            worker.run("x")
        assert str(worker.log_path) in str(caught.value)
    finally:
        worker.close()


def test_worker_role_must_exist(tmp_path):
    with pytest.raises(ValueError, match="unknown worker role"):
        harness.Worker("gpu-please", log_dir=tmp_path)


def test_upstream_worker_without_source_reports_why(tmp_path):
    with pytest.raises(harness.BenchError, match="--upstream-source"):
        harness.Worker(harness.ROLE_UPSTREAM_CPU, log_dir=tmp_path)


# ----- the command line --------------------------------------------------------------------------

def test_every_benchmark_module_has_the_interface():
    for name in BENCHMARKS:
        module = load(name)
        assert module.NAME == name and module.TITLE and callable(module.run)
        assert module.__doc__ and "python -m bench" in module.__doc__
    with pytest.raises(KeyError):
        load("nonsense")


def test_parser_defaults_and_choices():
    args = build_parser().parse_args([])
    assert args.only is None and not args.quick and args.repeats is None and args.warmup == 1
    args = build_parser().parse_args(["--only", "geometry", "--only", "data", "--repeats", "4",
                                      "--quick"])
    assert args.only == ["geometry", "data"] and args.repeats == 4 and args.quick


@pytest.mark.parametrize("argv", [["--only", "everything"], ["--repeats", "0"],
                                  ["--warmup", "-1"], ["--threads", "x"]])
def test_parser_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
    assert "error" in capsys.readouterr().err


def test_list_names_every_benchmark(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in BENCHMARKS:
        assert name in out

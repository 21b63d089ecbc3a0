"""Run the benchmark suite: ``python -m bench`` (from the repository root, in the bevdepth-npu
environment).

    python -m bench                       # every benchmark, on CPU well under 15 minutes
    python -m bench --quick               # fewer rounds and samples (a few minutes)
    python -m bench --only geometry --only pooling --repeats 5
    python -m bench --list

Every variant runs in its own worker process and the rounds interleave the variants, so load
from other processes falls on all of them alike; on a machine already busy before the start the
workers use one torch thread unless --threads says otherwise (see harness.choose_threads).
Each benchmark prints its tables and ratios and writes <json-dir>/<name>.json; at the end a
table of every ratio against its target (PASS/FAIL, SKIP when it could not be measured, info
when it has no target) is printed and everything is written to <json-dir>/bench.json. The exit
status is 0 when every benchmark ran (failed targets included: they are findings, not errors),
1 when one raised an error, 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional

from bench import BENCHMARKS, harness, load
from bevdepth_npu import paths
from bevdepth_npu.argtypes import non_negative_int, positive_int

DEFAULT_WARMUP = 1  # one untimed run per variant: first calls pay allocation and lazy set-up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the BEVDepth port against upstream, measured side by side "
                    "in one run; prints tables and ratios, writes JSON.")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable; one of "
                             f"{', '.join(BENCHMARKS)}; default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds and samples: a quick look, noisier figures")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed rounds per variant (default: each benchmark's own, "
                             "fewer with --quick)")
    parser.add_argument("--warmup", type=non_negative_int, default=DEFAULT_WARMUP,
                        help="untimed runs per variant before the rounds (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads in every worker (default: 1 when other processes "
                             "already load the cores, else torch's own choice, the usable "
                             "cores)")
    parser.add_argument("--json-dir", type=Path, default=None,
                        help="where the JSON files go (default: bench-results/<date-time> "
                             "under the current directory, new for every run)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="synthetic dataset, worker logs and scratch files (default: "
                             "bench/ in the bevdepth-npu cache); kept between runs")
    parser.add_argument("--upstream-source", type=Path, default=None,
                        help="pristine BEVDepth checkout (default: the cache's, from "
                             "`bevdepth-npu fetch bevdepth`)")
    parser.add_argument("--gpu-dry-run", action="store_true",
                        help="without a GPU, run the gpu benchmark's code path on CPU at "
                             "batch 1 in fp32 to check that it works (figures meaningless)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return parser


def _loads(machine) -> str:
    loads = machine.get("load_average")
    return "unknown" if not loads else " ".join(f"{v:.1f}" for v in loads)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name in BENCHMARKS:
            module = load(name)
            print(f"{name:10s} {module.TITLE}")
        return 0
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_dir = (args.json_dir or Path("bench-results") / stamp).resolve()
    work_dir = (args.work_dir or paths.cache_dir() / "bench").resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    machine = harness.machine_info()
    threads, threads_reason = harness.choose_threads(args.threads, machine)
    machine["torch_threads"] = threads or machine.get("torch_threads")
    machine["torch_threads_reason"] = threads_reason
    ctx = harness.Context(quick=args.quick, repeats=args.repeats, warmup=args.warmup,
                          threads=threads, work_dir=work_dir,
                          upstream_source=(args.upstream_source or
                                           paths.source_dir("bevdepth")).resolve(),
                          gpu_dry_run=args.gpu_dry_run, log=lambda line: print(line, flush=True))
    command = " ".join(["python -m bench"] + list(argv if argv is not None else sys.argv[1:]))
    print(f"bench: {', '.join(names)}; json -> {json_dir}; work dir {work_dir}", flush=True)
    print(f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores, torch "
          f"{machine.get('torch_version')}, Python {machine['python']}, load average "
          f"{_loads(machine)}; torch threads {machine['torch_threads']} ({threads_reason})",
          flush=True)
    started = time.perf_counter()
    results: List[harness.BenchResult] = []
    failed = False
    for name in names:
        module = load(name)
        print(f"\n== {name}: running", flush=True)
        bench_started = time.perf_counter()
        try:
            result = module.run(ctx)
        except Exception as error:  # one broken benchmark must not hide the others' figures
            failed = True
            result = harness.BenchResult(name, module.TITLE,
                                         error=f"{type(error).__name__}: {error}")
            result.data["traceback"] = traceback.format_exc()
            print(result.data["traceback"], file=sys.stderr, flush=True)
        result.duration_s = time.perf_counter() - bench_started
        results.append(result)
        print(harness.format_result(result), flush=True)
        harness.write_json(json_dir / f"{name}.json",
                           dict(result.to_json(), machine=machine, command=command))
    total_s = time.perf_counter() - started
    ratios = [r for result in results for r in result.ratios]
    print("\n== summary: every ratio of this run", flush=True)
    print(harness.format_table(harness.RATIO_HEADERS, harness.ratio_rows(ratios)), flush=True)
    for result in results:
        if result.skipped:
            print(f"{result.name}: skipped: {result.skipped}")
        if result.error:
            print(f"{result.name}: ERROR: {result.error}")
    counts = {s: sum(r.status == s for r in ratios)
              for s in (harness.PASS, harness.FAIL, harness.SKIP)}
    print(f"targets: {counts[harness.PASS]} pass, {counts[harness.FAIL]} fail, "
          f"{counts[harness.SKIP]} skipped; total {total_s:.0f} s; JSON in {json_dir}",
          flush=True)
    harness.write_json(json_dir / "bench.json", dict(
        command=command, machine=machine, repo_commit=harness.repo_commit(),
        started=stamp, total_s=total_s, settings=dict(
            quick=args.quick, repeats=args.repeats, warmup=args.warmup, threads=threads,
            work_dir=str(work_dir), upstream_source=str(ctx.upstream_source)),
        ratios=[r.to_json() for r in ratios], results=[r.to_json() for r in results]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

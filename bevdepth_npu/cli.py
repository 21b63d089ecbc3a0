"""``bevdepth-npu``: fetch the pinned upstreams, apply/export/check the patches, build the
environment, generate the synthetic nuScenes, run trainings and evaluations, summarise runs
and draw their predictions.

    bevdepth-npu fetch [NAME...] [--mirror NAME=PATH_OR_URL]
    bevdepth-npu apply NAME|all [--into DIR] [--revert]
    bevdepth-npu export NAME [--from DIR]
    bevdepth-npu check [NAME...]
    bevdepth-npu env [--device auto|cpu|cuda|npu] [--mirror NAME=PATH_OR_URL]
    bevdepth-npu run full|performance|eval|smoke [--name=value ...] [-- EXPERIMENT ARGS]
    bevdepth-npu synth --out DIR
    bevdepth-npu summarize RUN_DIR
    bevdepth-npu doctor [--device auto|npu|cuda|cpu] [--quick] [--data-root DIR [--full]]
    bevdepth-npu show RUN_DIR|RESULTS_JSON --data-root DIR [--version V] [--samples N]
    bevdepth-npu ops [--exp smoke|r50] [--pooling product|fused] [--json FILE]
    bevdepth-npu pins

Exit status: 0 success, 1 a check failed, 2 bad input or a missing prerequisite (message on stderr).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from bevdepth_npu import __version__
from bevdepth_npu.errors import UserError

# name -> (module, add_arguments, run, help); modules are imported only when their command runs
COMMANDS = {
    "fetch": ("bevdepth_npu.upstream", "add_arguments", "run",
              "clone the pinned upstreams into the cache and verify their commits"),
    "apply": ("bevdepth_npu.patches", "add_apply_arguments", "run_apply",
              "apply (or --revert) a patch after checking the target"),
    "export": ("bevdepth_npu.patches", "add_export_arguments", "run_export",
               "regenerate a patch file from an edited tree"),
    "check": ("bevdepth_npu.patches", "add_check_arguments", "run_check",
              "verify every patch applies to its pin and re-exports byte-identically"),
    "env": ("bevdepth_npu.envbuild", "add_arguments", "run",
            "build or reuse the virtualenv with the patched stack"),
    "npu-build": ("bevdepth_npu.mmcv_npu_build", "add_arguments", "run",
                  "build the pinned mmcv with FORCE_NPU=1 over the torch-npu wheel pin, off "
                  "the hardware"),
    "synth": ("bevdepth_npu.synth", "add_arguments", "run",
              "write a synthetic nuScenes dataset (v1.0-mini or v1.0-trainval layout)"),
    "run": ("bevdepth_npu.run", "add_arguments", "run",
            "train, evaluate or smoke-test in a fresh run directory (what test/*.sh launch)"),
    "summarize": ("bevdepth_npu.summarize", "add_arguments", "run",
                  "compute throughput and metrics of a run directory; write the summaries"),
    "doctor": ("bevdepth_npu.doctor", "add_arguments", "run",
               "check in under a minute whether training will work on this machine"),
    "show": ("bevdepth_npu.show", "add_arguments", "run",
             "draw predictions against the ground truth, one PNG per sample"),
    "ops": ("bevdepth_npu.ops", "add_arguments", "run",
            "list every op of one training and one evaluation step with its class on the NPU "
            "(torch_npu's op table)"),
    "pins": ("bevdepth_npu.cli", "_no_arguments", "_run_pins", "print the table of pins"),
}


def _no_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")


def pins_markdown() -> str:
    """The README's table of pins, generated so that nobody types a pin twice."""
    from bevdepth_npu import pins
    rows = ["| name | upstream | pin | patch | applied to |", "|---|---|---|---|---|"]
    for p in pins.PINS:
        if p.kind == "git":
            pin = f"`{p.commit}`"
        elif p.platform_wheels:
            shas = ", ".join(f"{machine} `{sha}`" for machine, sha in p.platform_wheels)
            pin = f"`{p.wheel}` CPython {p.wheel_python} (sha256 {shas})"
        else:
            pin = f"`{p.wheel}` (sha256 `{p.wheel_sha256}`)"
        patch = f"`{p.patch}`" if p.patched else "none"
        rows.append(f"| {p.name} | {p.url} | {pin} ({p.ref}) | {patch} | {p.applied_to} |")
    return "\n".join(rows) + "\n"


def _run_pins(args: argparse.Namespace) -> int:
    from bevdepth_npu import pins
    if args.markdown:
        print(pins_markdown(), end="")
    else:
        for p in pins.PINS:
            print(f"{p.name:14s} {p.commit:42s} {p.patch or '(reference)':22s} {p.url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bevdepth-npu", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"bevdepth-npu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, add, _, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_command=name)
        try:
            # argument definitions are light; heavy imports happen inside run()
            getattr(importlib.import_module(module), add)(p)
        except (ImportError, AttributeError) as exc:
            # one broken command must not take the others down; it reports itself when used
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            p.set_defaults(_broken=f"{exc.__class__.__name__}: {exc}")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    module, _, run, _ = COMMANDS[args._command]
    if getattr(args, "_broken", None):
        print(f"bevdepth-npu {args._command}: unavailable ({args._broken})", file=sys.stderr)
        return 2
    try:
        return int(getattr(importlib.import_module(module), run)(args) or 0)
    except UserError as exc:
        print(f"bevdepth-npu {args._command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyError as exc:
        print(f"bevdepth-npu {args._command}: error: {exc.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bevdepth-npu {args._command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

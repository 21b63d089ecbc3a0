"""``python -m bevdepth_npu.synth --out DIR``: the ``bevdepth-npu synth`` command without the front end."""
from __future__ import annotations

import argparse
import sys

from bevdepth_npu.errors import UserError
from bevdepth_npu.synth.command import add_arguments, run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bevdepth_npu.synth",
                                     description="write a synthetic nuScenes dataset "
                                                 "(v1.0-mini or v1.0-trainval layout)")
    add_arguments(parser)
    args = parser.parse_args()
    try:
        return run(args)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

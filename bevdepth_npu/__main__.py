"""``python -m bevdepth_npu`` is ``bevdepth-npu``: usable before the package is installed."""
import sys

from bevdepth_npu.cli import main

sys.exit(main())

"""``python -m bevdepth_npu.summarize RUN_DIR``: the same as ``bevdepth-npu summarize``."""
import sys

from bevdepth_npu.summarize import main

sys.exit(main())

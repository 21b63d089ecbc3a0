"""Every environment variable bevdepth-npu and the patched BEVDepth read: one table, one prefix.

Settings of ``bevdepth-npu run`` (and so of the scripts in test/) are flags; each also has an
environment form, ``BEVDEPTH_NPU_`` + the flag's name in capitals (``--batch-size`` is
``BEVDEPTH_NPU_BATCH_SIZE``), built by ``setting_variable``. The variables other tools define
keep their own names and meaning (``CONVENTIONAL``): torch's and Lightning's ``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK``, CANN's ``ASCEND_DEVICE_ID``. ``VARIABLES`` lists the rest.

Two kinds of old names, both from earlier releases:
- the bare names the scripts read before (``SEED``, ``CARDS``, ``PYTHON``, ...): names this common
  are often set in a shell for something else, so they are no longer read; a run that finds one
  set says so in one line and names what to use (``ignored_lines``);
- the patch's ``BEVDEPTH_DEVICE`` / ``BEVDEPTH_BIND_CORES`` / ``BEVDEPTH_ALLOWED_CORES``: still
  read, with a one-line notice (``old_name_lines``), under their ``BEVDEPTH_NPU_`` names first.

The patched tree cannot import this package, so bevdepth/utils/device.py spells its three names
itself; tests/unit/test_envvars.py holds the two sides together, and the README's table of
variables to this one.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Tuple

PREFIX = "BEVDEPTH_NPU_"

# Settings whose environment form is another tool's own variable.
CONVENTIONAL: Dict[str, str] = {
    "master_addr": "MASTER_ADDR",
    "master_port": "MASTER_PORT",
    "node_rank": "NODE_RANK",
    "ascend_device_id": "ASCEND_DEVICE_ID",
}


@dataclasses.dataclass(frozen=True)
class Variable:
    name: str
    meaning: str
    read_by: str                 # who reads it
    old_name: Optional[str] = None  # an earlier spelling, still read with a notice


DEVICE = "BEVDEPTH_NPU_DEVICE"
BIND_CORES = "BEVDEPTH_NPU_BIND_CORES"
ALLOWED_CORES = "BEVDEPTH_NPU_ALLOWED_CORES"
CACHE = "BEVDEPTH_NPU_CACHE"
MIRRORS = "BEVDEPTH_NPU_MIRRORS"
RUN_START = "BEVDEPTH_NPU_RUN_START_S"
NINJA_ONLY = "BEVDEPTH_NPU_NINJA_ONLY"
NINJA_STATUS = "BEVDEPTH_NPU_NINJA_STATUS"

VARIABLES: Tuple[Variable, ...] = (
    Variable(CACHE, "the cache of pins, wheels, environments and the smoke dataset "
             "(default ~/.cache/bevdepth-npu)", "bevdepth-npu"),
    Variable(MIRRORS, "where `fetch` and `env` fetch pins from: NAME=PATH_OR_URL, comma "
             "separated (as --mirror)", "bevdepth-npu"),
    Variable(DEVICE, "device type npu|cuda|cpu when no --device flag says it (default: npu "
             "where the Ascend toolkit is set up, cuda where nvidia-smi answers, else cpu)",
             "bevdepth-npu and the patched BEVDepth", old_name="BEVDEPTH_DEVICE"),
    Variable(BIND_CORES, "1: bind the process to its share of the CPU cores at start-up (set "
             "by `bevdepth-npu run` for the training processes it starts; --bind-cores)",
             "the patched BEVDepth", old_name="BEVDEPTH_BIND_CORES"),
    Variable(ALLOWED_CORES, "the cores the first process of a node could use before it bound "
             "itself (set by that process for the DDP ranks it starts; not a setting)",
             "the patched BEVDepth", old_name="BEVDEPTH_ALLOWED_CORES"),
    Variable(RUN_START, "start time of a run that restarted itself under the stack's "
             "interpreter (set by `bevdepth-npu run`; not a setting)", "bevdepth-npu"),
    Variable(NINJA_ONLY, "the sources the mmcv NPU build check's ninja shim builds (set by "
             "`bevdepth-npu npu-build --only`; not a setting)", "bevdepth-npu"),
    Variable(NINJA_STATUS, "where that shim records ninja's exit status (set by "
             "`bevdepth-npu npu-build`; not a setting)", "bevdepth-npu"),
)


def setting_variable(name: str) -> str:
    """The environment form of the setting ``name`` (a Settings field)."""
    return CONVENTIONAL.get(name, PREFIX + name.upper())


def ignored_lines(setting_names: Tuple[str, ...], environ: Mapping[str, str]) -> List[str]:
    """One line for each bare old name of a setting that is set in ``environ``."""
    lines = []
    for name in setting_names:
        bare, variable = name.upper(), setting_variable(name)
        if bare != variable and environ.get(bare):
            flag = "--" + name.replace("_", "-")
            lines.append(f"{bare} is set but not read (names this common often mean something "
                         f"else in a shell): use {flag}= or {variable}")
    return lines


def old_name_lines(environ: Mapping[str, str]) -> List[str]:
    """One line for each old spelling that is set (it is still read where the new one is not)."""
    return [f"{v.old_name} is an old name of {v.name}; rename it (it is read while "
            f"{v.name} is unset)" for v in VARIABLES
            if v.old_name and environ.get(v.old_name)]


def get(variable: str, environ: Mapping[str, str]) -> str:
    """The value of ``variable``, else of its old spelling, else ''."""
    value = environ.get(variable, "")
    if value:
        return value
    old = next((v.old_name for v in VARIABLES if v.name == variable and v.old_name), None)
    return environ.get(old, "") if old else ""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def markdown_tables() -> str:
    """The README's two tables: every setting of ``bevdepth-npu run`` (its flag, variable,
    modes and default, from bevdepth_npu/run/settings.py), then the other variables above.
    ``python -m bevdepth_npu.envvars`` prints them; a test holds the README to them."""
    from bevdepth_npu.run import settings
    lines = ["| flag | variable | modes | default | meaning |", "|---|---|---|---|---|"]
    for option in settings.OPTIONS:
        modes = [mode for mode in settings.MODES if option.name in settings.MODE_OPTIONS[mode]]
        defaults = {mode: dict(dataclasses.asdict(settings.Settings()),
                               **settings.MODE_DEFAULTS[mode]).get(option.name)
                    for mode in modes}
        first = defaults[modes[0]]
        shown = "-" if first is None else str(first)
        others = [f"{mode}: {'-' if value is None else value}"
                  for mode, value in defaults.items() if value != first]
        if others:
            shown += f" ({'; '.join(others)})"
        flag = option.flag if option.switch else f"{option.flag}={option.metavar}"
        lines.append(f"| `{_cell(flag)}` | `{option.env}` | {', '.join(modes)} | "
                     f"{_cell(shown)} | {_cell(option.help)} |")
    lines += ["", "| variable | read by | meaning |", "|---|---|---|"]
    for variable in VARIABLES:
        old = f" (earlier `{variable.old_name}`, still read)" if variable.old_name else ""
        lines.append(f"| `{variable.name}` | {variable.read_by} | "
                     f"{_cell(variable.meaning)}{old} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_tables(), end="")

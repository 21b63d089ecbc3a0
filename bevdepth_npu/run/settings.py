"""The settings of ``bevdepth-npu run MODE``: one dataclass, the options each mode accepts, and
the command line that fills it.

Every setting is a flag (``--batch-size=8`` or ``--batch-size 8``) or an environment variable
(``BEVDEPTH_NPU_BATCH_SIZE=8``; the names are made in bevdepth_npu/envvars.py, where a few
settings keep another tool's variable, ``MASTER_ADDR`` say); a flag wins over the variable, the
variable over the default. The bare names earlier releases read (``BATCH_SIZE``, ``SEED``, ...)
are ignored, with one line each saying what to use. Values are checked with the validators of bevdepth_npu/argtypes.py before anything
runs; a bad one stops the command with exit status 1 and a message naming the setting.
Arguments after ``--`` go to the experiment unchanged.

To add a setting: a field of ``Settings`` (default and reason), an ``Option`` in ``OPTIONS``,
its name in the ``MODE_OPTIONS`` of the modes that take it. Tests: tests/unit/test_run_settings.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import textwrap
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bevdepth_npu import devices, envvars
from bevdepth_npu.argtypes import int_range, non_negative_int, positive_float, positive_int

MODES = ("full", "performance", "eval", "smoke")
R50_EXP = "bevdepth/exps/nuscenes/mv/bev_depth_lss_r50_256x704_128x128_24e_2key.py"
SMOKE_EXP = "bevdepth/exps/nuscenes/smoke/bev_depth_lss_r18_smoke_2key.py"


@dataclasses.dataclass
class Settings:
    """Everything a run needs to know; the defaults are those of full (see MODE_DEFAULTS)."""

    mode: str = "full"
    cards: int = 8                       # one process per device, 8 per Atlas 800T node
    batch_size: int = 8                  # the recipe's samples per device
    epochs: int = 24                     # the recipe's length
    learning_rate: float = 0.000003125   # 2e-4 / 64 per sample, times batch x devices
    seed: int = 0
    precision: str = "16"                # fp16 AMP as the recipe; CPU falls back to 32
    data_root: str = "data/nuScenes"     # relative to the BEVDepth checkout
    exp: str = R50_EXP                   # relative to the BEVDepth checkout
    device: Optional[str] = None         # None: bevdepth_npu.devices.choose decides
    pooling: str = "product"             # the experiments' --pooling; product is upstream's
    nnodes: int = 1
    node_rank: int = 0
    master_addr: Optional[str] = None    # needed with several nodes
    master_port: Optional[int] = None
    ascend_device_id: int = 0            # output subdirectory, ModelZoo convention
    output_root: Optional[str] = None    # None: test/output next to the launcher
    network: str = "BEVDepth_for_PyTorch"
    ckpt_every_n_steps: int = 0          # 0: checkpoints at epoch ends only
    warmup_steps: int = 5                # start-up steps left out of the speed figures
    eval_cards: int = 1
    eval_batch_size: Optional[int] = None  # None: batch_size
    bind_cores: str = "auto"             # auto: per-rank core binding for npu training
    doctor: bool = True                  # `bevdepth-npu doctor --quick` before training
    weights: Optional[str] = None        # model|ema for evaluation; None: the experiment's
    resume: str = "auto"                 # auto: continue the newest unfinished identical run
    fresh: bool = False                  # same as resume=none
    ckpt: Optional[str] = None           # eval: None = the newest checkpoint
    python: Optional[str] = None         # None: the interpreter running this
    bevdepth_root: Optional[str] = None  # None: found (launcher's checkout, ./BEVDepth, import)
    device_type: Optional[str] = None    # DeviceType of the summary; None: the machine type
    steps: int = 60                      # smoke: training steps
    num_workers: Optional[int] = None    # smoke: None = 1 on cpu, 4 elsewhere
    threads: Optional[int] = None        # smoke, cpu: None = free cores
    data_dir: Optional[str] = None       # smoke: None = the cached synthetic dataset
    scenes: int = 2                      # smoke generator: one train and one val scene at least
    samples_per_scene: int = 10
    synth_seed: int = 0
    verbose: bool = False                # every stage's full output on the console too
    experiment_args: List[str] = dataclasses.field(default_factory=list)
    launcher: Optional[str] = None       # the test/*.sh script that started the run

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size


MODE_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "full": {},
    "performance": {"epochs": 1},
    "eval": {"cards": 1, "batch_size": 32},
    # 1e-3 per sample: the recipe's 2e-4/64 moves nothing in 60 steps (bench/learning_check.py)
    "smoke": {"batch_size": 2, "learning_rate": 0.001, "exp": SMOKE_EXP, "device": "auto"},
}


class SettingsError(Exception):
    """A bad setting; the message names it. The command exits 1."""


def choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise argparse.ArgumentTypeError(f"must be one of: {' '.join(values)}, got {text!r}")
        return text
    return parse


def network_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", text):
        raise argparse.ArgumentTypeError(f"may hold only letters, digits and ._+-, got {text!r}")
    return text


def resume_value(text: str) -> str:
    if text not in ("auto", "none") and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(
            f"no such checkpoint file: {text!r} (auto, none or a .ckpt path)")
    return text


def switch_value(text: str) -> bool:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"must be 0 or 1, got {text!r}")
    return text == "1"


@dataclasses.dataclass(frozen=True)
class Option:
    name: str                           # the Settings field
    parse: Callable[[str], Any]
    metavar: str
    help: str
    switch: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return envvars.setting_variable(self.name)


_TEXT = str
OPTIONS: Tuple[Option, ...] = (
    Option("cards", positive_int, "N", "devices per node, one process each"),
    Option("batch_size", positive_int, "N", "samples per device"),
    Option("epochs", positive_int, "N", "epochs (evaluation: passed on, no effect)"),
    Option("learning_rate", positive_float, "X",
           "learning rate per sample; the optimizer gets it x batch x all devices"),
    Option("seed", non_negative_int, "N", "random seed"),
    Option("precision", choice("16", "32", "bf16"), "16|32|bf16", "16: fp16 AMP (CPU: 32)"),
    Option("data_root", _TEXT, "DIR", "nuScenes with info files, relative to BEVDepth"),
    Option("exp", _TEXT, "FILE", "experiment file, relative to BEVDepth"),
    Option("device", choice(*devices.CHOICES), "|".join(devices.CHOICES),
           "device type (default, auto: npu where the Ascend toolkit is set up, cuda where "
           "nvidia-smi answers, else cpu)"),
    Option("pooling", choice("product", "fused"), "product|fused",
           "voxel pooling of the experiment (fused: depth x context without their product, "
           "see the README); the self-test checks the one the run uses"),
    Option("nnodes", positive_int, "N", "machines; run the same command on each"),
    Option("node_rank", non_negative_int, "R", "this machine's rank, 0 to --nnodes minus 1"),
    Option("master_addr", _TEXT, "HOST", "address of the node with rank 0 (several nodes)"),
    Option("master_port", int_range(1, 65535), "PORT", "a free port there, the same on all"),
    Option("ascend_device_id", non_negative_int, "N", "output subdirectory (ModelZoo)"),
    Option("output_root", _TEXT, "DIR", "where runs go (default: test/output by the script)"),
    Option("network", network_name, "NAME", "Network of the summary"),
    Option("ckpt_every_n_steps", non_negative_int, "N",
           "also checkpoint every N steps; 0: at epoch ends only"),
    Option("warmup_steps", non_negative_int, "N", "first steps left out of the speed figures"),
    Option("eval_cards", positive_int, "N", "devices of the evaluation after training"),
    Option("eval_batch_size", positive_int, "N",
           "samples per device of that evaluation (default: --batch-size)"),
    Option("doctor", switch_value, "0|1",
           "1: run the self-test (`bevdepth-npu doctor --quick`) before training and stop on a "
           "FAIL; 0: skip it"),
    Option("weights", choice("model", "ema"), "model|ema",
           "weights to evaluate (default: the experiment's: ema for EMA experiments)"),
    Option("bind_cores", choice("auto", "0", "1"), "auto|0|1",
           "per-rank CPU core binding in training (auto: on for npu); never in evaluation"),
    Option("resume", resume_value, "auto|none|CKPT",
           "auto: continue the newest unfinished identical run; none: a new run; "
           "CKPT: a new run from that checkpoint"),
    Option("fresh", switch_value, "", "same as --resume=none", switch=True),
    Option("ckpt", _TEXT, "PATH", "checkpoint file or run directory (default: the newest "
           "*.ckpt below the output directory and BEVDepth/outputs)"),
    Option("python", _TEXT, "PATH", "interpreter of the stack (default: this one)"),
    Option("bevdepth_root", _TEXT, "DIR", "BEVDepth checkout (default: found)"),
    Option("device_type", _TEXT, "NAME", "DeviceType of the summary (default: machine type)"),
    Option("steps", positive_int, "N", "training steps (the step count alone ends training)"),
    Option("num_workers", non_negative_int, "N", "data loader processes (1 on cpu, else 4)"),
    Option("threads", positive_int, "N",
           "cpu: torch threads (default: cores minus loader processes; OMP_NUM_THREADS wins)"),
    Option("data_dir", _TEXT, "DIR",
           "v1.0-mini root; made with the generator if missing, info files and depth_gt "
           "written if missing (default: a cached synthetic dataset)"),
    Option("scenes", int_range(2), "N", "generator: scenes (one mini_val scene at least)"),
    Option("samples_per_scene", int_range(2), "N", "generator: key frames per scene"),
    Option("synth_seed", non_negative_int, "N", "generator: seed"),
    Option("verbose", switch_value, "", "show every stage's full output", switch=True),
)
OPTION_BY_NAME = {option.name: option for option in OPTIONS}

_TRAIN = ("cards", "batch_size", "epochs", "learning_rate", "seed", "precision", "data_root",
          "exp", "device", "pooling", "nnodes", "node_rank", "master_addr", "master_port",
          "ascend_device_id", "output_root", "network", "ckpt_every_n_steps", "warmup_steps")
_TAIL = ("python", "bevdepth_root", "device_type", "verbose")
MODE_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "full": _TRAIN + ("eval_cards", "eval_batch_size", "weights", "bind_cores", "doctor",
                      "resume", "fresh") + _TAIL,
    "performance": _TRAIN + ("bind_cores", "doctor", "resume", "fresh") + _TAIL,
    "eval": ("ckpt", "weights", "cards", "batch_size", "epochs", "learning_rate", "seed",
             "precision", "data_root", "exp", "device", "pooling", "ascend_device_id",
             "output_root",
             "network", "warmup_steps") + _TAIL,
    "smoke": ("steps", "batch_size", "learning_rate", "num_workers", "threads", "device",
              "pooling", "python", "data_dir", "scenes", "samples_per_scene", "synth_seed",
              "warmup_steps", "exp", "ascend_device_id", "output_root", "verbose"),
}
# The smoke run's own wording (and, for the device, values) of some options.
SMOKE_OPTIONS = {option.name: option for option in (
    Option("device", choice(*devices.CHOICES), "|".join(devices.CHOICES),
           "environment and training device (auto: npu where the Ascend toolkit is set up, "
           "cuda where nvidia-smi answers, else cpu)"),
    Option("python", _TEXT, "PATH", "interpreter of an existing environment; skips "
           "`bevdepth-npu env` (default: the environment it builds or reuses)"),
    Option("batch_size", positive_int, "N", "samples per step, training and evaluation"),
    Option("learning_rate", positive_float, "X", "learning rate per sample, times the batch"),
    Option("exp", _TEXT, "FILE", "experiment file, relative to the BEVDepth of the environment"),
)}

DESCRIPTIONS = {
    "full": "Accuracy run: train on --cards devices per node, evaluate the last checkpoint on "
            "the val split, write the ModelZoo summary.",
    "performance": "Performance run: train (1 epoch by default) and report samples/s "
                   "(ActualFPS, warm-up excluded), images/s and the loss.",
    "eval": "Evaluation: score a checkpoint on the val split (mAP, mATE, mASE, mAOE, mAVE, "
            "mAAE, NDS) into a run directory of its own.",
    "smoke": "Smoke run: environment, synthetic nuScenes, training, evaluation with the "
             "nuScenes devkit on mini_val and the metrics table, in minutes on any machine.",
}
EPILOG = """\
after --                passed to the experiment unchanged{both}

Output: <output root>/<ASCEND_DEVICE_ID>/<CaseName>_<time>/ (run.json, train_<id>.log,
eval_<id>.log, steps.jsonl, <CaseName>.log, summary.json, curves.png, checkpoints/, eval/),
links to the newest run's files in <output root>/<ASCEND_DEVICE_ID>/. The console shows stage
lines, one progress line for training and the results; each stage's full output is in its log
in the run directory (--verbose shows it too). Exit status: 0 on success, a failed stage's own
status (evaluation is skipped after a failed training), 1 for bad settings or an incomplete
summary."""


def options(mode: str) -> List[Option]:
    own = SMOKE_OPTIONS if mode == "smoke" else {}
    return [own.get(name, OPTION_BY_NAME[name]) for name in MODE_OPTIONS[mode]]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """``--cards=N`` as the scripts have always written it."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if action.option_strings and action.nargs != 0:
            return f"{action.option_strings[0]}={action.metavar}"
        return super()._format_action_invocation(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise SettingsError(message)


def build_parser(mode: str, prog: str) -> argparse.ArgumentParser:
    both = " (training and evaluation)" if mode in ("full", "smoke") else ""
    parser = _Parser(
        prog=prog, allow_abbrev=False, formatter_class=_Formatter,
        usage=f"{prog} [--name=value ...]{' [--fresh]' if mode in ('full', 'performance') else ''}"
              " [--verbose] [-- EXPERIMENT ARGS...]",
        description=textwrap.fill(DESCRIPTIONS[mode] + " Settings are flags or environment "
                                  "variables (in brackets); flags win.", 95),
        epilog=EPILOG.format(both=both))
    defaults = dict(dataclasses.asdict(Settings()), **MODE_DEFAULTS[mode])
    for option in options(mode):
        default = defaults.get(option.name)
        shown = f" [{option.env}]" if default is None or default is False \
            else f" [{option.env}, default {default}]"
        if option.switch:
            parser.add_argument(option.flag, dest=option.name, action="store_true",
                                default=argparse.SUPPRESS, help=option.help + shown)
        else:
            parser.add_argument(option.flag, dest=option.name, type=option.parse,
                                metavar=option.metavar, default=argparse.SUPPRESS,
                                help=option.help + shown)
    parser.add_argument("--launcher", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def environment_notices(environ: Dict[str, str]) -> List[str]:
    """Lines about the variables of ``environ`` that are old names (see envvars)."""
    return (envvars.ignored_lines(tuple(OPTION_BY_NAME), environ)
            + envvars.old_name_lines(environ))


def parse(mode: str, argv: Sequence[str], prog: Optional[str] = None,
          environ: Optional[Dict[str, str]] = None,
          notice: Optional[Callable[[str], None]] = None) -> Settings:
    """Settings of ``mode`` from the command line ``argv`` and the environment.

    Raises SettingsError for a bad setting; ``--help`` prints the help and exits 0. Old names
    of variables set in ``environ`` are reported to ``notice`` first, one line each (before
    the help, which they do not change).
    """
    if mode not in MODES:
        raise SettingsError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    environ = os.environ if environ is None else environ
    for line in environment_notices(dict(environ)):
        if notice is not None:
            notice(line)
    argv = list(argv)
    experiment_args: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, experiment_args = argv[:cut], argv[cut + 1:]
    if any(arg == "--pooling" or arg.startswith("--pooling=") for arg in experiment_args):
        raise SettingsError("--pooling is a setting of the run (before --): the self-test "
                            "checks the pooling the run trains with")
    parser = build_parser(mode, prog or f"bevdepth-npu run {mode}")
    given, unknown = parser.parse_known_args(argv)
    for arg in unknown:
        if arg.startswith("-"):
            raise SettingsError(f"unknown option {arg} (see --help; arguments for the "
                                "experiment go after --)")
        raise SettingsError(f"unexpected argument {arg!r} (settings are --name=value; "
                            "experiment arguments go after --)")
    values = dict(MODE_DEFAULTS[mode], mode=mode, experiment_args=experiment_args)
    for option in options(mode):
        if option.name in vars(given):
            values[option.name] = getattr(given, option.name)
            continue
        text = environ.get(option.env, "")
        if text:
            try:
                values[option.name] = option.parse(text)
            except argparse.ArgumentTypeError as err:
                raise SettingsError(f"{option.env}={text} (environment): {err}") from None
    if getattr(given, "launcher", None):
        values["launcher"] = given.launcher
    settings = Settings(**values)
    check(settings)
    return settings


def check(s: Settings) -> None:
    """What one setting alone cannot say."""
    if s.mode in ("full", "performance"):
        if s.node_rank >= s.nnodes:
            raise SettingsError(f"--node-rank={s.node_rank} must be below --nnodes={s.nnodes}")
        if s.nnodes > 1 and not s.master_addr:
            raise SettingsError(f"--nnodes={s.nnodes} needs --master-addr (MASTER_ADDR: the "
                                "address of the node with rank 0)")
        if s.nnodes > 1 and not s.master_port:
            raise SettingsError(f"--nnodes={s.nnodes} needs --master-port (MASTER_PORT: a free "
                                "port on that node, the same on every node)")
        if s.fresh:
            s.resume = "none"
    if s.mode == "smoke" and s.warmup_steps >= s.steps:
        raise SettingsError(f"--warmup-steps={s.warmup_steps} must be below --steps={s.steps}: "
                            "the summary needs measured steps")

"""`python train.py --help`: blurbtune's own help, generated from the package's conf folder.

Hydra prints `hydra.help.template` (conf/train.yaml sets it to the `blurbtune_help` resolver),
so the groups, their options and defaults, and the stabilizer knobs with their defaults and
allowed values come from the yaml files themselves and cannot drift from them.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from blurbtune.paths import package_path

GROUPS = ("model", "task", "stabilizer", "optimizer", "trainer", "logger", "experiment")
SEVERAL = {"stabilizer": "stabilizer=[llrd,reinit_top]", "logger": "logger=[csv,tensorboard]"}

# The overrides a user reaches for first: (override, what it does).
COMMON = (
    ("seed=0", "seeds everything before anything is built; data_seed= (example order) and "
               "init_seed= (head, re-initialised layers) override it"),
    ("trainer.max_epochs=N", "number of epochs (default: the task's, from conf/task/); the one "
                             "way to set it"),
    ("optimizer.lr=3e-5", "base learning rate (default: the task's)"),
    ("data_dir=PATH", "the BLURB data folder (default: the BLURB_DATA_DIR variable, else "
                      "data/blurb)"),
    ("dry_run=true", "build everything, print and save the parameter-group table, train nothing"),
    ("threads=N", "torch threads (default: the CPUs this process may use)"),
    ("save_model=true", "also write model/ (save_pretrained) in the run folder"),
)

EXAMPLES = (
    ("the first run: real weights, shipped data, about 90 s on an idle 2-core CPU",
     "python train.py experiment=quickstart"),
    ("one run with a stabilizer and its knob",
     "python train.py model=pubmedbert task=biosses stabilizer=llrd stabilizer.llrd.decay=0.8 "
     "seed=3"),
    ("a seed sweep of the four stabilizers, then its report",
     "python train.py -m task=biosses stabilizer=none,freeze_lower,llrd,reinit_top "
     "seed='range(10)'"),
    ("the same on a GPU, each stabilizer's seeds trained together (one process a stack)",
     "python train.py -m task=biosses stabilizer=none,freeze_lower,llrd,reinit_top "
     "seed='range(10)' hydra/sweeper=stacked trainer=gpu"),
)


def conf_dir() -> Path:
    return Path(package_path("conf"))


def options(group: str) -> list[str]:
    """The options of a config group: its yaml files, sorted."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def group_defaults() -> dict[str, str | None]:
    """The option each group takes when the command line names none (conf/train.yaml)."""
    out: dict[str, str | None] = {}
    for entry in OmegaConf.load(conf_dir() / "train.yaml").defaults:
        if isinstance(entry, str) or not hasattr(entry, "items"):
            continue
        for key, value in entry.items():
            out[str(key).split("/")[-1].removeprefix("override ")] = value
    return out


def description(path: Path) -> str:
    """The leading comment of a yaml file (`# @package` lines skipped), as one line."""
    words = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            words.append(line.lstrip("#").strip())
    return " ".join(words)


KNOB = re.compile(r"^  (\w+):\s*([^#]*?)\s*(?:#\s*(.*))?$")


def knobs(stabilizer: str) -> list[tuple[str, str, str]]:
    """(key, default, allowed values) of each knob in conf/stabilizer/<stabilizer>.yaml.

    The allowed values are the comment on the knob's line, the one place that states them.
    """
    section, out = None, []
    for line in (conf_dir() / "stabilizer" / f"{stabilizer}.yaml").read_text().splitlines():
        if re.match(r"^\w+:\s*$", line):
            section = line.rstrip(":").strip()
        elif section and (m := KNOB.match(line)):
            out.append((f"stabilizer.{section}.{m[1]}", m[2], m[3] or ""))
    return out


def _wrapped(items: list[str], indent: int, width: int = 100) -> str:
    return textwrap.fill("  ".join(items), width=width, initial_indent=" " * indent,
                         subsequent_indent=" " * indent, break_on_hyphens=False).lstrip()


def text() -> str:
    """The whole help text."""
    defaults = group_defaults()
    lines = [
        "blurbtune: fine-tune a biomedical encoder on a BLURB task, and measure how stable it is.",
        "",
        "usage: python train.py [-m] [group=option ...] [key=value ...]",
        "       (blurbtune train ... is the same; see also: blurbtune report|data|verify --help)",
        "",
        "Config groups (group=option; * marks the default; conf/<group>/<option>.yaml):",
    ]
    for group in GROUPS:
        names = [f"{o}*" if o == defaults.get(group) else o for o in options(group)]
        lines.append(f"  {group:<12}{_wrapped(names, 14)}")
        if group in SEVERAL:
            lines.append(f"{'':14}several at once: {SEVERAL[group]}")
    lines += ["", "Stabilizers and their knobs (default; allowed values):"]
    for name in options("stabilizer"):
        path = conf_dir() / "stabilizer" / f"{name}.yaml"
        lines.append(f"  {name:<14}{_wrapped([description(path)], 16)}")
        for key, default, allowed in knobs(name):
            lines.append(f"{'':16}{key + '=' + default:<34} {allowed}")
    lines += ["", "Common overrides:"]
    for override, what in COMMON:
        lines.append(f"  {override:<22}{_wrapped([what], 24)}")
    lines += ["", "Examples:"]
    for what, command in EXAMPLES:
        lines += [f"  # {what}", f"  {command}"]
    lines += ["  blurbtune report outputs/multirun/pubmedbert-biosses", "",
              "Run folders: outputs/runs/<name>/<overrides>/ (sweeps: outputs/multirun/...). "
              "More: README.md, and the pages under docs/.",
              "Print the composed config: python train.py [overrides] --cfg job. "
              "Hydra's own flags: --hydra-help."]
    # Hydra fills $-placeholders in this text with string.Template: escape ours.
    return "\n".join(lines).replace("$", "$$") + "\n"

"""Docs that cannot drift: each shell command in README.md and docs/*.md runs here, or says why not.

The convention (stated at the top of each document):
- every command in a ```bash block is run by this test, in order, in a fresh folder, on the
  tiny model (a hub model is swapped for it, keeping its name, so folder names stay as
  documented), with few examples and one epoch;
- the README is run as a newcomer's shell has it, with no BLURB_DATA_DIR: its commands find
  data only where it says where the data goes (`export BLURB_DATA_DIR=...`, which this test
  runs: `/path/to/blurb` and `$PWD/tests/fixtures/blurb` are the test fixtures); the pages
  under docs/ are read after it, so they run with BLURB_DATA_DIR set to the fixtures;
- `export NAME=VALUE` sets NAME for the document's later commands, and `$NAME` in a command
  is expanded as a shell would;
- a command that cannot run here ends with `# needs: <what>` (BLURB data, a GPU, a cluster,
  the network); a block whose first line is `# needs: <what>` is marked as a whole;
- a ```text block that follows a ```bash block (before any other block) is what the block's
  last command prints: each of its lines must appear, in order, in the output (numbers stand
  for any number, `...` for anything).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, visible_lines

from blurbtune.config import compose

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"#\s*needs:\s*(\S.*)$")
LOCAL_MODELS = ("tiny", "minilm")  # run as documented; a hub model is swapped for tiny
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
PLACEHOLDERS = {"/path/to/blurb": str(FIXTURES)}
SHRINK = {"trainer.max_epochs": "1", "data.max_train_examples": "16",
          "data.max_eval_examples": "8"}


@dataclass
class Command:
    doc: str
    line: int
    text: str
    needs: str | None = None
    expected: list[str] = field(default_factory=list)  # the ```text block after it


def commands(path: Path) -> list[Command]:
    """The commands of the ```bash blocks of a document, joined across `\\` continuations."""
    out: list[Command] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        i += 1
        block_needs, pending, first, begun = None, "", True, 0
        block: list[Command] = []
        while lines[i].strip() != "```":
            text = lines[i].strip()
            if first and MARK.match(text):
                block_needs = MARK.match(text)[1]
            first = False
            if text.endswith("\\"):
                begun = begun or i + 1
                pending += text[:-1] + " "
            elif text and not text.startswith("#") or pending:
                full = pending + text
                mark = MARK.search(full)
                body = full[:mark.start()].strip() if mark else full
                block.append(Command(path.name, begun or i + 1, body,
                                     mark[1] if mark else block_needs))
                pending, begun = "", 0
            i += 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            i += 1  # prose between a command and its output is fine
        if i < len(lines) and lines[i].strip() == "```text" and block:
            j = i + 1
            while lines[j].strip() != "```":
                block[-1].expected.append(lines[j])
                j += 1
            i = j + 1
        out += block
    return out


def _is_runnable(cmd: Command) -> bool:
    words = shlex.split(cmd.text, comments=True)
    if words[:1] == ["export"]:
        return len(words) == 2 and "=" in words[1]
    return (words[:2] == ["python", "train.py"] or words[:1] in (["blurbtune"], ["ls"])) and \
        "&&" not in words and "|" not in words


def _expand(word: str, env: dict[str, str]) -> str:
    """`$NAME` and `${NAME}` as a shell expands them (an unset name: empty)."""
    return re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], ""), word)


def test_every_command_is_run_or_marked() -> None:
    unmarked = [f"{c.doc}:{c.line}: {c.text}" for path in DOCS for c in commands(path)
                if c.needs is None and not _is_runnable(c)]
    assert unmarked == [], "mark these `# needs: <what>` or make them runnable here"


SHELLISH = re.compile(r"^(\s{4,}|\t)((python|blurbtune|pip)\b|[A-Z_]+=\S+ python)")


def test_no_command_hides_outside_a_bash_block() -> None:
    strays = []
    for path in DOCS:
        fence = None
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip().startswith("```"):
                fence = None if fence is not None else line.strip()[3:]
                continue
            loose = SHELLISH.match(line) if fence is None else \
                fence not in ("bash", "text") and re.match(r"^\s*(python|blurbtune|pip) ", line)
            if loose:
                strays.append(f"{path.name}:{n}: {line.strip()}")
    assert strays == [], "put shell commands in ```bash blocks"


def _sweep_point(overrides: list[str]) -> list[str]:
    """The first run of a sweep's overrides (for composing its config)."""
    point = []
    for item in overrides:
        key, _, value = item.partition("=")
        if value.startswith(("range(", "interval(", "tag(", "choice(")):
            continue
        quoted = value.startswith(("'", '"', "["))
        point.append(item if quoted else f"{key}={value.split(',')[0]}")
    return point


def train_argv(words: list[str], exclude_keys: list[str]) -> list[str]:
    """The documented overrides, made small: the tiny model for a hub model, one epoch, few
    examples, one seed per sweep point, two optuna trials; the shrinking keys stay out of the
    run folder's name."""
    multirun = "-m" in words or "--multirun" in words
    overrides = [w for w in words if w not in ("-m", "--multirun")]
    out, keys = [], set()
    for item in overrides:
        key, _, value = item.partition("=")
        keys.add(key)
        if key in SHRINK:
            continue
        if key == "seed" and value.startswith("range("):
            value = "range(1)"
        if key == "hydra.sweeper.n_trials":
            value = "2"
        out.append(f"{key}={value}")
    model = compose(_sweep_point(out)).model
    if model.name not in LOCAL_MODELS and HUB_ID.fullmatch(str(model.get("name_or_path"))):
        out = [o for o in out if not o.startswith("model=")] + \
            ["model=tiny", f"model.name={model.name}"]
    if multirun and "seed" not in keys:
        out.append("seed=0")  # a preset's seed grid, cut to one seed
    out += [f"{k}={v}" for k, v in SHRINK.items()]
    excluded = [*exclude_keys, *SHRINK, "model.name"]
    out.append(f"hydra.job.config.override_dirname.exclude_keys=[{','.join(excluded)}]")
    return (["-m"] if multirun else []) + out


NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def _expected(lines: list[str]) -> list[re.Pattern]:
    patterns = []
    for line in lines:
        parts = re.split(rf"(\.\.\.|{NUMBER.pattern})", line.strip())
        regex = "".join(".*" if p == "..." else r"-?[\d.,]+" if NUMBER.fullmatch(p)
                        else re.sub(r"(\\ |\s)+", r"\\s+", re.escape(p)) for p in parts)
        patterns.append(re.compile(regex))
    return patterns


def run_doc(path: Path, workdir: Path) -> list[str]:
    """Run the document's runnable commands in order; return the problems found."""
    exclude = list(compose(["model=tiny"]).hydra.job.config.override_dirname.exclude_keys)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BLURB_DATA_DIR": str(FIXTURES),
           "BLURBTUNE_CACHE": str(workdir / "cache"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    if path.name == "README.md":  # a newcomer's shell: the README must say where data goes
        del env["BLURB_DATA_DIR"]
    (workdir / "train.py").symlink_to(ROOT / "train.py")
    problems = []
    for cmd in commands(path):
        if cmd.needs is not None:
            continue
        words = [PLACEHOLDERS.get(w, w) for w in shlex.split(cmd.text, comments=True)]
        if words[0] == "export":  # run from the repository's root, as the README is read
            name, _, value = words[1].partition("=")
            env[name] = _expand(PLACEHOLDERS.get(value, value), {**env, "PWD": str(ROOT)})
            continue
        words = [_expand(w, env) for w in words]
        if words[:2] == ["python", "train.py"]:
            argv = [sys.executable, "train.py", *train_argv(words[2:], exclude)]
        elif words[0] == "ls":  # a documented folder exists
            argv = words
        else:
            argv = [sys.executable, "-m", "blurbtune", *words[1:]]
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, timeout=900)
        stdout, stderr = done.stdout.decode(), done.stderr.decode()  # keep the bars' \r
        where = f"{cmd.doc}:{cmd.line}: {cmd.text}"
        if done.returncode != 0:
            problems.append(f"{where}: exit {done.returncode}: {stderr.strip()[-1500:]}")
            continue
        shown = visible_lines(stdout + stderr)
        at = 0
        expected = list(cmd.expected)
        for placeholder, value in PLACEHOLDERS.items():
            expected = [e.replace(placeholder, value) for e in expected]
        for pattern in _expected(expected):
            hit = next((k for k in range(at, len(shown)) if pattern.search(shown[k])), None)
            if hit is None:
                problems.append(f"{where}: does not print {pattern.pattern!r}")
                break
            at = hit + 1
    return problems


@pytest.mark.slow
@pytest.mark.parametrize("doc", [p for p in DOCS if any(
    c.needs is None for c in commands(p))], ids=lambda p: p.name)
def test_documented_commands_run_as_documented(doc: Path, tmp_path: Path) -> None:
    assert run_doc(doc, tmp_path) == []

"""Which runs are one configuration: a run folder's identity, and what tells two groups apart.

A group is the runs that agree on every key of their resolved config (`.hydra/config.yaml`,
flattened to dotted keys) except the seeds and the keys in NO_EFFECT. The data, the model and
the tokenizer are identified by content (the sha256 and fingerprint in `provenance.json`), not
by a path or a config name, and the stabilizer by what the run applied (`stabilizer` and
`stabilizer_knobs` in `results.json`), so a setting that picks a stabilizer at run time groups
with the stabilizer it picked.

A folder without `.hydra/config.yaml` (made by hand or by another tool) is identified by what
its results.json records: task, model (by content when it has a provenance.json, else by name
and path), stabilizer and knobs, lr, batch size and epochs. Such runs group with each other by
those facts, and never with runs that have a config file: nothing says the rest of their
settings agree.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from blurbtune.report.constants import REFERENCE_STABILIZER, number

CONFIG_FILE = Path(".hydra") / "config.yaml"
PROVENANCE_FILE = "provenance.json"

SEEDS = ("seed", "data_seed", "init_seed")

# Identity keys read from results.json and provenance.json, named after the config key each one
# records, or after what it is.
TASK, LR, BATCH_SIZE, EPOCHS = "task.name", "optimizer.lr", "task.batch_size", "trainer.max_epochs"
STABILIZER, KNOBS = "stabilizer", "stabilizer knobs"
MODEL, DATA = "model (weights sha256[:8])", "data (sha256[:8])"
TOKENIZER = "tokenizer (fingerprint)"
CONFIG_SOURCE = "config file"
NO_CONFIG = "none (results.json only)"

# Config keys that cannot change a number, left out of a run's identity (a key matches when it
# is the pattern or lies below it). The one place that decides this; each entry says why.
NO_EFFECT = {
    "name": "the sweep folder's name",
    "run_dir": "where the run folder is",
    "hydra": "Hydra's own settings: output folders, launcher, sweeper, job logging",
    "data.cache_dir": "where tokenised splits are cached (the cache key holds the content)",
    "data.num_workers": "DataLoader processes; the example order comes from data_seed alone",
    "threads": "torch threads per process (the same sums, perhaps rounded in another order)",
    "save_model": "whether model/ is also written after training",
    "keep_checkpoints": "whether checkpoints are kept after the run",
    "checkpoint_every": "how often a resume checkpoint is written (it draws nothing)",
    "dry_run": "a dry run trains nothing and writes no results",
    "rerun_diverged": "whether a rerun retrains a diverged run, not how a run trains",
    "test_every_epoch": "a test score recorded after each epoch; never selects, draws nothing",
    "stack": "which seeds share a process; each member is recorded as its own single run",
    "logger*": "where metrics are logged",
    "trainer.logger*": "where Lightning logs",
    "trainer.enable_progress_bar": "console display",
    "trainer.enable_model_summary": "console display",
}
# Config keys that name content by a path or a name; the content identifies the run instead.
BY_CONTENT = {
    "data_dir": DATA,
    "model.name_or_path": MODEL,
    "model.name": MODEL,
    "model.tokenizer": TOKENIZER,
}
# The stabilizer config says what was asked for; results.json says what was applied.
REQUESTED_STABILIZER = "stabilizer"
# Settings that choose at run time, and the results.json key that records what they chose.
APPLIED = {"data.group_by_length": "group_by_length"}
# Keys added to the config after runs were made with the behaviour they now name: a run whose
# config lacks one ran as this value says, and groups with new runs that set it so.
# (The BIOSSES study's first seeds predate model.new_head and trainer.max_steps.)
ADDED_KEYS = {"trainer.compile": False, "model.new_head": False, "trainer.max_steps": -1}

# Keys the tables show in their own columns (Task, Stabilizer, Knobs, lr, bs).
SHOWN = (TASK, STABILIZER, KNOBS, LR, BATCH_SIZE)
# Values shown shortened: content hashes.
HASHED = (MODEL, DATA)
HEX = re.compile(r"[0-9a-f]{64}")

# A resolver call (`${name:...}`) answers for the machine that reads the config, not the one
# that ran it (`${oc.env:...}`, `${minilm_path:}`, `${mixed_precision:}`): compared as written.
RESOLVER_CALL = re.compile(r"\$\{\s*[\w.\-]+\s*:")


def knobs_label(knobs: dict[str, Any] | None) -> str:
    """A stable one-line form of the stabilizer knobs, e.g. "llrd.decay=0.9, reinit.layers=1"."""
    if not knobs:
        return ""
    return ", ".join(f"{key}={knobs[key]}" for key in sorted(knobs))


@cache
def excluded(key: str) -> bool:
    """Whether a dotted config key is left out of the identity (seed, no effect, by content)."""
    if key in SEEDS or key in BY_CONTENT:
        return True
    if key == REQUESTED_STABILIZER or key.startswith(REQUESTED_STABILIZER + "."):
        return True
    return any(fnmatchcase(key, p) or fnmatchcase(key, p + ".*") for p in NO_EFFECT)


def _keep_resolver_calls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _keep_resolver_calls(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_keep_resolver_calls(v) for v in node]
    if isinstance(node, str) and RESOLVER_CALL.search(node):
        return node.replace("${", "\\${")  # OmegaConf's escape: the text, not its value
    return node


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} for nested mappings; lists are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resolved_config(path: Path) -> dict[str, Any]:
    """A run's `.hydra/config.yaml` as dotted keys, interpolations between keys resolved.

    Parsed with PyYAML's C loader as OmegaConf reads YAML (`config_loader`), and resolved once
    per content: runs of one configuration differ only in their seeds, so a config whose
    interpolations do not mention a seed is resolved once for all of them (`_resolved`).
    Raises ValueError saying why the file is unusable.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {Path(path).name}: {exc}".splitlines()[0]) from exc
    return dict(_parsed_and_resolved(text, Path(path).name))


@lru_cache(maxsize=4096)
def _parsed_and_resolved(text: str, name: str) -> tuple[tuple[str, Any], ...]:
    import yaml

    try:
        raw = yaml.load(text, Loader=config_loader())
    except yaml.YAMLError as exc:
        raise ValueError(f"cannot read {name}: {exc}".splitlines()[0]) from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{name}: expected a mapping, got {type(raw).__name__}")
    seeds = {key: raw[key] for key in SEEDS if key in raw}
    if SEED_INTERPOLATION.search(text) or any(isinstance(v, str) for v in seeds.values()):
        return _resolved(json.dumps(raw, sort_keys=True, default=str))
    rest = {key: value for key, value in raw.items() if key not in SEEDS}
    return _resolved(json.dumps(rest, sort_keys=True, default=str)) + tuple(seeds.items())


@lru_cache(maxsize=1024)
def _resolved(raw_json: str) -> tuple[tuple[str, Any], ...]:
    return tuple(resolved_mapping(json.loads(raw_json)).items())


# An interpolation that names a seed key: its config is resolved with its own seeds.
SEED_INTERPOLATION = re.compile(r"\$\{[^}]*\b(" + "|".join(SEEDS) + r")\b")


@lru_cache(maxsize=1)
def config_loader() -> type:
    """PyYAML's C loader reading YAML as OmegaConf does (its resolvers and constructors: `1e-5`
    is a float, which YAML 1.1 reads as a string; no timestamps), duplicate keys refused."""
    import yaml
    from omegaconf._utils import get_yaml_loader

    omegaconf_loader = get_yaml_loader()

    class Loader(yaml.CSafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            keys = [key.value for key, _ in node.value]
            twice = sorted({key for key in keys if keys.count(key) > 1})
            if twice:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found duplicate key {twice[0]}", node.start_mark)
            return super().construct_mapping(node, deep=deep)

    Loader.yaml_implicit_resolvers = dict(omegaconf_loader.yaml_implicit_resolvers)
    Loader.yaml_constructors = dict(omegaconf_loader.yaml_constructors)
    return Loader


def resolved_mapping(raw: dict[str, Any]) -> dict[str, Any]:
    """An unresolved config (as `.hydra/config.yaml` holds it) as dotted keys, interpolations
    between keys resolved and resolver calls kept as written.

    OmegaConf resolves only the keys that hold an interpolation and the keys they name
    (`_interpolated`); every other value is returned as read, as OmegaConf's resolution returns
    a value without `${`. Where that shortcut cannot be shown to agree, the whole config is
    resolved (`_resolved_whole`).
    """
    flat = flatten(raw)
    names = {key: _references(value) for key, value in flat.items()}
    if any(found is None for found in names.values()):
        return _resolved_whole(raw)
    pending = {key for key, found in names.items() if found}
    if not pending:
        return flat
    resolved = _interpolated(raw, pending)
    if resolved is None:
        return _resolved_whole(raw)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if key in pending:
            out.update(flatten(_at(resolved, key), key))
        else:
            out[key] = value
    return out


# `${a.b}`: an absolute interpolation of one key, the only kind `_interpolated` follows.
PLAIN_INTERPOLATION = re.compile(r"\$\{([\w\-]+(?:\.[\w\-]+)*)\}")
_ABSENT = object()


def _references(value: Any) -> list[str] | None:
    """The keys that `value`'s interpolations name: [] when it has none (a resolver call is
    kept as text), None when one is not a plain `${a.b}` or the text holds a backslash
    (OmegaConf's escapes)."""
    if isinstance(value, dict | list):
        found: list[str] = []
        for item in value.values() if isinstance(value, dict) else value:
            names = _references(item)
            if names is None:
                return None
            found += names
        return found
    if not isinstance(value, str) or "${" not in value:
        return []
    if "\\" in value:
        return None
    if RESOLVER_CALL.search(value):
        return []
    names = PLAIN_INTERPOLATION.findall(value)
    return names if len(names) == value.count("${") else None


def _at(node: Any, key: str) -> Any:
    """The value at dotted `key` in nested mappings; _ABSENT when there is none."""
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _interpolated(raw: dict[str, Any], pending: set[str]) -> dict[str, Any] | None:
    """The config cut down to the keys in `pending` and those their interpolations name (at
    the same places, so that the values are the same), resolved by OmegaConf; None where a key
    named is absent or the resolution fails."""
    needed: set[str] = set()
    todo = list(pending)
    while todo:
        key = todo.pop()
        if key in needed:
            continue
        value = _at(raw, key)
        names = None if value is _ABSENT else _references(value)
        if names is None:
            return None
        needed.add(key)
        todo += names
    part: dict[str, Any] = {}
    for key in sorted(needed):
        parents = key.split(".")[:-1]
        if any(".".join(parents[:i]) in needed for i in range(1, len(parents) + 1)):
            continue  # inside a subtree taken whole
        node = part
        for name in parents:
            node = node.setdefault(name, {})
        node[key.split(".")[-1]] = _keep_resolver_calls(_at(raw, key))
    try:
        text = json.dumps(part)
    except (TypeError, ValueError):
        text = None
    if text is None or json.loads(text) != part:  # JSON would not give it back: uncached
        return _resolved_part(part)
    return _resolved_json(text)


@lru_cache(maxsize=1024)
def _resolved_json(text: str) -> dict[str, Any] | None:
    """`_resolved_part` cached by content: the part of a sweep's configs that interpolates
    often differs only in a value it names (the lr), so 200 configurations are 40 parts."""
    return _resolved_part(json.loads(text))


def _resolved_part(part: dict[str, Any]) -> dict[str, Any] | None:
    """`part` resolved by OmegaConf; None when that fails."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(part), resolve=True)
    except OmegaConfBaseException:
        return None


def _resolved_whole(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` resolved by OmegaConf as a whole; an interpolation that fails (of an absent key)
    is kept as written."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    config = OmegaConf.create(_keep_resolver_calls(raw))
    try:
        return flatten(OmegaConf.to_container(config, resolve=True))
    except OmegaConfBaseException:  # an interpolation to an absent key: that key as written
        out = {}
        for key, value in flatten(raw).items():
            try:
                node = OmegaConf.select(config, key, throw_on_resolution_failure=True)
                value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(
                    node) else node
            except OmegaConfBaseException:
                pass
            out[key] = value
        return out


def _text(value: Any) -> str:
    """One canonical string per value, so that equal settings compare equal."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()


def model_identity(provenance: dict | None, result: dict) -> str:
    """The weights' sha256 (one file), a sha256 over `file:sha256` lines (several), or a
    description where there is no weights file (built in code; a hub model not in the cache).
    Without provenance.json: the model's name and path as results.json records them."""
    if provenance is None or not isinstance(provenance.get("model"), dict):
        return f"name {result.get('model')}, path {result.get('model_name_or_path')}"
    model = provenance["model"]
    weights = model.get("weights")
    if isinstance(weights, dict) and weights:
        if len(weights) == 1:
            return str(next(iter(weights.values())))
        return _digest([f"{name}:{sha}" for name, sha in weights.items()])
    if model.get("source") == "built in code":
        return f"built in code ({model.get('name')})"
    if model.get("hub_id"):
        return f"hub {model['hub_id']}@{model.get('revision', 'unknown')}"
    return f"path {model.get('path') or result.get('model_name_or_path')}"


def data_identity(provenance: dict | None, config: dict[str, Any] | None) -> str | None:
    """A sha256 over the `split:sha256` lines of the data files read; without provenance.json,
    the data folder as configured (None when there is no config either)."""
    data = (provenance or {}).get("data")
    if isinstance(data, dict) and data:
        return _digest([f"{split}:{(entry or {}).get('sha256')}" for split, entry in data.items()])
    if config is not None and "data_dir" in config:
        return f"path {config['data_dir']}"
    return None


def read_provenance(folder: Path) -> dict | None:
    """The run's provenance.json, None when it has none; ValueError when it cannot be read."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        provenance = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {PROVENANCE_FILE}: {exc}") from exc
    if not isinstance(provenance, dict):
        raise ValueError(f"{PROVENANCE_FILE}: expected a JSON object")
    return provenance


# What made a run's numbers besides its settings, as provenance.json records it: pooled in one
# configuration, but the report says when a configuration mixes them (bf16 kernels and library
# changes move a seed's numbers). Absent from a run (older runs): unknown, not a difference.
VERSIONS = {
    "blurbtune source": ("code", "source_sha256"),
    "torch": ("torch", "version"),
    "transformers": ("packages", "transformers"),
    "device": ("torch", "devices"),
}


def versions(provenance: dict | None) -> dict[str, str | None]:
    """{what: value or None} for each of VERSIONS (a source hash cut to 12 hex digits)."""
    out: dict[str, str | None] = {}
    for name, (section, key) in VERSIONS.items():
        value = ((provenance or {}).get(section) or {}).get(key)
        if isinstance(value, list):
            value = ", ".join(sorted(str(v) for v in value)) or None
        if name == "blurbtune source" and isinstance(value, str):
            value = value[:12]
        out[name] = None if value is None else str(value)
    return out


def run_identity(folder: Path, result: dict, provenance: dict | None = None) -> dict[str, str]:
    """The identity of the run in `folder` whose parsed results.json is `result` and
    provenance.json `provenance` (read_provenance).

    Raises ValueError naming an unreadable `.hydra/config.yaml`.
    """
    folder = Path(folder)
    config = None
    if (folder / CONFIG_FILE).is_file():
        config = resolved_config(folder / CONFIG_FILE)

    identity = {} if config is None else {
        key: _text(value) for key, value in {**ADDED_KEYS, **config}.items()
        if not excluded(key)}
    if config is not None:
        for key, recorded_as in APPLIED.items():
            if result.get(recorded_as) is not None:
                identity[key] = _text(result[recorded_as])
    recorded = {
        TASK: result.get("task"),
        STABILIZER: result.get("stabilizer") or "none",
        KNOBS: knobs_label(result.get("stabilizer_knobs")),
        LR: result.get("lr"),
        BATCH_SIZE: result.get("batch_size"),
        EPOCHS: result.get("max_epochs"),
        MODEL: model_identity(provenance, result),
        DATA: data_identity(provenance, config),
        CONFIG_SOURCE: str(CONFIG_FILE) if config is not None else NO_CONFIG,
    }
    if provenance and isinstance(provenance.get("tokenizer"), dict):
        recorded[TOKENIZER] = provenance["tokenizer"].get("fingerprint")
    for key, value in recorded.items():  # what the run recorded wins over the config's value
        if value is not None:
            identity[key] = _text(value)
        elif key in (LR, BATCH_SIZE, EPOCHS) and key not in identity:
            identity[key] = _text(None)
    return identity


def config_id(identity: dict[str, str]) -> str:
    """A short, stable name for a configuration: the first 8 hex digits of its identity's sha256."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def context(identity: dict[str, str]) -> dict[str, str]:
    """The identity without the stabilizer: configurations that differ only in it compare."""
    return {k: v for k, v in identity.items() if k not in (STABILIZER, KNOBS)}


def display_value(key: str, value: str | None) -> str:
    """A value as the tables show it: content hashes cut to 8 hex digits."""
    if value is None:
        return "-"
    if key in HASHED and HEX.fullmatch(value):
        return value[:8]
    return value


@dataclass
class Configs:
    """The configurations found, one row each (index: config id).

    `table` columns: model, task, stabilizer, knobs, lr, batch_size (as results.json has them),
    model_id (content), context (the identity without the stabilizer, as an id), reference (the
    config id of `none` in the same context, or None), and one column per key in `varying`.
    """

    identities: dict[str, dict[str, str]]
    table: pd.DataFrame
    varying: list[str]
    reference_lr: float | None = None  # `--reference-lr`, when given

    def label(self, config: str) -> str:
        """e.g. "minilm / biosses / llrd (llrd.decay=0.9, lr=3e-05, bs=16, trainer.max_epochs=2)".
        """
        row = self.table.loc[config]
        settings = [row["knobs"]] if row["knobs"] else []
        settings += [f"lr={number(row['lr'])}", f"bs={number(row['batch_size'])}"]
        settings += [f"{key}={row[key]}" for key in self.varying]
        return f"{row['model']} / {row['task']} / {row['stabilizer']} ({', '.join(settings)})"

    def describe(self, frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` (with a `config` column) with the description columns put in front of it."""
        columns = ["model", "task", "stabilizer", "knobs", "lr", "batch_size", *self.varying]
        described = self.table.loc[frame["config"], columns].reset_index(drop=True)
        rest = frame.drop(columns=[c for c in columns if c in frame]).reset_index(drop=True)
        return pd.concat([rest[["config"]], described, rest.drop(columns="config")], axis=1)


def distinguishing(identities: dict[str, dict[str, str]], table: pd.DataFrame) -> list[str]:
    """The identity keys that tell apart two configurations of one model name and task.

    The tables show these as columns, beside model, task, stabilizer, knobs, lr and batch size;
    keys that differ only between tasks or model names (the task's own settings, the model's
    weights) are told by those columns already. A key absent from a configuration (one made by
    hand, with no config file) counts as unknown, not as a value; `config file` tells them apart.
    """
    keys = sorted({key for identity in identities.values() for key in identity} - set(SHOWN))
    varying = []
    for key in keys:
        for _, block in table.groupby(["model", "task"], dropna=False, sort=False):
            values = {identities[c].get(key) for c in block.index} - {None}
            if len(values) > 1:
                varying.append(key)
                break
    return varying


# The identity keys that hold a configuration's learning rate (task.lr feeds optimizer.lr).
LR_KEYS = (LR, "task.lr")


def at_lr(identity: dict[str, str], lr: float) -> dict[str, str]:
    """`identity` with its learning rate set to `lr` (the keys it has of LR_KEYS)."""
    return {k: (_text(float(lr)) if k in LR_KEYS else v) for k, v in identity.items()}


def build_configs(runs: pd.DataFrame, identities: dict[str, dict[str, str]],
                  reference_lr: float | None = None) -> Configs:
    """The configurations of `runs` (which has a `config` column), with what distinguishes them.

    Each configuration's reference is `none` in the same context (all but the stabilizer);
    with `reference_lr`, one that has no `none` at its own learning rate (a technique run at
    the lr that suits it, such as LoRA) gets the `none` at `reference_lr`, otherwise identical
    (`reference_lr` column: that lr, else empty).
    """
    columns = ["model", "task", "stabilizer", "knobs", "lr", "batch_size"]
    rows = {}
    contexts = {config: config_id(context(identity)) for config, identity in identities.items()}
    reference = {contexts[c]: c for c, identity in identities.items()
                 if identity.get(STABILIZER) == REFERENCE_STABILIZER and not identity.get(KNOBS)}
    for config, group in runs.groupby("config", sort=False):
        first = group.iloc[0]
        row = {key: first[key] for key in columns}
        row["model"] = ", ".join(sorted(set(group["model"].astype(str))))  # same weights
        row["model_id"] = identities[config].get(MODEL)
        row["context"] = contexts[config]
        ref = reference.get(contexts[config])
        row["reference_lr"] = None
        if ref is None and reference_lr is not None:
            ref = reference.get(config_id(context(at_lr(identities[config], reference_lr))))
            row["reference_lr"] = float(reference_lr) if ref is not None else None
        row["reference"] = ref if ref != config else None
        rows[config] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "config"
    varying = distinguishing(identities, table) if len(table) else []
    for key in varying:
        table[key] = [display_value(key, identities[c].get(key)) for c in table.index]
    if len(table):  # `none` first in each task, then as the tables read
        later = table["stabilizer"] != REFERENCE_STABILIZER
        order = table.assign(_ref=later, _id=table.index).sort_values(
            ["model", "task", "_ref", "stabilizer", "knobs", "lr", "batch_size", *varying, "_id"],
            kind="stable")
        table = order.drop(columns=["_ref", "_id"])
    return Configs(identities=identities, table=table, varying=varying,
                   reference_lr=reference_lr)

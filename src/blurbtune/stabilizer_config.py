"""The `stabilizer` section of a run's config: names, knobs and the `recommended` choice.

What stabilizers exist, their section key and their knobs with defaults are read from the
config group itself (`conf/stabilizer/<name>.yaml`, each holding one section, e.g.
`llrd: {decay: 0.9}`), so a stabilizer and its knobs are declared in one place. Which of
them do not compose, and why, is the table `REFUSED` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from blurbtune import adapters, stabilizers
from blurbtune.errors import ConfigError
from blurbtune.families import num_layers
from blurbtune.models import package_path
from blurbtune.recommend import recommend

RECOMMENDED = "recommended"

# Stabilizers that do not compose, by section, and why. LoRA and BitFit choose which weights
# train; llrd composes with them (the adapters or biases of layer l get layer l's lr).
REFUSED: dict[frozenset[str], str] = {
    frozenset({"lora", "freeze"}): "lora already freezes every pretrained weight (only the "
    "adapters and the head train), so freeze_lower is redundant",
    frozenset({"bitfit", "freeze"}): "bitfit already freezes every weight except the biases "
    "and the head, so freeze_lower is redundant",
    frozenset({"lora", "reinit"}): "reinit_top re-draws the top layers to train them afresh "
    "and lora freezes every pretrained weight, so they would stay random",
    frozenset({"bitfit", "reinit"}): "reinit_top re-draws the top layers to train them afresh "
    "and bitfit trains only their biases, so their weights would stay random",
    frozenset({"lora", "bitfit"}): "both choose which weights train (adapters or biases); "
    "use one",
}


@dataclass(frozen=True)
class Stabilizer:
    """One option of the `stabilizer` config group."""

    name: str  # the option, e.g. freeze_lower
    section: str  # its key under `stabilizer`, e.g. freeze
    defaults: dict[str, Any]  # knob -> default value


@cache
def registry() -> dict[str, Stabilizer]:
    """The stabilizers by section key, in file-name order (`none`, being empty, has none)."""
    found: dict[str, Stabilizer] = {}
    for path in sorted(Path(package_path("conf", "stabilizer")).glob("*.yaml")):
        content = OmegaConf.to_container(OmegaConf.load(path)) or {}
        if len(content) > 1:
            raise ConfigError(f"{path}: a stabilizer file holds one section, got {list(content)}")
        for section, knobs in content.items():
            found[section] = Stabilizer(path.stem, section, dict(knobs or {}))
    return found


def by_name(name: str) -> Stabilizer | None:
    """The stabilizer of a config-group option (None for `none`)."""
    return next((s for s in registry().values() if s.name == name), None)


def stabilizer_name(stab: Any) -> str:
    """`none`, or the active stabilizers joined by `+` in a fixed order."""
    names = [s.name for key, s in registry().items() if stab and key in stab]
    return "+".join(names) or "none"


def stabilizer_knobs(stab: Any) -> dict[str, Any]:
    """Every knob as `section.knob` -> value, e.g. {"llrd.decay": 0.9}."""
    if not stab:
        return {}
    return {f"{k}.{knob}": stab[k][knob] for k in registry() if k in stab
            for knob in sorted(stab[k] or {})}


def check_stabilizer(stab: Any) -> None:
    """Unknown stabilizer sections or knobs are errors, named with their key."""
    known = registry()
    for section in stab or {}:
        if section not in known:
            raise ConfigError(f"stabilizer.{section} is not a stabilizer; known: {sorted(known)}")
        for knob in stab[section] or {}:
            if knob not in known[section].defaults:
                raise ConfigError(f"stabilizer.{section}.{knob} is not a knob of {section}; "
                                  f"known: {sorted(known[section].defaults)}")
    if stab and RECOMMENDED in stab and len(stab) > 1:
        others = sorted(set(stab) - {RECOMMENDED})
        raise ConfigError(f"stabilizer=recommended chooses the stabilizer itself; it does not "
                          f"combine with stabilizer.{', stabilizer.'.join(others)}")
    for pair, why in REFUSED.items():
        if stab and pair <= set(stab):
            names = sorted(known[section].name for section in pair)
            raise ConfigError(f"stabilizer=[{','.join(names)}] is refused: {why}")


def resolve(stab: Any, model: nn.Module, task_type: str, n_train: int) -> dict[str, Any]:
    """The stabilizer the run applies, as results.json records it.

    Returns `stabilizer` (the name applied, never `recommended`), `stabilizer_knobs`,
    `stabilizer_choice` (e.g. "recommended -> llrd (ELECTRA)", None unless recommended) and
    `sections` (the config sections to apply). `recommended` applies its choice at that
    stabilizer's defaults.
    """
    check_stabilizer(stab)
    choice = None
    sections = {k: dict(v or {}) for k, v in (stab or {}).items()}
    if RECOMMENDED in sections:
        low_resource = int(sections[RECOMMENDED].get(
            "low_resource", registry()[RECOMMENDED].defaults["low_resource"]))
        rec = recommend(model.config.model_type, num_layers(model), task_type, n_train,
                        low_resource=low_resource)
        chosen = by_name(rec.stabilizer)
        sections = {chosen.section: dict(chosen.defaults)} if chosen else {}
        choice = str(rec)
    return {"stabilizer": stabilizer_name(sections), "stabilizer_knobs": stabilizer_knobs(sections),
            "stabilizer_choice": choice, "sections": sections}


def apply_stabilizers(model: nn.Module, stab: Any, lr: float, weight_decay: float,
                      init_seed: int) -> tuple[list[dict], list[str], list[str]]:
    """Freeze, re-initialise, add LoRA adapters or keep only the biases trainable (BitFit), and
    build the (LLRD) optimizer groups, as the config asks; `model` is changed in place (LoRA's
    adapters go into it), and its adapters are drawn from `init_seed` alone. Returns the
    groups, the frozen and the re-initialised parameter names."""
    check_stabilizer(stab)
    stab = stab or {}
    frozen: list[str] = []
    reinit: list[str] = []
    try:
        if "lora" in stab:
            knobs = {**registry()["lora"].defaults, **(stab["lora"] or {})}
            frozen = adapters.add_lora(model, r=knobs["r"], alpha=knobs["alpha"],
                                       dropout=knobs["dropout"], seed=int(init_seed))
        if "bitfit" in stab:
            frozen = adapters.bitfit(model)
        if "freeze" in stab:
            frozen = stabilizers.freeze_lower_layers(
                model, int(stab["freeze"]["layers"]),
                embeddings=bool(stab["freeze"].get("embeddings", True)))
        if "reinit" in stab:
            gen = torch.Generator().manual_seed(int(init_seed))
            reinit = stabilizers.reinit_top_layers(
                model, int(stab["reinit"]["layers"]),
                pooler=bool(stab["reinit"].get("pooler", True)), generator=gen)
        decay = float(stab["llrd"]["decay"]) if "llrd" in stab else 1.0
        groups = stabilizers.layerwise_param_groups(model, lr, weight_decay, decay=decay)
    except ValueError as e:  # the stabilizers name the key and the range expected
        raise ConfigError(str(e)) from None
    return groups, frozen, reinit

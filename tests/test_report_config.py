"""A run's config as the report reads it: OmegaConf resolves only the keys that interpolate,
and the values are those of OmegaConf resolving the whole config."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from blurbtune.report import identity
from blurbtune.report.identity import config_loader, resolved_mapping

STUDY = Path(__file__).resolve().parents[1] / "docs" / "study" / "runs"

CASES = {
    "no interpolation": {"a": 1, "b": {"c": "x", "d": [1, 2.5]}, "e": 1e-5, "f": None},
    "a chain": {"a": "${b}", "b": "${c.d}", "c": {"d": 2}, "e": 3},
    "a subtree": {"opt": {"lr": "${task.lr}", "wd": 0.1}, "copy": "${opt}",
                  "task": {"lr": 1e-4, "epochs": 3}},
    "in a string": {"name": "run-${task.lr}-${seed}", "task": {"lr": 0.1}, "seed": 3},
    "in a list": {"l": [1, "${x}", {"y": "${x}"}], "x": 5, "z": "${l}"},
    "relative": {"a": {"b": "${.c}", "c": 4}, "d": "${a.b}"},
    "a bool and a null": {"flag": "${f}", "f": True, "n": "${m}", "m": None},
    "indexed": {"l": [7, 8], "x": "${l.1}"},
    "an int key": {"a": {1: "x", "y": 2}, "b": "${a}"},  # JSON would make it "1"
}


def whole(raw: dict) -> dict:
    """OmegaConf's resolution of the whole config, flattened by pandas (lists are leaves)."""
    resolved = OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    return pd.json_normalize(resolved, sep=".").to_dict("records")[0]


@pytest.mark.parametrize("name", CASES)
def test_values_are_omegaconfs(name: str) -> None:
    raw = CASES[name]
    got = resolved_mapping(raw)
    expected = whole(raw)
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == value and type(got[key]) is type(value), key


def test_the_study_configs_resolve_as_a_whole() -> None:
    """Every committed study config (interpolations, resolver calls) as OmegaConf resolves it
    whole, resolver calls kept as written."""
    files = sorted(STUDY.glob("*/.hydra/config.yaml"))
    if not files:
        pytest.skip("no committed study runs")
    for file in files:
        raw = yaml.load(file.read_text(), Loader=config_loader())
        assert "${" in file.read_text()
        got = resolved_mapping(raw)
        expected = identity._resolved_whole(raw)
        assert list(got.items()) == list(expected.items()), file
        assert got["optimizer.lr"] == raw["task"]["lr"]
        assert got["model.name_or_path"] == "${minilm_path:}"


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """What OmegaConf.create is given, call by call."""
    seen: list[dict] = []
    create = OmegaConf.create

    def record(obj=None, *args, **kwargs):
        seen.append(obj)
        return create(obj, *args, **kwargs)

    monkeypatch.setattr(OmegaConf, "create", staticmethod(record))
    return seen


def test_omegaconf_sees_only_what_interpolates(created: list[dict]) -> None:
    big = {f"k{i}": {"x": i, "y": [i, "text"]} for i in range(50)}
    assert resolved_mapping(big) == pd.json_normalize(big, sep=".").to_dict("records")[0]
    assert created == []
    config = big | {"opt": {"lr": "${task.lr}", "wd": 0.1}, "task": {"lr": 0.5, "n": 2}}
    assert resolved_mapping(config)["opt.lr"] == 0.5
    assert created == [{"opt": {"lr": "${task.lr}"}, "task": {"lr": 0.5}}]


def test_fixed_layout_keeps_margins_and_room_for_the_panels() -> None:
    """Margins in inches as asked; labels taller than the figure make it taller, not the axes
    negative (subplots_adjust would refuse bottom above top)."""
    from matplotlib.figure import Figure

    from blurbtune.report.plots import MIN_PANEL, fixed_layout

    fig = Figure(figsize=(12, 6.4))  # two rows of dev-curve panels
    axes = fig.subplots(2, 3)
    fixed_layout(fig, bottom=0.6, top=0.85, hspace=1.1)
    width, height = fig.get_size_inches()
    low, high = axes[1, 0].get_position(), axes[0, 0].get_position()
    assert (width, height) == (12, 6.4)
    assert low.y0 * height == pytest.approx(0.6)
    assert (1 - high.y1) * height == pytest.approx(0.85)
    assert (high.y0 - low.y1) * height == pytest.approx(1.1)
    assert low.x0 * width == pytest.approx(0.75)

    tall = Figure(figsize=(5.5, 4.2))
    ax = tall.subplots()
    fixed_layout(tall, bottom=0.35 + 0.17 * 25)  # a label of 25 lines
    height = tall.get_size_inches()[1]
    assert ax.get_position().height * height == pytest.approx(MIN_PANEL)
    assert ax.get_position().y0 * height == pytest.approx(0.35 + 0.17 * 25)

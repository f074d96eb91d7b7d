"""The numeric and yes/no settings of a run, checked in one place once the config is composed.

Each key has a type and an allowed range; a value outside them is a ConfigError of one line
naming the key, the value given and what is allowed, e.g.
`task.batch_size=0: expected an integer ≥ 1`. Limits that depend on the model (layers,
position embeddings) are checked where the model is known (stabilizer_config, models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from blurbtune.errors import ConfigError

ABSENT = object()


@dataclass(frozen=True)
class Setting:
    """What one key accepts: `kind` int, float (int or float), bool, count_or_fraction
    (Lightning's limit_*_batches: a number of batches ≥ 1 or a fraction in (0, 1]), or
    interval (`checkpoint_interval`: epochs, a duration, or auto)."""

    key: str
    kind: str
    low: float | None = None  # inclusive unless `above`
    high: float | None = None  # inclusive
    above: bool = False  # low is exclusive: > low
    below: bool = False  # high is exclusive: < high
    null: str = ""  # what null means, when null is allowed
    extra: int | None = None  # one more allowed value outside the range (max_steps: -1)
    choices: tuple = ()  # kind "choice": the values allowed, as written in a config

    def allows(self, value: Any) -> bool:
        if value is None:
            return bool(self.null)
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "choice":
            return not isinstance(value, bool) and value in self.choices
        if self.kind == "interval":
            try:
                checkpoint_interval(value)
            except ValueError:
                return False
            return True
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "count_or_fraction":
            return (isinstance(value, int) and value >= 1) or (
                isinstance(value, float) and 0 < value <= 1)
        if self.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.extra is not None and value == self.extra:
            return True
        low_ok = self.low is None or (value > self.low if self.above else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.below else value <= self.high)
        return low_ok and high_ok

    def expected(self) -> str:
        """What the key accepts, in words: `an integer ≥ 1`, `a number in [0, 1]`..."""
        if self.kind == "bool":
            what = "true or false"
        elif self.kind == "choice":
            what = "one of " + ", ".join(dict.fromkeys(str(c) for c in self.choices))
        elif self.kind == "interval":
            what = ("a number of epochs ≥ 0 (0: only when stopped), a time such as 30min, 2h "
                    "or 90s, or auto")
        elif self.kind == "count_or_fraction":
            what = "a number of batches ≥ 1, or a fraction in (0, 1]"
        else:
            what = "an integer" if self.kind == "int" else "a number"
            if self.low is not None and self.high is not None:
                what += (f" in {'(' if self.above else '['}{_num(self.low)}, "
                         f"{_num(self.high)}{')' if self.below else ']'}")
            elif self.low is not None:
                what += f" {'>' if self.above else '≥'} {_num(self.low)}"
            if self.extra is not None:
                what = f"{self.extra} or {what}"
        return f"{what}, or null ({self.null})" if self.null else what


def _num(value: float) -> str:
    """1, 0.5, 2^64 - 1."""
    if float(value).is_integer() and value >= 1e6 and (int(value) + 1).bit_count() == 1:
        return f"2^{int(value).bit_length()} - 1"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


DURATION_UNITS = {"s": 1, "min": 60, "h": 3600}
AUTO_INTERVAL_S = 30 * 60  # checkpoint_every=auto: at least this often, in seconds


def checkpoint_interval(value: Any) -> tuple[str, float]:
    """`checkpoint_every` as (kind, amount): ("epochs", n) for an integer n ≥ 0, ("seconds", s)
    for a duration such as `30min`, `2h`, `90s` or `1.5h`, ("auto", AUTO_INTERVAL_S) for auto.
    Raises ValueError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return "epochs", value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto", AUTO_INTERVAL_S
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(number):]
        try:
            seconds = float(number) * DURATION_UNITS[unit]
        except (KeyError, ValueError):
            pass
        else:
            if math.isfinite(seconds) and seconds > 0:
                return "seconds", seconds
    raise ValueError(f"checkpoint_every={value!r}")


def _int(key: str, low: int | None = None, **kw: Any) -> Setting:
    return Setting(key, "int", low, **kw)


def _float(key: str, low: float | None = None, **kw: Any) -> Setting:
    return Setting(key, "float", low, **kw)


def _bool(key: str, **kw: Any) -> Setting:
    return Setting(key, "bool", **kw)


SEED_MAX = 2**64 - 1  # torch.manual_seed takes at most 64 bits
# What Lightning 2.6's Trainer(precision=...) accepts (transformer-engine needs its own package).
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true",
              "32", "16", "bf16", "64", 32, 16, 64, "transformer-engine",
              "transformer-engine-float16")
# What torch.set_float32_matmul_precision accepts.
MATMUL_PRECISIONS = ("highest", "high", "medium")

# In checking order: a key before the keys that interpolate it (task.lr before optimizer.lr),
# so that the message names the key the user set.
SETTINGS: tuple[Setting, ...] = (
    _int("seed", 0, high=SEED_MAX),
    _int("data_seed", 0, high=SEED_MAX, null="the seed"),
    _int("init_seed", 0, high=SEED_MAX, null="the seed"),
    _int("task.batch_size", 1),
    _int("data.eval_batch_size", 1),
    _int("task.epochs", 1),
    _int("trainer.max_steps", 1, extra=-1),  # -1: no limit on steps (Lightning's default)
    _int("trainer.max_epochs", 1),  # -1 (no limit) only with max_steps: see check_settings
    _float("task.lr", 0, above=True),
    _float("optimizer.lr", 0, above=True),
    _float("optimizer.weight_decay", 0),
    _float("optimizer.warmup_ratio", 0, high=1),
    # 0 would mean no clipping, as null does: one way to say it, so one run folder.
    _float("optimizer.gradient_clip_val", 0, above=True, null="no clipping"),
    _float("trainer.gradient_clip_val", 0, above=True, null="no clipping"),
    # Room for [CLS] and [SEP] (twice for a pair) and a few tokens of each text.
    _int("task.max_length", 8),
    _int("data.max_train_examples", 1, null="all"),
    _int("data.max_eval_examples", 1, null="all"),
    _int("data.num_workers", 0),
    _int("threads", 1, null="the CPUs this process may use"),
    Setting("checkpoint_every", "interval"),
    _int("trainer.log_every_n_steps", 1),
    Setting("trainer.limit_train_batches", "count_or_fraction", null="every batch"),
    Setting("trainer.limit_val_batches", "count_or_fraction", null="every batch"),
    Setting("trainer.limit_test_batches", "count_or_fraction", null="every batch"),
    *(_bool(key) for key in ("deterministic", "dry_run", "save_model", "keep_checkpoints",
                             "rerun_diverged", "test_every_epoch")),
    _bool("model.new_head"),
    _bool("trainer.compile"),
    # Stabilizer knobs: the type here; the range, which depends on the model, where it is known.
    _int("stabilizer.freeze.layers"),
    _bool("stabilizer.freeze.embeddings"),
    _int("stabilizer.reinit.layers"),
    _bool("stabilizer.reinit.pooler"),
    _float("stabilizer.llrd.decay"),
    _int("stabilizer.recommended.low_resource", 0),
    _int("stabilizer.lora.r", 1),
    _float("stabilizer.lora.alpha", 0, above=True),
    _float("stabilizer.lora.dropout", 0, high=1, below=True),
    Setting("trainer.precision", "choice", choices=PRECISIONS),
    Setting("trainer.matmul_precision", "choice", choices=MATMUL_PRECISIONS,
            null="torch's default"),
)


def value_of(cfg: DictConfig, key: str) -> Any:
    """The resolved value at `key`, ABSENT when there is none; a value that cannot be resolved
    is a ConfigError naming the key."""
    try:
        return OmegaConf.select(cfg, key, default=ABSENT, throw_on_missing=True)
    except Exception as e:  # noqa: BLE001 - OmegaConf's resolver and missing-value errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: cannot be resolved ({first})") from None


def check_settings(cfg: DictConfig) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for the first setting out of
    its type or range; see SETTINGS.

    trainer.max_epochs=-1 is Lightning's "no limit on epochs": allowed only with
    trainer.max_steps ≥ 1, since with max_steps=-1 too the run would never end.
    """
    for setting in SETTINGS:
        value = value_of(cfg, setting.key)
        if value is ABSENT:  # not set here (a stabilizer not chosen, an older run's config)
            continue
        if setting.key == "trainer.max_epochs" and value == -1 and not isinstance(value, bool):
            if value_of(cfg, "trainer.max_steps") >= 1:
                continue
            raise ConfigError("trainer.max_epochs=-1: no limit on epochs needs a limit on steps "
                              "(trainer.max_steps=N ≥ 1); else expected an integer ≥ 1")
        if not setting.allows(value):
            raise ConfigError(f"{setting.key}={_shown(value)}: expected {setting.expected()}")


def _shown(value: Any) -> str:
    """A value as the user would write it on the command line (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def check_sweeper_size(size: Any) -> None:
    """`hydra.sweeper.size` of `hydra/sweeper=stacked`: an integer ≥ 1, or auto; else a
    ConfigError. Checked before Hydra builds the sweeper (`sweep_outcome`), which checks again."""
    if str(size) != "auto" and (isinstance(size, bool) or not str(size).isdigit()
                                or int(size) < 1):
        raise ConfigError(f"hydra.sweeper.size={_shown(size)}: expected an integer ≥ 1 or auto "
                          "(members per stack; auto: as many as a GPU holds)")

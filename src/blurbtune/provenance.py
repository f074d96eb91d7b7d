"""`provenance.json`: what made a run, so its numbers can be traced and re-made.

The command and overrides, the code (a sha256 of the package's source, and the git commit and
dirty flag where a checkout tracks it), Python and every installed package, torch/CUDA/cuDNN
and the devices, the model's source with a hash of its weights, the sha256 of every data file
read, the seeds and the determinism flags in force.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import blurbtune
from blurbtune.data import sha256_file
from blurbtune.io import write_json

FILENAME = "provenance.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
# How the run was invoked: a re-run of the recorded config (`blurbtune verify`) differs here.
VOLATILE = ("command", "overrides")


SOURCE_SUFFIXES = (".py", ".yaml")  # the package's code and its shipped config


def source_files(folder: Path) -> list[Path]:
    """The package's source files under `folder` (.py and the shipped conf's .yaml), sorted by
    their path relative to it."""
    folder = Path(folder)
    found = [p for p in folder.rglob("*") if p.suffix in SOURCE_SUFFIXES
             and "__pycache__" not in p.parts and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def source_sha256(folder: Path) -> str:
    """sha256 over the package's source files: for each, in order of its relative path, the
    path (utf-8) and the bytes, each preceded by its length as 8 big-endian bytes. Two runs
    with the same hash ran the same code, wherever it was installed."""
    digest = hashlib.sha256()
    for path in source_files(folder):
        for part in (path.relative_to(folder).as_posix().encode(), path.read_bytes()):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def git_state(folder: Path) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout that tracks the package in `folder`; "unknown"
    when none does (no checkout, or the folder sits untracked or ignored inside another
    repository's work tree: that repository's commit says nothing about this code). `dirty`:
    a tracked source file differs from the commit, or a source file is untracked."""
    folder = Path(folder).resolve()

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True,
                                  text=True, timeout=20, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    unknown = {"commit": "unknown", "dirty": "unknown", "root": "unknown"}
    commit, listed = git("rev-parse", "HEAD"), git("ls-files", "-z", "--", ".")
    tracked = set(filter(None, (listed or "").split("\0")))  # relative to `folder`
    if commit is None or not tracked:
        return unknown
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    untracked = any(p.relative_to(folder).as_posix() not in tracked
                    for p in source_files(folder))
    return {"commit": commit.strip(),
            "dirty": "unknown" if status is None else bool(status.strip()) or untracked,
            "root": (git("rev-parse", "--show-toplevel") or "").strip()}


def packages() -> dict[str, str]:
    """Every installed distribution and its version, sorted by name."""
    found = {}
    for dist in importlib.metadata.distributions():
        meta = dist.metadata  # parsed at each access: `dist.version` would parse it again
        if meta["Name"]:
            found[meta["Name"]] = meta["Version"]
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def devices() -> list[str]:
    names = [platform.processor() or platform.machine()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                names = [line.split(":", 1)[1].strip()]
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        names += [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return names


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of each weights file directly in `folder`."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)}


def model_source(model_cfg: Any, model: Any) -> dict[str, Any]:
    """Where the weights came from: built in code, a local folder, or a hub id and revision."""
    name = model_cfg.get("name_or_path")
    if not name:
        return {"name": str(model_cfg.name), "source": "built in code", "weights": None}
    name = str(name)
    folder = Path(name).expanduser()
    if folder.is_dir():
        return {"name": str(model_cfg.name), "source": "local", "path": str(folder.resolve()),
                "weights": weights_sha256(folder)}
    revision = getattr(model.config, "_commit_hash", None)
    weights: dict[str, str] = {}
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(name, filename, revision=revision)
            if isinstance(cached, str):
                weights[filename] = sha256_file(Path(cached))
    except ImportError:
        pass
    return {"name": str(model_cfg.name), "source": "hub", "hub_id": name,
            "revision": revision or "unknown", "weights": weights or "unknown"}


@functools.cache
def _process_state() -> dict[str, Any]:
    """The code's git state and the installed packages, asked once per process: the runs of a
    sweep run the code and packages the process imported when it started."""
    folder = Path(blurbtune.__file__).resolve().parent
    return {"code": {**git_state(folder), "source_sha256": source_sha256(folder)},
            "packages": packages()}


def collect(*, overrides: list[str], model_cfg: Any, model: Any, tokenizer: Any,
            splits: dict[str, Any], seeds: dict, determinism: dict,
            threads: dict | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    """The provenance record of a run (a plain, JSON-ready dict). `fingerprint`: the
    tokenizer's, where the caller has it (a stack's members share one tokenizer)."""
    from blurbtune.models import tokenizer_fingerprint

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "command": sys.argv,
        "overrides": list(overrides),
        "code": {"blurbtune": blurbtune.__version__,
                 "source": str(Path(blurbtune.__file__).parent),
                 **_process_state()["code"]},
        "python": {"version": sys.version.split()[0], "implementation":
                   platform.python_implementation(), "platform": platform.platform()},
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cudnn": cudnn, "devices": devices()},
        "model": model_source(model_cfg, model),
        "tokenizer": {"source": str(model_cfg.get("tokenizer") or model_cfg.name_or_path),
                      "fingerprint": fingerprint or tokenizer_fingerprint(tokenizer)},
        "data": {name: {"path": str(Path(split.path).resolve()), "sha256": split.sha256}
                 for name, split in splits.items()},
        "seeds": seeds,
        "determinism": determinism,
        "threads": threads,
        "packages": dict(_process_state()["packages"]),
    }


def write(run_dir: Path, record: dict) -> Path:
    path = Path(run_dir) / FILENAME
    write_json(path, record)
    return path


def flatten(record: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf} for nested dicts; lists are leaves."""
    if not isinstance(record, dict):
        return {prefix: record}
    out: dict[str, Any] = {}
    for key, value in record.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(old: dict, new: dict, ignore: tuple[str, ...] = VOLATILE) -> list[str]:
    """Keys whose values differ between two provenance records (`ignore`d prefixes skipped)."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b))
            if not k.startswith(ignore) and a.get(k) != b.get(k)]

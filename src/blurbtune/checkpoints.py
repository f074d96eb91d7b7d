"""A run's checkpoint on disk: what it holds, how it is written and how it is read back.

Each run (a single run, or each member of a stack) keeps in `checkpoints/`:

- `last.ckpt`: Lightning's checkpoint of that run alone (its own tensors, contiguous copies,
  never views of a stack's storage), without the frozen tensors (`freeze_lower`'s layers, the
  base of LoRA or BitFit): those are the model as built from its pretrained weights, so the
  checkpoint names them and records their sha256, and a resume takes them from the model it
  builds again, after checking that hash.
- `best-<step>.pt`: the best-on-dev weights (frozen tensors left out as above), written once
  when they change; `last.ckpt` names the file it goes with.

Writes are atomic (a temporary file, then a rename) and, during training, in a background
thread: the tensors are copied to host memory first, so training goes on while they are
written. Reads use `torch.load(weights_only=True)`: a file whose pickle would run code is
refused (`UnsafeCheckpoint`), not loaded.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.utils.serialization as serialization
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from blurbtune.errors import BlurbtuneError
from blurbtune.io import writing

FOLDER = "checkpoints"
LAST = "last.ckpt"
BEST = "best-{step}.pt"


class UnsafeCheckpoint(BlurbtuneError):  # noqa: N818 (a state of a file, reported in one line)
    """A checkpoint whose pickle would run code (or build objects outside the allow-list)."""


class FrozenMismatch(BlurbtuneError):  # noqa: N818
    """The frozen weights as built now are not those the checkpoint was trained with."""


def load(path: Path, mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` on the CPU; a file that would need more than tensors,
    containers and numbers to unpickle is refused in one line naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = next((line.strip() for line in str(e).splitlines()
                       if "Unsupported" in line or "global" in line.lower()),
                      str(e).splitlines()[0] if str(e) else "not weights only")
        raise UnsafeCheckpoint(f"{path}: refused: loading it would run code or build objects "
                               f"a checkpoint does not hold ({reason}); blurbtune did not "
                               "load it: delete it if you did not put it there") from None


def own(t: torch.Tensor) -> torch.Tensor:
    """A contiguous host copy of `t` holding only its own elements (a slice's copy does not
    keep the storage it was sliced from)."""
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


def alias(t: torch.Tensor) -> torch.Tensor:
    """`t` as a tensor whose storage is exactly its own elements, sharing them (no copy) on the
    CPU: `torch.save` writes a tensor's whole storage, which for a member's slice of a stack
    is the stack's. For a write that ends before anything changes `t` (a stop's); else `own`."""
    if t.device.type != "cpu":
        return own(t)
    flat = t.detach().reshape(-1).view(torch.uint8).numpy()
    return torch.from_numpy(flat).view(t.dtype).view(t.shape)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- one run's checkpoint from a stack's, and back -----------------------------------------


def slice_checkpoint(checkpoint: dict, stacked: set[str], k: int, device_type: str) -> dict:
    """Member k's checkpoint from a stack's, in the form a single run of its seed writes (so
    it resumes alone or in any stack at the same position). Stacked tensors are member k's
    slices, as views: `member_files` copies them."""
    out = {key: value for key, value in checkpoint.items()
           if key not in ("blurbtune_members", "blurbtune_generators")}
    out["state_dict"] = {key: (t[k] if key.removeprefix("model.") in stacked else t)
                         for key, t in checkpoint["state_dict"].items()}
    out["optimizer_states"] = [
        {**s, "state": {i: {name: (v[k] if torch.is_tensor(v) and v.dim() else v)
                            for name, v in per_param.items()}
                        for i, per_param in s["state"].items()}}
        for s in checkpoint["optimizer_states"]]
    out["blurbtune"] = checkpoint["blurbtune_members"][k]
    resume = dict(checkpoint["blurbtune_resume"])
    rng = dict(resume["rng"])
    generator = checkpoint["blurbtune_generators"][k]
    if device_type == "cuda":
        rng["cuda"] = [generator]
    else:
        rng["torch"] = generator
    resume["rng"] = rng
    out["blurbtune_resume"] = resume
    return out


def merge_checkpoints(checkpoints: list[dict], stacked: set[str], device_type: str) -> dict:
    """A stack's checkpoint from its members' (as `slice_checkpoint` wrote them)."""
    first = checkpoints[0]
    out = {key: value for key, value in first.items() if key != "blurbtune"}
    out["state_dict"] = {
        key: (torch.stack([c["state_dict"][key] for c in checkpoints])
              if key.removeprefix("model.") in stacked else t)
        for key, t in first["state_dict"].items()}
    out["optimizer_states"] = [
        {**state, "state": {i: {name: (torch.stack([c["optimizer_states"][j]["state"][i][name]
                                                    for c in checkpoints])
                                       if torch.is_tensor(v) and v.dim() else v)
                                for name, v in per_param.items()}
                            for i, per_param in state["state"].items()}}
        for j, state in enumerate(first["optimizer_states"])]
    out["blurbtune_members"] = [c["blurbtune"] for c in checkpoints]
    rngs = [c["blurbtune_resume"]["rng"] for c in checkpoints]
    out["blurbtune_generators"] = [r["cuda"][0] if device_type == "cuda" else r["torch"]
                                   for r in rngs]
    return out


# --- the files ------------------------------------------------------------------------------


def write_atomic(obj: Any, path: Path) -> None:
    """`torch.save` to a temporary file, then a rename: the file is whole or absent.

    Without the zip format's CRC-32 of each tensor: `torch.load` never checks it, and
    computing it took a quarter of a stack's stop's write (1.8 of 7.9 s for 3.6 GB, 2 cores).
    Not fsynced: a stopped process's file is in the page cache when it exits (what a node
    failure just after would lose, fsync would keep, at the disk's speed instead)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        # torch's zip writer says a full disk as a RuntimeError
        with writing(path), serialization.config.patch({"save.compute_crc32": False}):
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written file left to keep it full
        tmp.unlink(missing_ok=True)
        raise


class RunCheckpointIO(CheckpointIO):
    """Lightning's checkpoint writer and reader for a run or a stack: Lightning saves and loads
    one checkpoint; on disk it is each run's own `last.ckpt` and best weights in its folder
    (see the module's docstring), so a member resumes alone or in a stack, and a finished
    member's folder holds nothing of the others.

    `frozen()` gives the frozen tensors as the model holds them (state_dict keys);
    `background` says whether `save_checkpoint` returns once the state is copied (the write
    goes on in a thread; `wait` ends it) or once it is written.
    """

    def __init__(self, folders: list[Path], stacked: set[str] | None, alive: Callable,
                 frozen: Callable[[], dict[str, torch.Tensor]],
                 device_type: str = "cpu") -> None:
        self.folders, self.stacked, self.alive = [Path(f) for f in folders], stacked, alive
        self.frozen, self.device_type = frozen, device_type
        self.background = False
        self.write_seconds: float | None = None  # how long the latest write took, copy included
        self._digests: dict[tuple, str] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    # Lightning's interface

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        self.wait()  # one write at a time: at most one copy of the state besides the model
        if Path(path) != self.folders[0] / FOLDER / LAST and self.stacked is None:
            write_atomic(checkpoint, Path(path))  # a user's own (ModelCheckpoint): as it is
            return
        start = time.perf_counter()
        files = self.member_files(checkpoint, copy=self.background)
        if not self.background:
            for folder, last, best in files:  # one member's copy in memory at a time
                self._write(folder, last, best)
            self.write_seconds = time.perf_counter() - start
            return
        copied = list(files)  # the copy to host memory, before training moves on
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")

        def write() -> None:
            for folder, last, best in copied:
                self._write(folder, last, best)
            self.write_seconds = time.perf_counter() - start

        self._pending = self._executor.submit(write)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        self.wait()
        if Path(path) != self.folders[0] / FOLDER / LAST:
            return load(Path(path))  # a user's own checkpoint
        frozen = self.frozen()
        checkpoints = [self._read(folder, k, self._member(frozen, k))
                       for k, folder in enumerate(self.folders)]
        merged = (checkpoints[0] if self.stacked is None
                  else merge_checkpoints(checkpoints, self.stacked, self.device_type))
        merged["state_dict"] = {**frozen, **merged["state_dict"]}
        return merged

    def remove_checkpoint(self, path: Any) -> None:
        self.wait()
        for folder in self.folders:
            remove(folder)

    def teardown(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def wait(self) -> None:
        """Wait for the write in flight, if any; its error, if it failed, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    # the files of each run

    def member_files(self, checkpoint: dict, copy: bool = True
                     ) -> Iterator[tuple[Path, dict, dict | None]]:
        """Per run: (folder, its `last.ckpt`, its best weights when they are not on disk yet),
        every tensor its own host copy (`copy`; else its own elements, see `alias`), frozen
        tensors left out."""
        frozen = self.frozen()
        members = [0] if self.stacked is None else self.alive()
        for k in members:  # a diverged member's result is final: nothing to resume
            record = {"names": sorted(frozen),
                      "sha256": self._frozen_digest(k, self._member(frozen, k))}
            member = (checkpoint if self.stacked is None
                      else slice_checkpoint(checkpoint, self.stacked, k, self.device_type))
            own_state = dict(member["blurbtune"])
            best = own_state.pop("best_state", None)
            step = own_state["best_step"]
            own_state["best_file"] = BEST.format(step=step) if best is not None else None
            last = {**member, "blurbtune": own_state, "blurbtune_frozen": record,
                    "state_dict": {key: t for key, t in member["state_dict"].items()
                                   if key not in frozen}}
            last = apply_to_collection(last, torch.Tensor, own if copy else alias)
            # The previous write has ended (`wait`): the folder says what is on disk.
            new_best = None
            if best is not None and not (
                    self.folders[k] / FOLDER / own_state["best_file"]).is_file():
                new_best = {name: t for name, t in best.items() if f"model.{name}" not in frozen}
            yield self.folders[k], last, new_best

    def _member(self, frozen: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
        """Member k's frozen tensors (a frozen tensor that differs between members, such as
        the random weights of a model built in code, is stacked)."""
        if self.stacked is None:
            return frozen
        return {n: t[k] if n.removeprefix("model.") in self.stacked else t
                for n, t in frozen.items()}

    def _frozen_digest(self, k: int, frozen: dict[str, torch.Tensor]) -> str:
        key = (k, *((name, t.data_ptr()) for name, t in sorted(frozen.items())))
        if key not in self._digests:  # frozen tensors never change: hashed once
            self._digests[key] = tensors_sha256(frozen)
        return self._digests[key]

    @staticmethod
    def _write(folder: Path, last: dict, best: dict | None) -> None:
        target = folder / FOLDER
        name = last["blurbtune"]["best_file"]
        if best is not None:
            write_atomic(best, target / name)
        write_atomic(last, target / LAST)  # last: it names the best file written before it
        for old in target.glob(BEST.format(step="*")):
            if old.name != name:
                old.unlink(missing_ok=True)

    def _read(self, folder: Path, k: int, frozen: dict[str, torch.Tensor]) -> dict:
        path = folder / FOLDER / LAST
        checkpoint = load(path)
        record = checkpoint.pop("blurbtune_frozen", None)
        if record is not None:
            now = self._frozen_digest(k, frozen)
            if record["names"] != sorted(frozen) or record["sha256"] != now:
                raise FrozenMismatch(
                    f"{path}: its frozen weights (sha256 {record['sha256'][:12]}) are not the "
                    f"model's as built now from its pretrained weights (sha256 {now[:12]}); "
                    "resume needs the pretrained model the run started from")
        state = checkpoint["blurbtune"]
        name = state.pop("best_file", None)
        if name is not None:
            state["best_state"] = {**{key.removeprefix("model."): t for key, t in frozen.items()},
                                   **load(folder / FOLDER / name)}
        return checkpoint


def frozen_state(module: Any) -> dict[str, torch.Tensor]:
    """A FineTuner's frozen tensors (state_dict keys): the parameters that do not train."""
    return {f"model.{name}": p.detach() for name, p in module.model.named_parameters()
            if not p.requires_grad}


def best_file(checkpoint_path: Path, checkpoint: dict) -> Path | None:
    """The best-weights file `checkpoint_path` names (None: none, or an older checkpoint that
    holds its best weights itself)."""
    name = checkpoint.get("blurbtune", {}).get("best_file")
    return checkpoint_path.parent / name if name else None


def remove(run_dir: Path) -> None:
    import shutil

    shutil.rmtree(Path(run_dir) / FOLDER, ignore_errors=True)

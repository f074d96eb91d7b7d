"""The weights a stack of K members holds, against K separate copies, per stabilizer.

A stack shares every tensor that is frozen and equal in all members (the pretrained base
under `lora` and `bitfit`, the embeddings and lower layers under `freeze_lower`) instead of
holding it K times; the rest is stacked. Counted in bytes of parameters (MiniLM, real
weights, BIOSSES head); optimizer state exists only for the trainable part either way.

    python benchmarks/bench_stack_memory.py --members 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from blurbtune import stacking  # noqa: E402
from blurbtune.config import compose  # noqa: E402
from blurbtune.models import load_model, load_tokenizer  # noqa: E402
from blurbtune.stabilizer_config import apply_stabilizers, resolve  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--members", type=int, default=10)
parser.add_argument("--model", default="minilm")
K = parser.parse_args().members
print(f"| stabilizer | weights held by a stack of {K} (MiB) | {K} copies (MiB) | ratio | "
      "trainable a member |")
print("|---|---|---|---|---|")
for stab in ("none", "freeze_lower", "lora", "bitfit"):
    cfg = compose([f"model={parser.parse_args().model}", "task=biosses", f"stabilizer={stab}"])
    tok = load_tokenizer(cfg.model, cfg.task)
    models = []
    for k in range(K):
        torch.manual_seed(k)
        m = load_model(cfg.model, cfg.task, tok)
        applied = resolve(cfg.stabilizer, m, "similarity", 64)
        apply_stabilizers(m, applied["sections"], 1e-4, 0.01, k)
        models.append(m)
    single = sum(p.numel() * p.element_size() for p in models[0].parameters())
    sk, stacked = stacking.stack_models(models)
    held = sum(p.numel() * p.element_size() for p in sk.parameters())
    trainable = sum(p.numel() for p in sk.parameters() if p.requires_grad)
    print(f"| {stab} | {held / 2**20:.1f} | {K * single / 2**20:.1f} | "
          f"{held / (K * single):.3f} | {trainable / K:,.0f} |")

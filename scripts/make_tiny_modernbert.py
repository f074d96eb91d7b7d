"""Save a tiny random ModernBERT, laid out as the hub's ModernBERT checkpoints are (a masked-LM
model: `model.*`, `head.*`, `decoder.*`) with blurbtune's tiny tokenizer, to a folder.

    python scripts/make_tiny_modernbert.py /tmp/tiny-modernbert
    python train.py model=modernbert_base model.name_or_path=/tmp/tiny-modernbert task=biosses

For trying the ModernBERT model configs without network; its weights are random.
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer, ModernBertConfig, ModernBertForMaskedLM

from blurbtune.config import compose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_cfg = compose(["model=tiny_modernbert"]).model
    tokenizer = AutoTokenizer.from_pretrained(
        str(model_cfg.tokenizer), **OmegaConf.to_container(model_cfg.tokenizer_kwargs))
    spec = OmegaConf.to_container(model_cfg.config, resolve=True)
    spec.pop("model_type")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    config = ModernBertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                              cls_token_id=cls, sep_token_id=sep, bos_token_id=cls,
                              eos_token_id=sep, **spec)
    torch.manual_seed(args.seed)
    ModernBertForMaskedLM(config).save_pretrained(args.folder)
    tokenizer.save_pretrained(args.folder)
    print(f"tiny ModernBERT ({config.num_hidden_layers} layers) saved to {args.folder}")


if __name__ == "__main__":
    main()

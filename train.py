"""Fine-tune a biomedical encoder on a BLURB task: `python train.py model=... task=...`."""

from blurbtune.train import main

if __name__ == "__main__":
    main()

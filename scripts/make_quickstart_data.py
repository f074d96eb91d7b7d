"""Cut the NCBI-disease excerpt shipped in src/blurbtune/data/quickstart/ from a BLURB copy.

Takes, from each split of BLURB's NCBI-disease folder, the first N sentences in file order
that have at most MAX_WORDS words (longer sentences are skipped), and writes them unchanged:
the same `token<TAB>tag` lines, one blank line after each sentence.

    python scripts/make_quickstart_data.py /path/to/blurb/data/NCBI-disease
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIZES = {"train": 600, "dev": 150, "test": 150}
MAX_WORDS = 60
DEST = Path(__file__).resolve().parents[1] / "src" / "blurbtune" / "data" / "quickstart"


def sentences(text: str) -> list[list[str]]:
    out, cur = [], []
    for line in text.split("\n"):
        if line.strip() == "" or line.startswith("-DOCSTART-"):
            if cur:
                out.append(cur)
                cur = []
        else:
            cur.append(line)
    if cur:
        out.append(cur)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ncbi_dir", type=Path, help="BLURB's NCBI-disease folder")
    args = ap.parse_args()
    dest = DEST / "NCBI-disease"
    dest.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, n in SIZES.items():
        src = args.ncbi_dir / f"{split}.tsv"
        if split == "dev" and not src.exists():
            src = args.ncbi_dir / "devel.tsv"
        sents = sentences(src.read_text(encoding="utf-8"))
        kept, skipped, last = [], 0, 0
        for i, s in enumerate(sents):
            if len(kept) == n:
                break
            if len(s) > MAX_WORDS:
                skipped += 1
                continue
            kept.append(s)
            last = i + 1
        with open(dest / f"{split}.tsv", "w", encoding="utf-8", newline="\n") as f:
            for s in kept:
                f.write("\n".join(s) + "\n\n")
        tags = [line.split("\t")[1] for s in kept for line in s]
        stats[split] = {
            "sentences": len(kept),
            "words": len(tags),
            "mentions": sum(t == "B-Disease" for t in tags),
            "source_sentences_spanned": last,
            "skipped_over_max_words": skipped,
        }
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()

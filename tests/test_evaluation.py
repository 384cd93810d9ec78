"""The held-out loss against transformers' own causal-LM loss, one row at a time, by hand."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfalign.stages.models.evaluation import mean_nll
from selfalign.stages.text.sft_data import Example, split_rendering

ROWS = [Example("Repeat the word stone.", "stone"),
        Example("Name three colours.", "Red, green and blue are three colours that people name first."),
        Example("Say hello.", "Hello there, it is nice to meet you today."),
        Example("Summarise this: " + "words " * 40, "Many words.")]  # a prompt longer than the limit
LIMIT = 48  # prompts render to 27-30 tokens here: two answers are cut, one fits


def by_hand(model, tokenizer, example: Example) -> tuple[float, int] | None:
    """(summed NLL, supervised tokens) of one row, alone and unpadded, from the model's own loss."""
    prompt, response = split_rendering(tokenizer, example)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"][:LIMIT - len(prompt_ids)]
    if len(prompt_ids) >= LIMIT:
        return None
    ids = torch.tensor([prompt_ids + response_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + response_ids])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss  # mean over the shifted, unmasked labels
    return float(loss) * len(response_ids), len(response_ids)


def test_mean_nll_is_the_token_weighted_loss_of_the_responses_batched_masked_and_cut(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [by_hand(model, tokenizer, example) for example in ROWS]
    assert rows[-1] is None and all(rows[:-1])  # the long prompt leaves no room: it is not measured
    cut = len(tokenizer(split_rendering(tokenizer, ROWS[1])[1], add_special_tokens=False)["input_ids"])
    assert rows[1][1] < cut  # the long answer is cut at the limit, as training cuts it
    expected = sum(nll for nll, _ in rows[:-1]) / sum(tokens for _, tokens in rows[:-1])

    loss = mean_nll(model, tokenizer, ROWS, LIMIT, batch_size=2)  # batches pad the shorter rows

    assert loss.nll == pytest.approx(expected, rel=1e-5)
    assert (loss.items, loss.tokens) == (3, sum(tokens for _, tokens in rows[:-1]))

"""SFT formatting: Alpaca rows checked, chat template applied, prompt tokens masked from the loss."""
import pytest
from transformers import AutoTokenizer

from selfalign.stages.runtime.context import StageError
from selfalign.stages.text.sft_data import (
    IGNORE_INDEX, PLAIN_CHAT_TEMPLATE, Example, encode, encode_all, ensure_chat_template, parse_kept)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def base_tokenizer(tiny_model_dir):
    """The tiny tokenizer as a base model ships it: no chat template, no pad token."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    tok.pad_token = None
    return tok


def supervised_text(tok, feature):
    return tok.decode([t for t, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX])


def test_alpaca_rows_become_examples_with_input_after_the_instruction():
    rows = [(1, {"instruction": "Sum these.", "input": "2 3", "output": "5"}),
            (2, {"instruction": "Say hi.", "input": "", "output": "hi"}),
            (3, {"instruction": "Say bye.", "output": "bye"})]
    assert parse_kept(rows, "kept.jsonl") == [
        Example("Sum these.\n\n2 3", "5"), Example("Say hi.", "hi"), Example("Say bye.", "bye")]


@pytest.mark.parametrize("row, message", [
    ({"instruction": "x"}, "s3://b/kept.jsonl:7: field 'output': missing"),
    ({"instruction": "x", "output": "  "}, "s3://b/kept.jsonl:7: field 'output': expected a non-empty string"),
    ({"instruction": 3, "output": "y"}, "s3://b/kept.jsonl:7: field 'instruction': expected a non-empty string"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "s3://b/kept.jsonl:7: field 'input': expected a string"),
])
def test_a_bad_row_names_file_line_and_field(row, message):
    with pytest.raises(StageError) as err:
        parse_kept([(7, row)], "s3://b/kept.jsonl")
    assert str(err.value).startswith(message)


def test_no_rows_is_an_error_naming_the_file():
    with pytest.raises(StageError, match=r"^s3://b/kept.jsonl: no examples: the kept data is empty$"):
        parse_kept([], "s3://b/kept.jsonl")


def test_prompt_tokens_are_masked_and_the_response_is_supervised(tokenizer):
    feature, cut = encode(tokenizer, Example("Repeat the word stone.", "stone"), 128)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Repeat the word stone."}],
                                           tokenize=False, add_generation_prompt=True)
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert not cut
    assert feature["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert IGNORE_INDEX not in feature["labels"][prompt_len:]
    assert tokenizer.decode(feature["input_ids"][:prompt_len]) == prompt
    # The turn's end (eos) is learned too, so the model learns to stop.
    assert supervised_text(tokenizer, feature) == f"stone{tokenizer.eos_token}\n"
    assert feature["attention_mask"] == [1] * len(feature["input_ids"])


def test_a_base_model_gets_the_plain_template_and_a_pad_token(base_tokenizer):
    assert ensure_chat_template(base_tokenizer) is True
    assert base_tokenizer.chat_template == PLAIN_CHAT_TEMPLATE
    assert base_tokenizer.pad_token == base_tokenizer.eos_token
    feature, _ = encode(base_tokenizer, Example("Say hi.", "hi"), 128)
    text = base_tokenizer.decode(feature["input_ids"])
    assert text == f"<s>### Instruction:\nSay hi.\n\n### Response:\nhi{base_tokenizer.eos_token}\n\n"
    assert supervised_text(base_tokenizer, feature) == f"hi{base_tokenizer.eos_token}\n\n"


def test_a_model_with_a_template_keeps_it(tokenizer):
    template = tokenizer.chat_template
    assert ensure_chat_template(tokenizer) is False
    assert tokenizer.chat_template == template


def test_long_responses_are_cut_and_prompts_without_room_are_dropped(tokenizer):
    short = Example("Say hi.", "hi")
    long = Example("Say hi.", " ".join(["hello"] * 50))
    hopeless = Example(" ".join(["question"] * 80), "yes")
    features, counts = encode_all(tokenizer, [short, long, hopeless], 40, progress=False)
    assert (counts.examples, counts.truncated, counts.dropped) == (2, 1, 1)
    assert max(len(f["input_ids"]) for f in features) == 40
    assert counts.tokens == sum(len(f["input_ids"]) for f in features)
    assert counts.supervised_tokens == sum(sum(x != IGNORE_INDEX for x in f["labels"]) for f in features)


def test_nothing_left_to_learn_is_an_error_naming_the_setting(tokenizer):
    with pytest.raises(StageError, match="spec.train.maxSeqLength"):
        encode_all(tokenizer, [Example(" ".join(["question"] * 80), "yes")], 32, progress=False)

"""Which prompts go through the chat template, how they are rendered, and how labels are read."""
import math
import threading

import pytest
from transformers import AutoTokenizer

from selfalign.stages.runtime import builtin
from selfalign.stages.text import prompting
from selfalign.stages.models.engines import label_weights, native_bf16, render_prompt, resolve_dtype, spellings
from selfalign.stages.text.prompting import JUDGE, RESPONSE, REWRITE, TASKS, uses_chat


@pytest.mark.parametrize("mode, has_template, chat_kinds", [
    ("auto", True, {RESPONSE, JUDGE, REWRITE}),
    ("auto", False, set()),
    ("always", True, {TASKS, RESPONSE, JUDGE, REWRITE}),
    ("always", False, set()),
    ("never", True, set()),
])
def test_each_kind_goes_raw_or_chat_by_the_measured_table_and_the_override(mode, has_template, chat_kinds):
    assert {k for k in (TASKS, RESPONSE, JUDGE, REWRITE) if uses_chat(k, mode, has_template)} == chat_kinds


@pytest.fixture(scope="module")
def tokenizers(smollm2_dir, tiny_model_dir):
    """SmolLM2's real ChatML template; the same tokenizer without one (a base model's)."""
    with_template = AutoTokenizer.from_pretrained(smollm2_dir)
    without = AutoTokenizer.from_pretrained(smollm2_dir)
    without.chat_template = None
    return with_template, without


def test_a_judge_prompt_opens_the_assistant_turn_at_the_score(tokenizers):
    with_template, _ = tokenizers
    text, special = render_prompt(with_template, prompting.build("Rate this.  ", True, "Score:"))
    assert not special
    assert text.endswith("<|im_start|>user\nRate this.<|im_end|>\n<|im_start|>assistant\nScore:")
    assert "You are a helpful assistant." in text
    reply, _ = render_prompt(with_template, prompting.build("Name a river.", True))
    assert reply.endswith("<|im_start|>assistant\n")


def test_a_model_without_a_template_gets_raw_text_for_every_kind(tokenizers):
    _, without = tokenizers
    has_template = bool(without.chat_template)
    for kind in (TASKS, RESPONSE, JUDGE, REWRITE):
        prompt = prompting.build("Rate this: ", uses_chat(kind, "always", has_template), "Score:")
        assert render_prompt(without, prompt) == ("Rate this: ", True)


def test_a_question_judge_ends_at_its_answer_prefix_in_both_forms(tokenizers):
    """AITP's criteria end with a question: raw text gets the prefix as its last line, chat the
    assistant turn, and the prefix is not repeated in the user turn."""
    with_template, without = tokenizers
    raw = prompting.build("Is it clear? Reply with yes or no.\n", False, "Answer:", prefix_raw=True)
    assert render_prompt(without, raw) == ("Is it clear? Reply with yes or no.\nAnswer:", True)
    chat, _ = render_prompt(with_template, prompting.build("Is it clear? Reply with yes or no.", True, "Answer:",
                                                           prefix_raw=True))
    assert chat.endswith("Reply with yes or no.<|im_end|>\n<|im_start|>assistant\nAnswer:")
    assert chat.count("Answer:") == 1


def test_spellings_of_a_label():
    assert spellings("yes") == ["yes", " yes", "Yes", " Yes"]
    assert spellings("7") == ["7", " 7"]


def test_a_labels_probability_sums_its_spellings():
    """Paths from the context: ' '(id 1) then '7'(7) or '8'(8); '7' directly; '8' directly."""
    labelled = [((7,), "7"), ((1, 7), "7"), ((8,), "8"), ((1, 8), "8")]
    logprobs = {(): {7: math.log(0.2), 8: math.log(0.1), 1: math.log(0.6)},
                (1,): {7: math.log(0.5), 8: math.log(0.25)}}
    assert label_weights(["7", "8"], labelled, logprobs) == pytest.approx([0.2 + 0.3, 0.1 + 0.15])


def test_auto_dtype_is_float32_on_a_cpu_that_emulates_bf16():
    assert not native_bf16({"avx", "avx2", "avx512f"})
    assert native_bf16({"avx512f", "avx512_bf16"}) and native_bf16({"amx_bf16"})
    assert resolve_dtype("auto", "auto", on_gpu=False, flags={"avx2"}) == "float32"
    assert resolve_dtype("auto", "auto", on_gpu=False, flags={"avx512_bf16"}) == "bfloat16"
    assert resolve_dtype("auto", "auto", on_gpu=True, flags=set()) == "bfloat16"
    assert resolve_dtype("auto", "float16", on_gpu=True, flags=set()) == "float16"
    assert resolve_dtype("float32", "bfloat16", on_gpu=True, flags=set()) == "float32"


def test_the_builtin_instruct_model_is_a_plain_checkpoint_with_its_chat_template(smollm2_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert not hasattr(config, "quantization_config")
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(smollm2_dir).chat_template
    assert smollm2_dir.name.startswith("smollm2-135m-instruct-")  # content-keyed
    assert builtin.materialize("smollm2-135m-instruct", smollm2_dir.parent.parent) == smollm2_dir


def test_concurrent_builds_of_one_builtin_model_leave_one_whole_copy(tmp_path):
    """Ranks of one node asking at once: each builds privately, one rename wins, none fails."""
    started = threading.Barrier(4)
    builds = []

    def build(out):
        started.wait()
        builds.append(out)
        (out / "weights").write_text(str(out))

    results = []
    threads = [threading.Thread(target=lambda: results.append(builtin.build_once(tmp_path / "m", build)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "m"] * 4 and len(builds) == 4
    assert (tmp_path / "m" / "weights").read_text() in map(str, builds)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no private folder left behind
    builtin.build_once(tmp_path / "m", lambda out: pytest.fail("rebuilt"))

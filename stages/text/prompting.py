"""How each kind of prompt reaches the model: as raw text, or through its chat template.

The choice is per kind, measured on a real instruct model (SmolLM2-135M-Instruct; numbers and
method in docs/architecture.md, `python -m bench.prompt_formats` repeats them):
- TASKS (Self-Instruct's numbered list, I-SHEEP's meta-prompt, the classification check, the
  instance prompts) are few-shot documents that the model continues: raw text. Sent as a chat
  request the same text is answered *about* (the model echoes the list or comments on it).
- RESPONSE, JUDGE and REWRITE (AITP's questions and answers) are requests to an assistant, which is
  what a chat template is for; a model trained by the train stage always has one (sft_data.py).

`spec.model.chat` overrides the measured choice: `always` sends every kind through the template,
`never` sends every kind raw (a base model, as I-SHEEP's round 0). A tokenizer without a template
always gets raw text. A judge prompt carries an answer prefix ("Score:"): in chat form it opens
the assistant turn (continue_final_message), so the next token is the score the assistant gives.
"""
from __future__ import annotations

from typing import Literal

TASKS, RESPONSE, JUDGE, REWRITE = "tasks", "response", "judge", "rewrite"
Kind = Literal["tasks", "response", "judge", "rewrite"]
ChatMode = Literal["auto", "always", "never"]
CHAT_KINDS = frozenset({RESPONSE, JUDGE, REWRITE})  # measured, see the module docstring
SYSTEM_PROMPT = "You are a helpful assistant."  # I-SHEEP's system turn
Prompt = str | list[dict]  # raw text, or a conversation rendered with the model's template


def uses_chat(kind: Kind, mode: ChatMode, has_template: bool) -> bool:
    """Whether a prompt of `kind` goes through the chat template."""
    if not has_template or mode == "never":
        return False
    return mode == "always" or kind in CHAT_KINDS


def build(text: str, chat: bool, answer_prefix: str = "", prefix_raw: bool = False) -> Prompt:
    """Raw: `text` as it is (I-SHEEP's judge wording already ends where the score goes), or with
    `answer_prefix` as its last line when `prefix_raw` (a text that ends with a question). Chat: a
    system and a user turn, then the assistant turn opened by `answer_prefix` when there is one."""
    if not chat:
        return f"{text.rstrip()}\n{answer_prefix}" if prefix_raw else text
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": text.rstrip()}]
    if answer_prefix:
        messages.append({"role": "assistant", "content": answer_prefix})
    return messages

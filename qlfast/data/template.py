"""The QwenLong-L1 prompt template and middle truncation of long documents.

The template is the public recipe's zero-shot DocQA prompt (QwenLong-L1 `eval/*.py`, DocQA-RL-1.6K): the
document inside `<text>` tags, then the question, then the answer-format instruction that the rule reward
parses ("Therefore, the answer is ..."). It is the *user* message; `render_prompt` wraps it in the tokenizer's
chat template when the tokenizer has one.

Middle truncation (LongBench, and the recipe's evaluation scripts): when a document does not fit its token
budget, keep its first ceil(B/2) and last floor(B/2) tokens and drop the middle, because long-document
questions most often depend on the opening (title, abstract) and the closing (conclusion) of the text.
Only the document is truncated; the instruction and question always survive intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROMPT_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n"
    "<text>\n$DOC$\n</text>\n\n"
    "$Q$\n\n"
    'Format your response as follows: "Therefore, the answer is (insert answer here)".'
)
FORMAT_INSTRUCTION = "Format your response as follows:"


def build_user_prompt(document: str, question: str) -> str:
    """The QwenLong-L1 user message for one (document, question) pair."""
    # Split on the placeholders, not str.format (documents are full of braces) nor chained str.replace (a document
    # containing "$Q$" would get the question spliced into it).
    head, rest = PROMPT_TEMPLATE.split("$DOC$")
    mid, tail = rest.split("$Q$")
    return head + document.strip() + mid + question.strip() + tail


def split_user_prompt(prompt: str) -> tuple[str, str] | None:
    """Inverse of `build_user_prompt`: (document, question), or None when `prompt` is not in the template."""
    start, end = prompt.find("<text>"), prompt.rfind("</text>")
    fmt = prompt.rfind(FORMAT_INSTRUCTION)
    if start < 0 or end < start or fmt < end:
        return None
    return prompt[start + len("<text>") : end].strip(), prompt[end + len("</text>") : fmt].strip()


def middle_truncate_ids(ids: list[int], max_tokens: int) -> tuple[list[int], bool]:
    """Keep the first ceil(max_tokens/2) and the last floor(max_tokens/2) ids. Returns (ids, truncated)."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if len(ids) <= max_tokens:
        return list(ids), False
    head = (max_tokens + 1) // 2
    tail = max_tokens - head
    return list(ids[:head]) + (list(ids[len(ids) - tail :]) if tail else []), True


def apply_chat(tokenizer: Any, user_message: str) -> str:
    """The user message through the tokenizer's chat template (with the generation prompt), if it has one."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )
    return user_message


@dataclass
class RenderedPrompt:
    text: str  # the full prompt as given to the engine (chat template applied)
    input_ids: list[int]  # its tokens (no special tokens added beyond the chat template's own)
    truncated: bool  # whether the document was middle-truncated to fit


def render_prompt(
    tokenizer: Any, document: str, question: str, max_prompt_tokens: int | None = None
) -> RenderedPrompt:
    """Render the full prompt; if `max_prompt_tokens` is set, middle-truncate the document so it fits.

    Raises ValueError when even an empty document does not fit (the question and template alone are too long).
    """

    def render(doc: str) -> tuple[str, list[int]]:
        text = apply_chat(tokenizer, build_user_prompt(doc, question))
        return text, tokenizer.encode(text, add_special_tokens=False)

    text, ids = render(document)
    if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
        return RenderedPrompt(text, ids, False)
    overhead = len(render("")[1])
    if overhead > max_prompt_tokens:
        raise ValueError(
            f"prompt without its document is {overhead} tokens, more than max_prompt_tokens={max_prompt_tokens}"
        )
    doc_ids = tokenizer.encode(document.strip(), add_special_tokens=False)
    budget = max(0, max_prompt_tokens - overhead)
    # Re-tokenising decoded text can merge tokens differently at the seams; shrink the budget until it fits.
    for _ in range(8):
        kept, _ = middle_truncate_ids(doc_ids, budget)
        head = (budget + 1) // 2
        text, ids = render(tokenizer.decode(kept[:head]) + tokenizer.decode(kept[head:]))
        if len(ids) <= max_prompt_tokens:
            return RenderedPrompt(text, ids, True)
        budget = max(0, budget - (len(ids) - max_prompt_tokens))
    text, ids = render("")
    return RenderedPrompt(text, ids, True)

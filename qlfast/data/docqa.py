"""DocQA rows: loading (jsonl, parquet), validation, and length binning for the curriculum phases.

Two row schemas load into one `DocQAExample`:

- DocQA-RL (the public QwenLong-L1 / verl parquet): `data_source`, `prompt` (a chat list whose user message is
  the rendered QwenLong-L1 template), `ability`, `reward_model.ground_truth` (a string or a list), `extra_info`.
  The document and question are recovered from the template's `<text>` tags so that the prompt can be re-rendered
  with middle truncation; a prompt not in the template is kept as is.
- plain: `document` or `context`, `question` (or `input`), `answer` or `answers` (string or list),
  `source` or `data_source` (optional), `id` / `_id` (optional).

A malformed row raises ValueError("FILE: row N: field 'F': why") (N is the 1-based line of a jsonl file and the
1-based row of a parquet file), or, with skip_bad=True, is skipped and reported in `LoadResult.skipped`.

Length binning: `bin_examples` tokenises every rendered prompt and assigns it to the phase bins of
`qlfast.rl.curriculum.assign_bins`; prompts longer than every phase are returned in `too_long` and logged,
never silently dropped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from qlfast.data.template import apply_chat, build_user_prompt, split_user_prompt

log = logging.getLogger(__name__)


@dataclass
class DocQAExample:
    uid: str  # unique id (file stem + row when the row has none)
    answers: list[str]  # one or more gold answers; the reward takes the max over them
    source: str = "docqa"  # benchmark / data_source, for per-source metrics
    document: str | None = None
    question: str | None = None
    prompt: str | None = None  # a pre-rendered user message, used as is when document/question are unknown
    extra: dict[str, Any] = field(default_factory=dict)

    def user_prompt(self) -> str:
        """The QwenLong-L1 user message (before the chat template)."""
        if self.document is not None and self.question is not None:
            return build_user_prompt(self.document, self.question)
        assert self.prompt is not None
        return self.prompt


@dataclass
class LoadResult:
    examples: list[DocQAExample]
    skipped: list[str] = field(default_factory=list)  # "FILE: row N: field 'F': why" for each skipped row


class RowError(ValueError):
    pass


def _req_str(row: dict, names: Sequence[str]) -> str:
    for name in names:
        if name in row and row[name] is not None:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise RowError(f"field '{name}': expected a non-empty string, got {type(value).__name__} {value!r:.60}")
            return value
    raise RowError(f"field '{'|'.join(names)}': missing")


def _answers(value: Any, name: str) -> list[str]:
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:  # some exports store the answer list as a JSON string
            decoded = json.loads(value)
            if isinstance(decoded, list):
                value = decoded
        except json.JSONDecodeError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}': expected a string or a non-empty list of strings, got {value!r:.60}")
    out = []
    for a in value:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str) or not a.strip():
            raise RowError(f"field '{name}': expected non-empty strings, got {a!r:.60}")
        out.append(a.strip())
    return out


def parse_row(row: Any, default_uid: str) -> DocQAExample:
    """One row of either schema -> DocQAExample. Raises RowError naming the field."""
    if not isinstance(row, dict):
        raise RowError(f"field '<row>': expected a JSON object, got {type(row).__name__}")
    uid = str(row.get("id", row.get("_id", default_uid)))
    if "prompt" in row and "reward_model" in row:  # DocQA-RL / verl schema
        chat = row["prompt"]
        if hasattr(chat, "tolist"):
            chat = chat.tolist()
        if not isinstance(chat, list) or not chat:
            raise RowError(f"field 'prompt': expected a non-empty chat list, got {chat!r:.60}")
        users = [m for m in chat if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1].get("content"), str) or not users[-1]["content"].strip():
            raise RowError("field 'prompt': no user message with string content")
        rm = row["reward_model"]
        if not isinstance(rm, dict) or rm.get("ground_truth") is None:
            raise RowError("field 'reward_model.ground_truth': missing")
        answers = _answers(rm["ground_truth"], "reward_model.ground_truth")
        content = users[-1]["content"]
        parts = split_user_prompt(content)
        extra = row.get("extra_info") or {}
        extra = dict(extra) if isinstance(extra, dict) else {"extra_info": extra}
        if "ability" in row:
            extra.setdefault("ability", row["ability"])
        return DocQAExample(
            uid=uid,
            answers=answers,
            source=str(row.get("data_source") or "docqa"),
            document=parts[0] if parts else None,
            question=parts[1] if parts else None,
            prompt=None if parts else content,
            extra=extra,
        )
    document = _req_str(row, ("document", "context"))
    question = _req_str(row, ("question", "input"))
    if "answers" in row and row["answers"] is not None:
        answers = _answers(row["answers"], "answers")
    elif "answer" in row and row["answer"] is not None:
        answers = _answers(row["answer"], "answer")
    else:
        raise RowError("field 'answer|answers': missing")
    source = row.get("source", row.get("data_source", "docqa"))
    extra = {k: v for k, v in row.items() if k not in ("document", "context", "question", "input", "answer", "answers")}
    return DocQAExample(uid=uid, answers=answers, source=str(source), document=document, question=question, extra=extra)


def _iter_rows(path: str) -> Iterator[tuple[int, Any]]:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow is the `data` extra
            raise ImportError(f"{path}: reading parquet needs pyarrow (pip install 'qlfast[data]')") from e
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i + 1, row
        return
    # bytes, decoded line by line: a non-UTF-8 byte is then a malformed row (named, skippable), not an error of the file
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, RowError(f"field '<text>': not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, RowError(f"field '<json>': invalid JSON ({e.msg} at column {e.colno})")


def load_docqa(paths: str | Sequence[str], *, skip_bad: bool = False) -> LoadResult:
    """Load DocQA rows from .jsonl / .json (one object per line) / .parquet files, in order."""
    if isinstance(paths, str):
        paths = [paths]
    result = LoadResult(examples=[])
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"DocQA file not found: {path}")
        stem = os.path.splitext(os.path.basename(path))[0]
        for rowno, row in _iter_rows(path):
            try:
                if isinstance(row, RowError):
                    raise row
                result.examples.append(parse_row(row, default_uid=f"{stem}-{rowno}"))
            except RowError as e:
                msg = f"{path}: row {rowno}: {e}"
                if not skip_bad:
                    raise ValueError(msg) from None
                result.skipped.append(msg)
    if result.skipped:
        log.warning("skipped %d malformed DocQA rows; first: %s", len(result.skipped), result.skipped[0])
    return result


def prompt_length(example: DocQAExample, tokenizer: Any) -> int:
    """Tokens in the full rendered prompt (chat template included)."""
    return len(tokenizer.encode(apply_chat(tokenizer, example.user_prompt()), add_special_tokens=False))


def bin_examples(examples: Sequence[DocQAExample], tokenizer: Any, max_prompt_tokens: Sequence[int], *,
                 cumulative: bool = False):
    """Bin examples by tokenised prompt length for the phases' max prompt tokens (see curriculum.assign_bins).

    Returns a `qlfast.rl.curriculum.LengthBins` of example indices; too-long prompts are logged as a warning.
    """
    from qlfast.rl.curriculum import assign_bins

    lengths = [prompt_length(ex, tokenizer) for ex in examples]
    bins = assign_bins(lengths, max_prompt_tokens, cumulative=cumulative)
    if bins.too_long:
        log.warning(bins.report())
    return bins

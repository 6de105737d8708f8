"""`python -m qlfast.eval`: long-document QA evaluation with avg@k and pass@k, scored like training.

    python -m qlfast.eval --model runs/tiny/final --data synthetic:240 --n 4 --out runs/tiny/eval
    python -m qlfast.eval --model DIR --data docmath.jsonl frames.jsonl --judge http://127.0.0.1:8000/v1

Generation goes through the rollout engine (vLLM); documents longer than the input budget are middle-truncated (as
the public recipe does) and counted. Scoring is the trainer's hybrid reward (rule; the judge when the rule says no;
max of the two). Per benchmark and overall: avg@k, unbiased pass@k for every k <= n, response-length statistics,
the share of answers with no extractable "the answer is". Every sample is appended to <out>/samples.jsonl as soon as
its batch is scored, so an interrupted run resumes where it stopped; <out>/results.json and a markdown table
(benchmarks as columns, Avg last) are written at the end. The trainer's held-out evaluation calls `evaluate`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from qlfast import metrics
from qlfast.reward.hybrid import HybridReward
from qlfast.reward.judge import HTTPBackend, LLMJudge


def build_reward(judge: str = "none", judge_model: str = "", timeout: float = 30.0, retries: int = 3,
                 judge_max_tokens: int = 16) -> HybridReward:
    """none | http(s)://host/v1 (OpenAI-compatible) | a model directory (second in-process vLLM engine)."""
    if not judge or judge == "none":
        return HybridReward(None)
    if judge.startswith(("http://", "https://")):
        return HybridReward(LLMJudge(HTTPBackend(judge, judge_model or "judge", timeout=timeout, max_retries=retries)))
    if not os.path.isdir(judge):
        raise ValueError(f"--judge {judge!r}: expected 'none', an http(s) URL or a model directory")
    from qlfast.reward.judge import EngineBackend, chat_renderer
    from qlfast.rollout.engine import EngineConfig, RolloutEngine, SamplingConfig

    engine = RolloutEngine(judge, EngineConfig(gpu_memory_utilization=0.15))
    tok = engine.llm.get_tokenizer()

    class _Texts:  # generate(prompts) -> texts, the interface EngineBackend expects
        def generate(self, prompts: Sequence[str]) -> list[str]:
            groups = engine.generate(list(prompts), 1, SamplingConfig(temperature=0.0, max_tokens=judge_max_tokens))
            return [tok.decode(list(g[0].token_ids), skip_special_tokens=True) for g in groups]

    return HybridReward(LLMJudge(EngineBackend(_Texts(), render=chat_renderer(tok))))


def evaluate(engine, tokenizer, examples, prompt_ids: Sequence[Sequence[int]], reward: HybridReward, *, n: int = 1,
             temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
             batch_prompts: int = 64, samples_path: str | Path | None = None, progress: bool = False) -> list[dict]:
    """Generate n responses per example and score them; returns one row per sample. With samples_path, rows already
    there (same prompt id and sample index) are reused and new rows are appended batch by batch."""
    from qlfast.rollout.engine import SamplingConfig

    done: dict[tuple[str, int], dict] = {}
    if samples_path is not None and Path(samples_path).exists():
        for line in Path(samples_path).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["id"], r["sample"])] = r
    todo = [i for i, ex in enumerate(examples) if any((ex.uid, s) not in done for s in range(n))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="eval", unit="q", dynamic_ncols=True)
    sampling = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed,
                              stop_token_ids=(tokenizer.eos_token_id,))
    for start in range(0, len(todo), batch_prompts):
        chunk = todo[start:start + batch_prompts]
        groups = engine.generate([list(prompt_ids[i]) for i in chunk], n=n, sampling=sampling)
        flat = [(i, s, smp) for i, g in zip(chunk, groups) for s, smp in enumerate(g)]
        texts = tokenizer.batch_decode([list(smp.token_ids) for _, _, smp in flat], skip_special_tokens=True)
        details = reward.score(texts, [examples[i].answers for i, _, _ in flat],
                               [examples[i].question or "" for i, _, _ in flat])
        rows = []
        for (i, s, smp), text, d in zip(flat, texts, details):
            ex = examples[i]
            rows.append({"id": ex.uid, "source": ex.source, "sample": s, "response": text, "gold": ex.answers,
                         "pred": d.pred, "rule": d.rule, "judge": d.judge, "score": d.reward,
                         "length": smp.length, "finish": smp.finish_reason})
        if samples_path is not None:
            with open(samples_path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        for r in rows:
            done[(r["id"], r["sample"])] = r
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [done[(ex.uid, s)] for ex in examples for s in range(n)]


def summarize(rows: list[dict], n: int) -> dict:
    """Per source and overall ('all'): avg@k, pass@k for k = 1..n, length stats, share with no answer."""
    by_src: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_src[r["source"]][r["id"]].append(r)
    out = {}
    everything = {f"{s}/{i}": v for s, d in by_src.items() for i, v in d.items()}
    for name, groups in [*sorted(by_src.items()), ("all", everything)]:
        scores = [[x["score"] for x in sorted(g, key=lambda x: x["sample"])] for g in groups.values()]
        flat = [x for g in groups.values() for x in g]
        out[name] = {
            "questions": len(scores), f"avg@{n}": metrics.avg_at_k(scores),
            "pass@k": metrics.pass_at_k_all(scores), "length": metrics.length_stats([x["length"] for x in flat]),
            "no_answer": sum(x["pred"] is None for x in flat) / max(1, len(flat)),
        }
    return out


def markdown_table(summary: dict, n: int) -> str:
    names = [k for k in summary if k != "all"]
    head = "| metric | " + " | ".join(names) + " | Avg |"
    sep = "|---" * (len(names) + 2) + "|"
    lines = [head, sep]
    avg = sum(summary[k][f"avg@{n}"] for k in names) / max(1, len(names))
    lines.append(f"| avg@{n} | " + " | ".join(f"{100 * summary[k][f'avg@{n}']:.1f}" for k in names) +
                 f" | {100 * avg:.1f} |")
    for k in sorted({k for v in summary.values() for k in v["pass@k"]}):
        vals = [summary[s]["pass@k"][k] for s in names]
        lines.append(f"| pass@{k} | " + " | ".join(f"{100 * v:.1f}" for v in vals) +
                     f" | {100 * sum(vals) / max(1, len(vals)):.1f} |")
    lines.append("| no answer % | " + " | ".join(f"{100 * summary[s]['no_answer']:.1f}" for s in names) +
                 f" | {100 * summary['all']['no_answer']:.1f} |")
    return "\n".join(lines)


def _load_examples(specs: Sequence[str], tokenizer, seed: int):
    from qlfast.data import docqa, synthetic

    examples = []
    for spec in specs:
        if spec.startswith("synthetic:"):
            parts = spec.split(":")
            length = int(parts[1])
            count = int(parts[2]) if len(parts) > 2 else 200
            cfg = synthetic.SyntheticConfig(doc_tokens=(int(length * 0.8), length))
            examples += synthetic.generate_synthetic(count, seed=seed + 7919, cfg=cfg)
        else:
            examples += docqa.load_docqa([spec]).examples
    return examples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qlfast.eval", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="model directory (HF layout, with tokenizer)")
    p.add_argument("--data", nargs="+", required=True, help="jsonl / parquet files, or synthetic:<length>[:<count>]")
    p.add_argument("--n", type=int, default=4, help="samples per question")
    p.add_argument("--max-input-tokens", type=int, default=120000)
    p.add_argument("--max-new-tokens", type=int, default=10000)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--judge", default="none", help="none | http(s)://host/v1 | judge model directory")
    p.add_argument("--judge-model", default="", help="model name sent to an HTTP judge")
    p.add_argument("--out", default=None, help="output directory (default: <model>/eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-kv-cache-gib", type=int, default=1)
    args = p.parse_args(argv)

    from qlfast.data import tokenizer as tok
    from qlfast.data.template import render_prompt
    from qlfast.rollout.engine import EngineConfig, RolloutEngine

    if not os.path.isdir(args.model):
        p.error(f"--model {args.model!r} is not a directory")
    out = Path(args.out or os.path.join(args.model, "eval"))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tok.load_tokenizer(args.model)
    examples = _load_examples(args.data, tokenizer, args.seed)
    prompt_ids, truncated = [], 0
    for ex in examples:
        if ex.document is not None and ex.question is not None:
            rp = render_prompt(tokenizer, ex.document, ex.question, args.max_input_tokens)
            prompt_ids.append(rp.input_ids)
            truncated += rp.truncated
        else:
            from qlfast.data.template import apply_chat

            prompt_ids.append(tokenizer.encode(apply_chat(tokenizer, ex.user_prompt()), add_special_tokens=False))
    print(f"qlfast.eval: {len(examples)} questions from {', '.join(args.data)}; {truncated} document(s) "
          f"middle-truncated to {args.max_input_tokens} input tokens", file=sys.stderr)
    max_len = max(len(x) for x in prompt_ids) + args.max_new_tokens + 8
    engine = RolloutEngine(args.model, EngineConfig(max_model_len=max_len, cpu_kv_cache_gib=args.cpu_kv_cache_gib,
                                                    seed=args.seed))
    reward = build_reward(args.judge, args.judge_model)
    rows = evaluate(engine, tokenizer, examples, prompt_ids, reward, n=args.n, temperature=args.temperature,
                    top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    samples_path=out / "samples.jsonl", progress=True)
    summary = summarize(rows, args.n)
    table = markdown_table(summary, args.n)
    result = {"model": args.model, "data": args.data, "n": args.n, "truncated_documents": truncated,
              "reward_stats": reward.stats, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"qlfast.eval: samples in {out / 'samples.jsonl'}, results in {out / 'results.json'}")
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The end-of-run report: runs/<name>/report.png (what an RL user looks at first, phase boundaries marked: rollout
reward and accuracy, held-out accuracy after SFT and after each phase, response length, entropy, clipping and grad
norm, time per stage) and report.md with the held-out numbers as a table."""

from __future__ import annotations

from pathlib import Path


def phase_line(rows: list[dict], phase: int) -> str:
    """One line summing up a finished curriculum phase from its metrics rows: steps, wall time, rollout accuracy at
    its start and end, response length, and the share of time spent generating."""
    mine = [r for r in rows if r.get("phase") == phase]
    if not mine:
        return f"phase {phase + 1}: no steps"
    seconds = sum(r.get("time_step", 0.0) for r in mine)
    gen = sum(r.get("time_rollout_reward", 0.0) for r in mine)
    head, tail = mine[: max(1, len(mine) // 5)], mine[-max(1, len(mine) // 5):]

    def mean(rs, k):
        return sum(r.get(k, 0.0) for r in rs) / len(rs)

    share = 100 * gen / max(seconds, 1e-9)
    first, last = 100 * mean(head, "accuracy"), 100 * mean(tail, "accuracy")
    return (f"phase {phase + 1} done: {len(mine)} steps in {seconds / 60:.1f} min ({share:.0f}% rollout + reward); "
            f"rollout accuracy {first:.1f}% -> {last:.1f}% (first / last fifth), response "
            f"{mean(tail, 'response_len_mean'):.0f} tokens")


def _series(rows: list[dict], key: str) -> list[float]:
    return [float(r.get(key, float("nan"))) for r in rows]


def figure(rows: list[dict], evals: list[dict]):
    """rows: per-RL-step metrics.jsonl rows; evals: {"stage", "step", "accuracy", "n", "samples"}. One glance, six
    panels: rollout reward and accuracy (labelled "rule" when no judge ran), held-out avg@k and greedy, response
    length (and the share cut at the limit), entropy, clip fractions and grad norm, seconds per stage of a step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    (ax_r, ax_e, ax_len), (ax_ent, ax_clip, ax_t) = axes
    judged = sum(r.get("judge_calls", 0) for r in rows) > 0
    if rows:
        ax_r.plot(steps, _series(rows, "reward_mean"), label="reward (shaped)")
        ax_r.plot(steps, _series(rows, "accuracy"), label=f"accuracy ({'rule+judge' if judged else 'rule'})")
        ax_len.plot(steps, _series(rows, "response_len_mean"), color="C4", label="mean response tokens")
        cut = ax_len.twinx()
        cut.plot(steps, _series(rows, "truncated_frac"), color="C5", lw=1, label="share cut at the limit")
        cut.set_ylim(-0.05, 1.05)
        ax_len.legend(loc="upper left", fontsize=8)
        cut.legend(loc="upper right", fontsize=8)
        ax_ent.plot(steps, _series(rows, "entropy_mean"), color="C6")
        for key, label in (("clip_frac_low", "clipped low"), ("clip_frac_high", "clipped high")):
            ax_clip.plot(steps, _series(rows, key), label=label)
        gn = ax_clip.twinx()
        gn.plot(steps, _series(rows, "grad_norm"), color="C3", lw=1, label="grad norm (right)")
        ax_clip.legend(loc="upper left", fontsize=8)
        gn.legend(loc="upper right", fontsize=8)
        bottom = [0.0] * len(rows)
        for key, label in (("time_rollout_reward", "rollout + reward"), ("time_train", "train"),
                           ("time_sync", "weight sync")):
            ys = [v if v == v else 0.0 for v in _series(rows, key)]
            ax_t.bar(steps, ys, bottom=bottom, width=1.0, label=label)
            bottom = [b + y for b, y in zip(bottom, ys)]
        ax_t.legend(loc="upper left", fontsize=8)
        last_phase = rows[0].get("phase")
        for r in rows[1:]:
            if r.get("phase") != last_phase:
                for ax in axes.flat:
                    ax.axvline(r["step"] - 0.5, color="grey", ls="--", lw=1)
                last_phase = r.get("phase")
    ax_r.set_title("training rollouts")
    ax_r.legend(loc="lower right", fontsize=8)
    ax_r.set_ylim(-0.05, 1.05)
    ax_len.set_title("responses")
    ax_ent.set_title("token entropy")
    ax_clip.set_title("clip fractions, grad norm")
    ax_t.set_title("seconds per step")
    for ax in axes.flat:
        ax.set_xlabel("RL step")
    if evals:
        k = evals[-1].get("samples", 1)
        xs = [e["step"] for e in evals]
        ys = [e["accuracy"] for e in evals]
        ax_e.plot(xs, ys, "o-", color="C2", label=f"avg@{k}, sampled")
        if all("greedy_accuracy" in e for e in evals):
            ax_e.plot(xs, [e["greedy_accuracy"] for e in evals], "s--", color="C3", label="greedy")
        ax_e.legend(loc="lower right", fontsize=8)
        for e in evals:
            ax_e.annotate(f'{e["stage"]}\n{100 * e["accuracy"]:.1f}%', (e["step"], e["accuracy"]),
                          textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ax_e.set_title(f"held-out accuracy ({evals[-1].get('n', '?')} questions, k={k}, "
                       f"{'rule+judge' if judged else 'rule'})")
    ax_e.set_xlabel("RL step (0 = after SFT)")
    ax_e.set_ylim(-0.05, 1.1)
    fig.tight_layout()
    return fig


def write_report(run_dir: str | Path, rows: list[dict], evals: list[dict]) -> Path:
    """report.png (`figure`) and report.md in run_dir; returns the png's path."""
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    fig = figure(rows, evals)
    out = run_dir / "report.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    lines = ["| stage | RL step | held-out accuracy (avg@k, sampled) | greedy accuracy | questions | k |",
             "|---|---|---|---|---|---|"]
    for e in evals:
        greedy = 100 * e.get("greedy_accuracy", float("nan"))
        lines.append(f"| {e['stage']} | {e['step']} | {100 * e['accuracy']:.1f}% | {greedy:.1f}% | {e.get('n', '')} "
                     f"| {e.get('samples', 1)} |")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return out

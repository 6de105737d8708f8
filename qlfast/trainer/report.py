"""The end-of-run report: runs/<name>/report.png with reward and accuracy per step, phase boundaries marked, and the
held-out accuracy after SFT and after each phase; plus report.md with the same numbers as a table."""

from __future__ import annotations

from pathlib import Path


def write_report(run_dir: str | Path, rows: list[dict], evals: list[dict]) -> Path:
    """rows: per-RL-step metrics (step, phase, reward_mean, accuracy); evals: {"stage", "step", "accuracy", "n"}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    if rows:
        ax1.plot(steps, [r.get("reward_mean", float("nan")) for r in rows], label="reward (shaped)")
        ax1.plot(steps, [r.get("accuracy", float("nan")) for r in rows], label="accuracy (rule+judge)")
        last_phase = rows[0].get("phase")
        for r in rows[1:]:
            if r.get("phase") != last_phase:
                for ax in (ax1, ax2):
                    ax.axvline(r["step"] - 0.5, color="grey", ls="--", lw=1)
                last_phase = r.get("phase")
    ax1.set_xlabel("RL step")
    ax1.set_title("training rollouts")
    ax1.legend(loc="lower right")
    ax1.set_ylim(-0.05, 1.05)
    if evals:
        xs = [e["step"] for e in evals]
        ys = [e["accuracy"] for e in evals]
        ax2.plot(xs, ys, "o-", color="C2", label="avg@k, sampled")
        if all("greedy_accuracy" in e for e in evals):
            ax2.plot(xs, [e["greedy_accuracy"] for e in evals], "s--", color="C3", label="greedy")
        ax2.legend(loc="lower right")
        for e in evals:
            ax2.annotate(f'{e["stage"]}\n{100 * e["accuracy"]:.1f}%', (e["step"], e["accuracy"]),
                         textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
        ax2.set_title(f"held-out accuracy (n={evals[-1].get('n', '?')})")
    ax2.set_xlabel("RL step (0 = after SFT)")
    ax2.set_ylim(-0.05, 1.1)
    fig.tight_layout()
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

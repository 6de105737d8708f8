"""scripts/gpu_proof.sh: its plan fits the GPU window, and the CPU rehearsal of both calls runs every stage end to end
and leaves rows that carry what the GPU rows must (commit, versions, the backend that ran, the autotune config).

The rehearsal (QLFAST_PROOF_CPU=1) is the same script and the same Python stages at tiny sizes: a stage broken on CPU
is found here, not in the 15 minutes of a lent GPU. A third run with a short deadline shows that a stage cut by its
timeout fails the call while the rows of the stages before it stay.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_proof.sh"
STAGES = {"1": ["env", "build", "warm", "csrc", "kernels", "linear_logprob"],
          "2": ["env", "warm", "attention", "rl_update"]}


def _run(call: str, out: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "QLFAST_PROOF_CPU": "1", "OUT": str(out), "PY": sys.executable,
            "TRITON_CACHE_DIR": str(out / "triton-cache"), "QLFAST_COMMIT": "test-commit", **env}
    full.pop("TRITON_INTERPRET", None)  # each stage decides (the warm stage compiles, the others interpret)
    return subprocess.run(["bash", str(SCRIPT), call], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=900)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]


def test_plan_fits_the_window():
    proc = subprocess.run(["bash", str(SCRIPT), "--plan"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    m = re.fullmatch(r"total: (\d+) s", lines[-1])
    assert m and int(m.group(1)) <= 720, lines[-1]
    for call, names in STAGES.items():
        for name in names:
            assert any(re.match(rf"{call}\s+{name}\s+\d+\s+\d+\s", ln) for ln in lines), f"no plan line {call} {name}"
    budgets = [int(ln.split()[2]) for ln in lines[1:] if re.match(r"[012]\s", ln)]
    assert sum(budgets) == int(m.group(1))  # the total is the sum of the lines
    assert subprocess.run(["bash", str(SCRIPT), "3"], capture_output=True, timeout=60).returncode == 2


REHEARSAL = pytest.mark.skipif(torch.cuda.is_available(),
                               reason="the rehearsal is the CPU path; on a GPU run scripts/gpu_proof.sh itself")


@pytest.mark.slow
@REHEARSAL
@pytest.mark.parametrize("call", ["1", "2"])
def test_cpu_rehearsal(call, tmp_path):
    proc = _run(call, tmp_path)
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{json.dumps(logs, indent=1)[:8000]}"
    files = [p for p in tmp_path.iterdir() if p.is_file()]
    assert len(files) <= 8, f"the device tool returns at most 8 files: {sorted(p.name for p in files)}"
    status = [ln.split("\t") for ln in (tmp_path / "status.tsv").read_text().splitlines()]
    assert sorted(s[1] for s in status) == sorted(STAGES[call]), status  # (call 1's warm runs beside the build)
    assert all(s[2] == "0" and s[5] == "ok" for s in status), status
    rows = _rows(tmp_path)
    for r in rows:
        assert r["commit"] == "test-commit", r
    measured = [r for r in rows if r["op"] not in ("stage",)]
    for r in measured:
        for key in ("torch", "triton", "driver", "device", "date", "op", "provider"):
            assert key in r, (key, r)
        assert r["small"] is True and r["call"] == call
    by_op = {}
    for r in measured:
        by_op.setdefault(r["op"], []).append(r)
    assert {r["provider"] for r in by_op["ceiling"]} == {"gemm", "copy"}
    assert all(r["failed"] == 0 for r in by_op["warm"]) and any(r["provider"] == "summary" for r in by_op["warm"])
    if call == "1":
        assert by_op["build"][0]["built"] is False and "no CUDA torch" in by_op["build"][0]["status"]
        assert {r["provider"] for r in by_op["tests"]} == {"csrc", "kernels", "kernel-configs"}
        assert next(r for r in by_op["tests"] if r["provider"] == "kernel-configs")["passed"] >= 2
        tri = [r for r in by_op["linear_logprob"] if r["provider"] == "triton"]
        timed = [r for r in tri if r["mode"] in ("fwd", "fwd+bwd")]
        assert len(timed) == 2 and all(r["median_ms"] > 0 and r["backend"] == "triton" for r in timed)
        assert all("linear_logprob_fwd" in r["config"] for r in timed)
        acc = next(r for r in tri if r["mode"] == "accuracy")
        assert acc["rel_err"]["logprob"] < 1e-5 and acc["rel_err"]["dweight"] < 1e-4
        assert all(r["status"].startswith("skipped") for r in by_op["linear_logprob"]
                   if r["provider"] in ("cuda", "liger"))
        assert {r["provider"] for r in by_op["attn_merge"] if r.get("median_ms", 0) > 0} == {"triton", "torch"}
    else:
        att = [r for r in by_op["flash_attention"] if r["provider"] == "qlfast-triton"]
        assert {r["mode"] for r in att} == {"fwd", "fwd+bwd"} and all(r["median_ms"] > 0 for r in att)
        assert all("flash_fwd" in r["config"] for r in att)
        (rl,) = by_op["rl_update"]
        assert rl["median_ms"] > 0 and rl["policy_metrics"]["finite"] is True
        assert rl["attention_backend"] == "sdpa" and rl["logprob_backend"] == "torch"
        assert rl["liger_in_model"] is False and rl["fsdp"] is True
        assert 0 < rl["changed_share"] <= 1 and rl["sampled_elements"] > 0 and rl["master_dtypes"] == ["float32"]
        assert rl["predicted_gib"] > 0 and rl["host_offload_mib"] > 0


@pytest.mark.slow
@REHEARSAL
def test_a_stage_cut_by_the_deadline_fails_the_call_and_keeps_earlier_rows(tmp_path):
    proc = _run("2", tmp_path, QLFAST_PROOF_DEADLINE="30")
    assert proc.returncode != 0
    status = {s.split("\t")[1]: s.split("\t") for s in (tmp_path / "status.tsv").read_text().splitlines()}
    assert status["env"][2] == "0"
    assert any(s[2] != "0" for s in status.values())
    assert any(r["op"] == "ceiling" for r in _rows(tmp_path))  # the env stage's rows are there
    assert "rl_update" in status and "no time left" in status["rl_update"][5]

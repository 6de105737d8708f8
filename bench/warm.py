"""The proof's warm stages: compile every Triton kernel config a call's timed stages will use, in parallel processes.

    python bench/warm.py 1|2 [--workers N] [--offline]

The jobs (kernels/warmup.py: one per kernel x autotune config, at the exact shapes of bench/proof.py and
bench/rl_update.py) are compiled by a pool of N spawned processes into TRITON_CACHE_DIR; the timed stages, separate
processes, then find every binary in that cache and only benchmark the configs. Serial, the autotune lists cost
~1.5 s per bf16 config on Triton 3.6 (ENVIRONMENT.md): call 1 has ~30 jobs, call 2 ~90.

--offline (the default without a GPU): compile for sm_90a against a stand-in driver (qlfast.testing.
offline_cuda_target), one config per kernel at the rehearsal's shapes: the CPU rehearsal checks that the job lists
build and that every kernel still compiles for Hopper. One row per kernel family (jobs, failures, compile seconds,
registers and spills on a GPU) and a summary row go to QLFAST_BENCH_ROWS.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _families(call: int) -> list[tuple[str, dict]]:
    """(family, shape parameters) of every kernel the timed stages of this call launch."""
    import proof
    import rl_update

    dt = proof.DTYPE_NAME if not _offline() else "bfloat16"  # the offline compile checks the GPU's dtype
    if call == 1:
        lin = proof.LINEAR
        out = [("linear_fwd", dict(n=lin["n"], h=lin["h"], v=lin["v"], dtype=dt, with_entropy=True)),
               ("linear_dz", dict(n=lin["n"], h=lin["h"], v=lin["v"], dtype=dt, has_glp=True, has_gent=True)),
               ("attn_merge", dict(t=proof.MERGE["t"], h=proof.MERGE["h"], d=proof.MERGE["d"], n=proof.MERGE["t"],
                                   block_dtype=dt, rows=False))]
        return out
    out = []
    for s in proof.ATTN:
        flash = dict(tq=s["L"], tk=s["L"], hq=s["hq"], hkv=s["hkv"], d=s["d"], dtype=dt, causal=True, nseq=1)
        out += [("flash_fwd", dict(flash, max_q=s["L"])), ("flash_bwd", dict(flash, max_q=s["L"], max_k=s["L"]))]
    # at the rehearsal's sizes the RL stage runs on CPU with the sdpa and torch backends: no Triton kernel to warm
    return out if proof.SMALL else out + rl_update.kernel_families(dt)


def _offline() -> bool:
    return os.environ.get("QLFAST_WARM_OFFLINE") == "1"


def _init_worker(offline: bool):
    os.environ["TRITON_INTERPRET"] = "0"  # JIT functions, not the interpreter's, before any kernel is decorated
    if offline:
        os.environ["QLFAST_WARM_OFFLINE"] = "1"
        global _TARGET
        from qlfast.testing import offline_cuda_target

        _TARGET = offline_cuda_target()
        _TARGET.__enter__()


def _compile(job) -> dict:
    from qlfast.kernels import warmup

    return warmup.compile_job(job)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("call", type=int, choices=(1, 2))
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--offline", action="store_true", help="compile for sm_90a without a GPU (default off a GPU)")
    args = ap.parse_args(argv)
    import torch

    offline = args.offline or not torch.cuda.is_available()
    os.environ["TRITON_INTERPRET"] = "0"
    if offline:
        os.environ["QLFAST_WARM_OFFLINE"] = "1"
    import proof

    from qlfast.kernels import warmup

    t0 = time.perf_counter()
    jobs = []
    for family, params in _families(args.call):
        jobs += warmup.jobs(family, first_config_only=offline, **params)
    results = []
    ctx = mp.get_context("spawn")  # CUDA (and Triton's driver) must not be forked
    with cf.ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(jobs))), mp_context=ctx,
                                initializer=_init_worker, initargs=(offline,)) as pool:
        for res in pool.map(_compile, jobs):
            results.append(res)
            if "error" in res:
                print(f"warm: {res['kernel']} {res['config']}: {res['error']}", flush=True)
    wall = time.perf_counter() - t0
    by_family: dict[str, list[dict]] = {}
    for (family, params, _, _), res in zip(jobs, results):
        by_family.setdefault(f"{family} {sorted(params.items())}", []).append(res)
    failed = 0
    for key, rs in by_family.items():
        errors = [r for r in rs if "error" in r]
        failed += len(errors)
        proof.stage_row("warm", key.split(" ")[0], {"params": key.split(" ", 1)[1]}, "compile",
                        jobs=len(rs), failed=len(errors), compile_s=round(sum(r["seconds"] for r in rs), 2),
                        kernels={f"{r['kernel']} {r['config']}": {k: r[k] for k in ("n_regs", "n_spills", "error")
                                                                  if k in r} for r in rs},
                        target="sm_90a (offline)" if offline else "this GPU")
    proof.stage_row("warm", "summary", {}, "compile", jobs=len(jobs), failed=failed, workers=args.workers,
                    wall_s=round(wall, 1), serial_s=round(sum(r["seconds"] for r in results), 1),
                    cache=os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache"))
    print(f"warm call {args.call}: {len(jobs)} jobs, {failed} failed, {wall:.1f} s on {args.workers} workers "
          f"({sum(r['seconds'] for r in results):.1f} s of compiling)", flush=True)
    # a config that does not compile (out of shared memory, say) is what the autotuner would skip: not a failure
    # when another config of the same kernel compiled; a kernel none of whose configs compiles is
    ok_kernels = {(j[0], str(j[1]), j[2]) for j, r in zip(jobs, results) if "error" not in r}
    all_kernels = {(j[0], str(j[1]), j[2]) for j in jobs}
    return 0 if ok_kernels == all_kernels else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

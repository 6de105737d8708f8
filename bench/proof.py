"""The stages of the GPU proof (scripts/gpu_proof.sh runs them; docs/perf/proof.md says what each one measures).

    python bench/proof.py env | built RC SECONDS | pytest NAME JUNIT_XML RC | linear_logprob | attention
    (the RL update is bench/rl_update.py, the parallel compile bench/warm.py)

Every stage appends rows to QLFAST_BENCH_ROWS (bench/harness.py: commit, versions, device on every row) as each
measurement ends, so a stage killed by its timeout keeps what it measured. QLFAST_PROOF_CPU=1 runs the same code at
tiny sizes on CPU (the Triton interpreter, fp32): the rehearsal that finds a broken stage before the GPU does.
A stage exits non-zero when a measurement it was asked for failed; a provider that cannot run here (no qlfast._C, no
liger_kernel, no GPU) is a row with a `status`, not a failure.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the interpreter must be on before triton is first imported (ENVIRONMENT.md)
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SMALL = os.environ.get("QLFAST_PROOF_CPU") == "1"
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32  # bf16 tl.dot is wrong in the interpreter (ENVIRONMENT.md)
DTYPE_NAME = str(DTYPE).split(".")[-1]
CALL = os.environ.get("QLFAST_PROOF_CALL", "0")
H200_BF16_DENSE = 989e12  # H100/H200 SXM datasheet dense bf16; rows also carry the ceiling measured in `env`

# The shapes. Real: the QwenLong-L1-32B LM head (N = 60K tokens), one 60K-token sequence with the 32B / 7B heads.
LINEAR = dict(n=96, h=64, v=1000) if SMALL else dict(n=60000, h=5120, v=152064)
LINEAR_ACC = dict(n=97, h=72, v=1003) if SMALL else dict(n=2049, h=1024, v=32003)  # accuracy vs float64
ATTN = [dict(L=96, hq=4, hkv=2, d=64)] if SMALL else [dict(L=61440, hq=40, hkv=8, d=128),
                                                       dict(L=61440, hq=28, hkv=4, d=128)]
MERGE = dict(t=64, h=4, d=64) if SMALL else dict(t=61440, h=40, d=128)


def stage_row(op: str, provider: str, shape: dict, mode: str, stats: dict | None = None, **extra) -> dict:
    """One row through the harness (NaN times when there is no measurement)."""
    nan = float("nan")
    stats = stats or {"median_ms": nan, "min_ms": nan, "reps": 0, "peak_bytes": 0}
    return harness.record(op, provider, shape, mode, stats, flops=extra.pop("flops", None),
                          extra={"call": CALL, "small": SMALL, **extra})


def _events_ms(fn, warmup=3, rep=10) -> float:
    """Median ms of fn() (CUDA events on GPU, perf_counter on CPU)."""
    return harness.measure(fn, warmup=warmup, rep=rep)["median_ms"]


# ------------------------------------------------------------------------------------------------------------ env


def env() -> int:
    """Versions, the device, and the two ceilings every later number is read against: a bf16 GEMM on random data
    and a device-to-device copy (bytes read + written)."""
    info = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    if GPU:
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count,
                    capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
    info["liger_kernel"] = importlib.util.find_spec("liger_kernel") is not None
    stage_row("env", "machine", {}, "info", **info)
    m = 512 if SMALL else 8192
    dt = DTYPE
    a, b = torch.randn(m, m, device=DEVICE).to(dt), torch.randn(m, m, device=DEVICE).to(dt)
    stats = harness.measure(lambda: a @ b, warmup=3, rep=10)
    stage_row("ceiling", "gemm", {"M": m, "N": m, "K": m, "dtype": str(dt).split(".")[-1]}, "fwd", stats,
              flops=2.0 * m ** 3)
    nbytes = (64 if SMALL else 4096) * 2**20
    src = torch.randn(nbytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    stats = harness.measure(lambda: dst.copy_(src), warmup=3, rep=10)
    stage_row("ceiling", "copy", {"bytes": nbytes}, "copy", stats,
              tb_per_s=round(2 * nbytes / (stats["median_ms"] * 1e-3) / 1e12, 3))
    return 0


def built(rc: str, seconds: str) -> int:
    """The build stage's row: did setup.py build qlfast._C, and does torch.ops.qlfast load from it."""
    from qlfast.ops import _cuda

    ok = _cuda.available() and _cuda.available("attn_merge_")
    status = "built" if ok else ("no CUDA torch: the extension is not built here (Triton and torch backends only)"
                                 if torch.version.cuda is None else "build failed or qlfast._C did not load")
    stage_row("build", "qlfast._C", {}, "build", built=ok, rc=int(rc), seconds=float(seconds), status=status)
    return 0 if (ok or torch.version.cuda is None) and int(rc) == 0 else 1


def pytest_row(name: str, junit: str, rc: str) -> int:
    """A test stage's row: counts from pytest's junit XML (and the failed tests' names)."""
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if Path(junit).exists():
        root = ET.parse(junit).getroot()
        for suite in root.iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
        for case in root.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    stage_row("tests", name, {}, "pytest", rc=int(rc), failed=failed[:50], **counts)
    return 0 if int(rc) == 0 else 1


# ----------------------------------------------------------------------------------------------- linear_logprob


def _linear_inputs(n, h, v, seed=0, grad=True):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    hidden = torch.randn(n, h, device=DEVICE, generator=g).to(DTYPE).requires_grad_(grad)
    weight = (torch.randn(v, h, device=DEVICE, generator=g) * h ** -0.5).to(DTYPE).requires_grad_(grad)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    gl = torch.randn(n, device=DEVICE, generator=g)
    return hidden, weight, targets, gl


def _provider_status(provider: str) -> str | None:
    from qlfast.ops import _dispatch

    if provider == "cuda" and not _dispatch.has_cuda_op("linear_logprob_fwd"):
        return "skipped: qlfast._C has no linear_logprob_fwd (not built)"
    if provider == "cuda" and not GPU:
        return "skipped: needs a CUDA GPU"
    if provider == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger_kernel is not installed (carry its wheel in .whl/)"
    if provider == "liger" and not GPU:
        return "skipped: liger needs a CUDA GPU"
    return None


def _accuracy(backend: str, config: dict | None) -> dict:
    """Relative errors vs float64 of logprob/entropy/lse (fwd) and dhidden/dweight, at LINEAR_ACC, same dtype."""
    from qlfast.kernels import linear_logprob as tri
    from qlfast.ops import _cuda
    from qlfast.ref import linear_logprob as ref
    from qlfast.testing import rel_err

    hid, w, t, gl = _linear_inputs(**LINEAR_ACC, seed=1, grad=False)
    ge = torch.randn_like(gl)
    lp64, ent64, lse64 = ref.forward(hid.double(), w.double(), t, 1.0, True)
    dh64, dw64 = ref.backward(hid.double(), w.double(), t, lse64, ent64, gl.double(), ge.double(), 1.0)
    if backend == "triton":
        lp, ent, lse = tri.linear_logprob_fwd(hid, w, t, 1.0, True, config=config)
        dh, dw = tri.linear_logprob_bwd(hid, w, t, lse, ent, gl, ge, 1.0, config=config)
    else:
        lp, ent, lse = _cuda.linear_logprob_fwd(hid, w, t, 1.0, True)
        dh, dw = _cuda.linear_logprob_bwd(hid, w, t, lse, ent, gl, ge, 1.0)
    lp_e, ent_e, lse_e = ref.forward(hid, w, t, 1.0, True)  # same-dtype eager: the yardstick
    return {"rel_err": {k: float(f"{rel_err(a, b):.3e}") for k, a, b in
                        (("logprob", lp, lp64), ("entropy", ent, ent64), ("lse", lse, lse64), ("dhidden", dh, dh64),
                         ("dweight", dw, dw64))},
            "rel_err_eager": {"logprob": float(f"{rel_err(lp_e, lp64):.3e}"),
                              "entropy": float(f"{rel_err(ent_e, ent64):.3e}")},
            "accuracy_shape": LINEAR_ACC}


def linear_logprob() -> int:
    """fwd and fwd+bwd at the 32B LM head for triton, cuda and Liger; the backend that ran, the autotune config it
    chose, peak memory above the inputs, and the accuracy of the same backend (and config) against float64."""
    from qlfast.ops.linear_logprob import TABLE

    shape = {"N": LINEAR["n"], "H": LINEAR["h"], "V": LINEAR["v"], "dtype": DTYPE_NAME}
    stage_row("linear_logprob", "auto", shape, "dispatch", backend=TABLE.resolve("auto", torch.device(DEVICE)),
              order=list(TABLE.order.get(DEVICE, ())))
    failed = 0
    for provider in ("triton", "cuda", "liger"):
        status = _provider_status(provider)
        if status:
            for mode in ("fwd", "fwd+bwd"):
                stage_row("linear_logprob", provider, shape, mode, status=status)
            continue
        try:
            harness.free_device_memory()
            failed += _linear_provider(provider, shape)
        except Exception as e:  # noqa: BLE001 - one provider failing must not hide the others' rows
            traceback.print_exc()
            stage_row("linear_logprob", provider, shape, "error", status=f"failed: {type(e).__name__}: {e}"[:500])
            failed += 1
    failed += _attn_merge()
    return 1 if failed else 0


def _linear_provider(provider: str, shape: dict) -> int:
    from qlfast.kernels import linear_logprob as tri
    from qlfast.ops.linear_logprob import linear_logprob

    n, h, v = LINEAR["n"], LINEAR["h"], LINEAR["v"]
    hid, w, t, gl = _linear_inputs(n, h, v)
    if provider == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def liger():
            loss_fn(w, hid, t).backward()
            hid.grad = w.grad = None

        modes = {"fwd+bwd": liger}
    else:
        def fwd():
            with torch.no_grad():
                linear_logprob(hid, w, t, return_entropy=True, backend=provider, check=False)

        def fwd_bwd():
            lp, ent = linear_logprob(hid, w, t, return_entropy=True, backend=provider, check=False)
            ((lp + 0.01 * ent) * gl).sum().backward()
            hid.grad = w.grad = None

        modes = {"fwd": fwd, "fwd+bwd": fwd_bwd}
    failed = 0
    for mode, fn in modes.items():
        stats, oom = harness.guarded(harness.measure, fn, warmup=1 if SMALL else 2, rep=2 if SMALL else 5)
        flops = (2 if mode == "fwd" else 8) * n * h * v
        stage_row("linear_logprob", provider, shape, mode, stats, flops=flops if stats else None, backend=provider,
                  config=dict(tri.LAST_CONFIG) if provider == "triton" else None,
                  status=f"oom: {oom}" if oom else "ok")
        failed += oom is not None
        hid.grad = w.grad = None
    if provider != "liger":
        cfg = tri.LAST_CONFIG.get("linear_logprob_fwd") if provider == "triton" else None
        stage_row("linear_logprob", provider, shape, "accuracy", backend=provider, config=cfg,
                  **_accuracy(provider, cfg if provider == "triton" and not SMALL else None))
    return failed


def _attn_merge() -> int:
    """The LSE merge (ring attention's step) for each backend that runs here: time and bytes moved per second."""
    from qlfast.ops.attn_merge import TABLE, merge_attn_

    t, hh, d = MERGE["t"], MERGE["h"], MERGE["d"]
    shape = {"T": t, "H": hh, "D": d, "block_dtype": DTYPE_NAME}
    out = torch.randn(t, hh, d, device=DEVICE)
    lse = torch.randn(hh, t, device=DEVICE)
    bo, bl = torch.randn(t, hh, d, device=DEVICE).to(DTYPE), torch.randn(hh, t, device=DEVICE)
    nbytes = t * hh * (d * (4 + 4 + DTYPE.itemsize) + 12)
    failed = 0
    for backend in ("triton", "cuda", "torch"):
        try:
            TABLE.resolve(backend, out.device, dtype=out.dtype)
        except ValueError as e:
            stage_row("attn_merge", backend, shape, "merge", status=f"skipped: {e}")
            continue
        try:
            stats = harness.measure(lambda b=backend: merge_attn_(out, lse, bo, bl, backend=b), warmup=2, rep=10)
            stage_row("attn_merge", backend, shape, "merge", stats, backend=backend,
                      tb_per_s=round(nbytes / (stats["median_ms"] * 1e-3) / 1e12, 3))
        except Exception as e:  # noqa: BLE001
            stage_row("attn_merge", backend, shape, "merge", status=f"failed: {type(e).__name__}: {e}"[:500])
            failed += 1
    stage_row("attn_merge", "auto", shape, "dispatch", backend=TABLE.resolve("auto", out.device, dtype=out.dtype))
    return failed


# ---------------------------------------------------------------------------------------------------- attention


def _attn_fn(provider, q, k, v, cu, L):
    """-> (fn computing out, differentiable leaves) or a string saying why the provider cannot run."""
    from qlfast.ops.flash_attention import flash_attention

    if provider == "qlfast-triton":
        return (lambda: flash_attention(q, k, v, cu, max_seqlen=L, backend="triton", check=False)[0]), (q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
               "sdpa-math": SDPBackend.MATH}[provider]
    group = q.shape[1] // k.shape[1]
    # (1, H, L, D); kv heads repeated here, outside the timed region (favours SDPA slightly)
    qs = q.detach().transpose(0, 1).unsqueeze(0).requires_grad_()
    ks = k.detach().repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).requires_grad_()
    vs = v.detach().repeat_interleave(group, 1).transpose(0, 1).unsqueeze(0).requires_grad_()

    def fn():
        with sdpa_kernel([backend]):
            return sdpa(qs, ks, vs, is_causal=True)

    return fn, (qs, ks, vs)


def attention() -> int:
    """Causal flash attention fwd and fwd+bwd on one 60K-token sequence: qlfast's Triton kernels vs SDPA's flash and
    cuDNN backends (FlashAttention's FLOP convention: fwd 4 L^2 Hq D / 2, fwd+bwd 3.5 x that)."""
    providers = ["qlfast-triton", "sdpa-flash", "sdpa-cudnn"] if GPU else ["qlfast-triton", "sdpa-math"]
    failed = 0
    for s in ATTN:
        for provider in providers:
            harness.free_device_memory()
            try:
                failed += _attention_case(s, provider)
            except Exception as e:  # noqa: BLE001 - one provider failing must not hide the others' rows
                traceback.print_exc()
                stage_row("flash_attention", provider, s, "error", status=f"failed: {type(e).__name__}: {e}"[:500])
                failed += 1
    return 1 if failed else 0


def _attention_case(s: dict, provider: str) -> int:
    from qlfast.kernels import flash_attention as fk

    L, hq, hkv, d = s["L"], s["hq"], s["hkv"], s["d"]
    shape = {"L": L, "Hq": hq, "Hkv": hkv, "D": d, "dtype": DTYPE_NAME, "causal": True}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(L, hq, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
    k = torch.randn(L, hkv, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
    v = torch.randn(L, hkv, d, device=DEVICE, generator=g).to(DTYPE).requires_grad_()
    cu = torch.tensor([0, L], dtype=torch.int32, device=DEVICE)
    fn, leaves = _attn_fn(provider, q, k, v, cu, L)
    try:
        dout = torch.randn_like(fn())
    except RuntimeError as e:  # an SDPA backend that does not take this shape / dtype / GPU
        stage_row("flash_attention", provider, shape, "fwd", status=f"skipped: {str(e).splitlines()[0]}"[:300])
        return 0
    f = 4.0 * L * L * hq * d / 2

    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        torch.autograd.grad(fn(), leaves, dout)

    failed = 0
    for mode, run, flops in (("fwd", fwd, f), ("fwd+bwd", fwd_bwd, 3.5 * f)):
        stats, oom = harness.guarded(harness.measure, run, warmup=1 if SMALL else 2, rep=2 if SMALL else 5)
        stage_row("flash_attention", provider, shape, mode, stats, flops=flops if stats else None, backend=provider,
                  config=dict(fk.LAST_CONFIG) if provider == "qlfast-triton" else None,
                  status=f"oom: {oom}" if oom else "ok")
        failed += oom is not None
    return failed


def main(argv: list[str]) -> int:
    stages = {"env": env, "built": built, "pytest": pytest_row, "linear_logprob": linear_logprob,
              "attention": attention}
    if not argv or argv[0] not in stages:
        print(f"usage: python bench/proof.py {{{'|'.join(stages)}}} [args]", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rc = stages[argv[0]](*argv[1:])
    print(f"proof stage {argv[0]}: rc={rc} in {time.perf_counter() - t0:.1f} s "
          f"({'cpu rehearsal' if SMALL else DEVICE})", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

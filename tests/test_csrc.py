"""qlfast's CUDA C++ (csrc/): it compiles for sm_90a wherever nvcc exists, and on a GPU it matches float64.

- test_csrc_compiles_sm90a: every csrc/*.cu and *.cpp compiles with nvcc for sm_90a against the installed torch's
  headers, on CPU CI too (the CPU wheel ships the ATen/c10 CUDA headers; the cuBLAS declarations come from
  csrc/cublas_compat.h where the toolkit has no cuBLAS headers). The .cu files compile as one translation unit
  (the ATen headers are parsed once: ~30 s on 2 cores instead of ~60), and no kernel may spill registers.
- gpu tests: the cuda backend of linear_logprob (fwd, both gradients, entropy, temperature, ignored rows, several
  vocabulary chunks with a ragged and an odd-width last one) and attn_merge_ against float64, the error bounded by a
  small multiple of the same-dtype eager torch error (qlfast.testing.assert_close_vs_ref), and the bf16 forward
  within a small multiple of the triton backend's error (fp32 logits in the epilogue); fake kernels via opcheck;
  the memory contract via max_memory_allocated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch

from qlfast.ref import linear_logprob as ref
from qlfast.testing import assert_close_vs_ref, one_triton_config

_one_config = one_triton_config()  # one autotune config per kernel on a GPU

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def test_csrc_compiles_sm90a(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine): the CUDA sources cannot be compiled here")
    from torch.utils.cpp_extension import include_paths

    includes = list(include_paths())
    # The CPU torch wheel lacks this one generated header of c10/cuda (present in CUDA wheels); its content there is
    # exactly this define.
    shim = tmp_path / "shim"
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in includes):
        (shim / "c10/cuda/impl").mkdir(parents=True)
        (shim / "c10/cuda/impl/cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    flags = ["-std=c++20", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
             "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=_C",
             *[f"-I{p}" for p in includes], f"-I{shim}", f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    cu = sorted(CSRC.glob("*.cu"))
    cpp = sorted(CSRC.glob("*.cpp"))
    assert cu and cpp, "csrc/ should hold the .cu kernels and module.cpp"
    unit = tmp_path / "all.cu"
    unit.write_text("".join(f'#include "{p}"\n' for p in cu))
    jobs = [[nvcc, "-c", str(unit), "-o", str(tmp_path / "all.o"), *flags]]
    jobs += [[nvcc, "-c", str(p), "-o", str(tmp_path / f"{p.stem}.o"), *flags] for p in cpp]
    procs = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for j in jobs]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for job, proc, out in zip(jobs, procs, outs):
        assert proc.returncode == 0, f"nvcc failed on {job[2]}:\n{out[-6000:]}"
    ptxas = outs[0]
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'", ptxas)
    for name in ("lse_chunk_kernel", "dlogits_chunk_kernel", "attn_merge_kernel"):
        assert any(name in k for k in kernels), f"{name} missing from the sm_90a build:\n{ptxas[:2000]}"
    spills = re.findall(r"(\d+) bytes spill stores", ptxas)
    assert spills and all(s == "0" for s in spills), f"a kernel spills registers:\n{ptxas[-4000:]}"


# ---------------------------------------------------------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def cuda_ops():
    """The built extension; on a GPU machine where it was not built yet, build it in place (setup.py build_ext)."""
    from qlfast.ops import _cuda, _dispatch

    if not _cuda.available():
        env = {**os.environ, "QLFAST_BUILD_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
        proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"building qlfast._C failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
        _dispatch.cuda_ext.cache_clear()
    assert _cuda.available() and _cuda.available("attn_merge_"), "qlfast._C did not register torch.ops.qlfast.*"
    return _cuda


def _poison_cache(nbytes: int = 64 << 20) -> None:
    """Leave NaN-filled blocks in the caching allocator, so an output element the op forgot to write is NaN."""
    torch.empty(nbytes // 4, device="cuda").fill_(float("nan"))
    torch.cuda.synchronize()


def _inputs(n, h, v, dtype, seed, n_ignore=7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=g) * (2.5 / h**0.5)).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[torch.randperm(n, device="cuda", generator=g)[:n_ignore]] = ref.IGNORE_INDEX
    targets[0] = v - 1  # the last column (in the ragged last chunk) is a target
    g_lp = torch.randn(n, device="cuda", generator=g)
    g_ent = torch.randn(n, device="cuda", generator=g)
    return hidden, weight, targets, g_lp, g_ent


CASES = [  # (N, H, V, chunk cols): one chunk; several with a ragged last; odd width (scalar path), H not % 8
    (97, 72, 1000, None),
    (97, 72, 1000, 256),
    (64, 100, 1001, 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,v,cols", CASES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_linear_logprob_cuda_vs_float64(cuda_ops, monkeypatch, dtype, n, h, v, cols, temperature):
    if cols is not None:
        monkeypatch.setenv("QLFAST_CUDA_CHUNK_COLS", str(cols))
    hidden, weight, targets, g_lp, g_ent = _inputs(n, h, v, dtype, seed=n + h + v)
    inv_t = 1.0 / temperature
    h64, w64 = hidden.double(), weight.double()
    lp64, ent64, lse64 = ref.forward(h64, w64, targets, inv_t, True)
    dh64, dw64 = ref.backward(h64, w64, targets, lse64, ent64, g_lp.double(), g_ent.double(), inv_t)
    lp_e, ent_e, lse_e = ref.forward(hidden, weight, targets, inv_t, True)  # same-dtype eager torch
    dh_e, dw_e = ref.backward(hidden, weight, targets, lse_e, ent_e, g_lp, g_ent, inv_t)

    _poison_cache()
    lp, ent, lse = cuda_ops.linear_logprob_fwd(hidden, weight, targets, inv_t, True)
    assert lp.dtype == ent.dtype == lse.dtype == torch.float32
    floor = 4 * torch.finfo(torch.float32).eps
    assert_close_vs_ref("logprob", lp, lp64, lp_e, floor=floor)
    assert_close_vs_ref("entropy", ent, ent64, ent_e, floor=floor)
    assert_close_vs_ref("lse", lse, lse64, lse_e, floor=floor)
    ignored = targets == ref.IGNORE_INDEX
    assert bool((lp[ignored] == 0).all()) and bool((ent[ignored] == 0).all())

    lp2, ent2, lse2 = cuda_ops.linear_logprob_fwd(hidden, weight, targets, inv_t, False)
    assert ent2 is None
    assert torch.allclose(lp2, lp, rtol=1e-6, atol=1e-5) and torch.allclose(lse2, lse, rtol=1e-6, atol=1e-5)

    _poison_cache()
    dh, dw = cuda_ops.linear_logprob_bwd(hidden, weight, targets, lse, ent, g_lp, g_ent, inv_t)
    assert dh.dtype == dtype and dw.dtype == dtype
    assert_close_vs_ref("dhidden", dh, dh64, dh_e)
    assert_close_vs_ref("dweight", dw, dw64, dw_e)
    assert bool((dh[ignored] == 0).all())

    # logprob gradient alone (grad_entropy None, entropy None), expanded (stride 0) upstream gradient
    g1 = torch.full((1,), 0.37, device="cuda").expand(n)
    dh64, dw64 = ref.backward(h64, w64, targets, lse64, None, g1.double(), None, inv_t)
    dh_e, dw_e = ref.backward(hidden, weight, targets, lse_e, None, g1, None, inv_t)
    dh, dw = cuda_ops.linear_logprob_bwd(hidden, weight, targets, lse, None, g1, None, inv_t)
    assert_close_vs_ref("dhidden (logprob only)", dh, dh64, dh_e)
    assert_close_vs_ref("dweight (logprob only)", dw, dw64, dw_e)


@pytest.mark.gpu
def test_linear_logprob_cuda_as_accurate_as_triton(cuda_ops):
    """bf16 inputs: the chunk GEMM writes fp32 logits, so the cuda backend's log-probs, entropy and lse are as accurate
    as the triton backend's (fp32 logits in registers), not rounded to bf16 first like same-dtype eager torch."""
    from qlfast.kernels import linear_logprob as tri

    hidden, weight, targets, _, _ = _inputs(2049, 1024, 32003, torch.bfloat16, seed=13)
    ref64 = ref.forward(hidden.double(), weight.double(), targets, 1.0, True)
    got_cuda = cuda_ops.linear_logprob_fwd(hidden, weight, targets, 1.0, True)
    got_tri = tri.linear_logprob_fwd(hidden, weight, targets, 1.0, True)
    floor = 4 * torch.finfo(torch.float32).eps
    for name, c, t, r in zip(("logprob", "entropy", "lse"), got_cuda, got_tri, ref64):
        assert_close_vs_ref(f"cuda {name} vs triton's error", c, r, t, floor=floor)


@pytest.mark.gpu
def test_linear_logprob_cuda_through_api(cuda_ops, monkeypatch):
    from qlfast.ops.linear_logprob import linear_logprob

    monkeypatch.setenv("QLFAST_CUDA_CHUNK_COLS", "384")
    hidden, weight, targets, g_lp, g_ent = _inputs(131, 64, 1500, torch.bfloat16, seed=3)
    grads = {}
    for backend in ("cuda", "torch"):
        hd, wd = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = linear_logprob(hd, wd, targets, temperature=0.8, return_entropy=True, backend=backend)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
        grads[backend] = (lp.detach(), ent.detach(), hd.grad, wd.grad)
    for name, a, b in zip(("logprob", "entropy", "dhidden", "dweight"), grads["cuda"], grads["torch"]):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item()), name


@pytest.mark.gpu
def test_linear_logprob_cuda_fake_and_empty(cuda_ops):
    hidden, weight, targets, g_lp, _ = _inputs(40, 64, 300, torch.bfloat16, seed=5)
    torch.library.opcheck(torch.ops.qlfast.linear_logprob_fwd, (hidden, weight, targets, 1.25, True))
    torch.library.opcheck(torch.ops.qlfast.linear_logprob_fwd, (hidden, weight, targets, 1.0, False))
    _, ent, lse = torch.ops.qlfast.linear_logprob_fwd(hidden, weight, targets, 1.25, True)
    torch.library.opcheck(torch.ops.qlfast.linear_logprob_bwd,
                          (hidden, weight, targets, lse, ent, g_lp, None, 1.25))
    lp, ent, lse = cuda_ops.linear_logprob_fwd(hidden[:0], weight, targets[:0], 1.0, True)
    assert lp.shape == ent.shape == lse.shape == (0,)
    dh, dw = cuda_ops.linear_logprob_bwd(hidden[:0], weight, targets[:0], lse, ent, lp, None, 1.0)
    assert dh.shape == (0, 64) and bool((dw == 0).all())


@pytest.mark.gpu
def test_linear_logprob_cuda_memory(cuda_ops, monkeypatch):
    # Full fp32 logits would take N * V * 4 = 512 MiB; the chunked op must stay far below a quarter of that.
    n, h, v = 4096, 256, 32768
    monkeypatch.setenv("QLFAST_CUDA_CHUNK_MB", "16")
    hidden, weight, targets, g_lp, g_ent = _inputs(n, h, v, torch.bfloat16, seed=11)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent, lse = cuda_ops.linear_logprob_fwd(hidden, weight, targets, 1.0, True)
    dh, dw = cuda_ops.linear_logprob_bwd(hidden, weight, targets, lse, ent, g_lp, g_ent, 1.0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - dh.nbytes - dw.nbytes
    full = n * v * 4
    assert extra < full / 4, f"extra peak {extra / 2**20:.1f} MiB >= a quarter of the full logits"


def _merge64(out, lse, block_out, block_lse):
    """float64 reference merge: out = (e^a out + e^b block_out) / (e^a + e^b), lse = logaddexp, -inf rows handled."""
    a, b = lse.double().T.unsqueeze(-1), block_lse.double().T.unsqueeze(-1)  # (T, H, 1)
    new = torch.logaddexp(a, b)
    wa = torch.where(a == float("-inf"), 0.0, torch.exp(a - new))
    wb = torch.where(b == float("-inf"), 0.0, torch.exp(b - new))
    o, bo = out.double(), block_out.double()
    merged = torch.where(wa == 0, 0.0, wa * o) + torch.where(wb == 0, 0.0, wb * bo)
    merged = torch.where(a == float("-inf"), bo, torch.where(b == float("-inf"), o, merged))
    return merged, new.squeeze(-1).T


def _merge_eager(out, lse, block_out, block_lse):
    """The same log-sigmoid merge in fp32 eager torch (the ring-flash-attention form): the dtype yardstick."""
    a, b = lse.T.unsqueeze(-1), block_lse.T.unsqueeze(-1)
    o = out - torch.sigmoid(b - a) * (out - block_out.float())
    new = a - torch.nn.functional.logsigmoid(a - b)
    o = torch.where(a == float("-inf"), block_out.float(), torch.where(b == float("-inf"), out, o))
    new = torch.where(a == float("-inf"), b, torch.where(b == float("-inf"), a, new))
    return o, new.squeeze(-1).T


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [128, 72, 70])
@pytest.mark.parametrize("block_dtype", [torch.float32, torch.bfloat16])
def test_attn_merge_vs_float64(cuda_ops, dim, block_dtype):
    g = torch.Generator(device="cuda").manual_seed(dim)
    t, nh = 97, 5
    out = torch.randn(t, nh, dim, device="cuda", generator=g)
    block_out = torch.randn(t, nh, dim, device="cuda", generator=g).to(block_dtype)
    # lse as a transposed (T, H) buffer: a strided (H, T) view, as a caller may hold it
    lse = (torch.randn(t, nh, device="cuda", generator=g) * 30).T
    block_lse = torch.randn(nh, t, device="cuda", generator=g) * 30
    lse[1, :20] = float("-inf")  # rows with no key yet: take the block's values (out there is NaN: never read)
    out[:20, 1] = float("nan")
    block_lse[2, 10:40] = float("-inf")  # the block saw no key: keep the row (block_out NaN there: never read)
    block_out[10:40, 2] = float("nan")
    lse[3, 50:60] = float("-inf")
    block_lse[3, 50:60] = float("-inf")  # neither saw a key: out = block_out (0 by the kernels' contract)
    block_out[50:60, 3] = 0.0
    exp_out, exp_lse = _merge64(out, lse, block_out, block_lse)
    eag_out, eag_lse = _merge_eager(out, lse, block_out, block_lse)

    cuda_ops.attn_merge_(out, lse, block_out, block_lse)
    assert torch.isfinite(out).all()
    finite = torch.isfinite(exp_lse)
    assert torch.equal(finite, torch.isfinite(lse)), "-inf rows of lse changed or finite rows became -inf"
    assert_close_vs_ref("attn_merge out", out, exp_out, eag_out, floor=4 * torch.finfo(torch.float32).eps)
    assert_close_vs_ref("attn_merge lse", lse[finite], exp_lse[finite], eag_lse[finite],
                        floor=4 * torch.finfo(torch.float32).eps)
    torch.library.opcheck(torch.ops.qlfast.attn_merge_, (out.clone(), lse.clone(), block_out, block_lse))


@pytest.mark.gpu
def test_attn_merge_first_block_into_empty_accumulator(cuda_ops):
    t, nh, dim = 33, 4, 64
    out = torch.full((t, nh, dim), float("nan"), device="cuda")
    lse = torch.full((nh, t), float("-inf"), device="cuda")
    block_out = torch.randn(t, nh, dim, device="cuda", dtype=torch.bfloat16)
    block_lse = torch.randn(nh, t, device="cuda")
    cuda_ops.attn_merge_(out, lse, block_out, block_lse)
    assert torch.equal(out, block_out.float()) and torch.equal(lse, block_lse)


if __name__ == "__main__":  # a quick manual run: python tests/test_csrc.py
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider", f"--basetemp={tempfile.mkdtemp()}"]))

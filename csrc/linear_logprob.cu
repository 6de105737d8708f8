// linear_logprob, cuda backend: cuBLAS chunk GEMMs over the vocabulary + one CUDA epilogue pass per chunk.
//
//   torch.ops.qlfast.linear_logprob_fwd(hidden (N,H), weight (V,H), targets (N,) int64, inv_temp, with_entropy)
//       -> logprob (N,) fp32, entropy (N,) fp32 (empty (0,) when not asked), lse (N,) fp32
//   torch.ops.qlfast.linear_logprob_bwd(hidden, weight, targets, lse, entropy?, grad_logprob?, grad_entropy?, inv_temp)
//       -> dhidden (N,H) hidden.dtype, dweight (V,H) weight.dtype
//
// Memory contract: the (N, V) logits are never materialised. The vocabulary is walked in chunks of Vc columns. The
// chunk GEMM writes its logits in fp32 (cuBLAS, fp32 accumulation and fp32 C even for bf16/fp16 operands), so the
// log-sum-exp, log-probs and entropy see the logits unrounded, as the triton backend's registers do (rounding them
// to bf16 first cost ~2e-4 relative error in the log-probs against 2.4e-7). Forward: one (N, Vc) fp32 buffer reused
// by every chunk, with an online log-sum-exp per row across chunks (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax"). Backward: the fp32 logits chunk plus an (N, Vc) dlogits chunk in the input dtype (the
// operand of the dW and dH GEMMs). The chunk buffers stay within
// QLFAST_CUDA_CHUNK_MB (default 768 MiB). Backward recomputes each chunk, writes dlogits, then
//   dW[chunk] = dz^T @ hidden     one GEMM over all N rows, fp32 accumulation inside cuBLAS, written once in the
//                                 weight dtype (never accumulated across chunks in bf16)
//   dH_fp32  += dz @ W[chunk]     bf16/fp16 operands, fp32 C with beta=1: an (N, H) fp32 accumulator, cast at the end
// so the extra memory is the chunk buffers + (N, H) fp32 + O(N).
//
// Math, with z = x * inv_temp (x = h . w_j), p = softmax(z), t = target, L = lse, E = entropy:
//   logprob = z_t - L,    E = L - sum_j p_j z_j
//   dz_j/dx_j scaling:    dx_j = inv_temp * (g_lp ([j = t] - p_j) - g_ent p_j (z_j - L + E))
// Rows with target -100 give logprob 0, entropy 0 and zero gradient (their lse is still the real one).
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <tuple>
#include <type_traits>

#include "common.cuh"

namespace qlfast {
namespace {

constexpr int kIgnoreIndex = -100;
constexpr int kWarps = 8;   // rows per 256-thread block: one warp per row
constexpr int kUnroll = 4;  // 16-byte packs in flight per lane before the first use

// Online softmax state of one lane (or one row), in log2 units: m = running max of y = x * inv_temp * log2(e),
// s = sum 2^(y - m), a = sum 2^(y - m) (y - m) (relative to the max, so the entropy has no large cancellation).
struct Online {
  float m, s, a;
};

__device__ __forceinline__ void online_add(Online& st, float y) {
  if (y > st.m) {  // rescale to the new max: a' = r (a + s (m_old - m_new)), s' = r s
    const float r = exp2f(st.m - y);
    const float dm = st.m - y;
    st.a = (st.s > 0.f) ? r * (st.a + st.s * dm) : 0.f;
    st.s *= r;
    st.m = y;
  }
  const float e = exp2f(y - st.m);
  st.s += e;
  st.a += e * (y - st.m);
}

// Merge state b into a (associative): the same rescaling, guarded for empty states (m = -inf, s = 0).
__device__ __forceinline__ Online online_merge(Online a, Online b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;
  const float ra = (a.s > 0.f) ? exp2f(a.m - m) : 0.f;
  const float rb = (b.s > 0.f) ? exp2f(b.m - m) : 0.f;
  Online o;
  o.m = m;
  o.s = a.s * ra + b.s * rb;
  o.a = (a.s > 0.f ? ra * (a.a + a.s * (a.m - m)) : 0.f) + (b.s > 0.f ? rb * (b.a + b.s * (b.m - m)) : 0.f);
  return o;
}

// Forward epilogue: one warp per row of the (N, vc) logits chunk. Merges the chunk into the row's running state
// (state[row] = {m, s, a, z_t}) and, on the last chunk, writes logprob, entropy, lse.
template <int VEC, bool ENT>
__global__ void __launch_bounds__(kWarps * 32)
    lse_chunk_kernel(const float* __restrict__ z, int64_t n_rows, int vc, int64_t v0,
                     const int64_t* __restrict__ targets, float inv_temp, float4* __restrict__ state, bool first,
                     bool last, float* __restrict__ logprob, float* __restrict__ entropy, float* __restrict__ lse) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;
  const float* zr = z + row * int64_t(vc);
  const float c = inv_temp * kLog2e;

  Online st{-INFINITY, 0.f, 0.f};
  const int nvec = vc / VEC;
  const Pack<float, VEC>* zp = reinterpret_cast<const Pack<float, VEC>*>(zr);
  for (int base = lane; base < nvec; base += 32 * kUnroll) {
    Pack<float, VEC> pk[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * 32;
      if (i < nvec) pk[u] = zp[i];
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (base + u * 32 >= nvec) break;
      float y[VEC];
      float ymax = -INFINITY;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        y[k] = pk[u].v[k] * c;
        ymax = fmaxf(ymax, y[k]);
      }
      if (ymax > st.m) {
        const float r = exp2f(st.m - ymax);
        st.a = (st.s > 0.f) ? r * (st.a + st.s * (st.m - ymax)) : 0.f;
        st.s *= r;
        st.m = ymax;
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float d = y[k] - st.m;
        const float e = exp2f(d);
        st.s += e;
        if (ENT) st.a += e * d;
      }
    }
  }
  for (int j = nvec * VEC + lane; j < vc; j += 32) online_add(st, zr[j] * c);

  // Warp merge: rescale every lane to the warp max, then sum.
  const float m = warp_max(st.m);
  const float r = (st.s > 0.f) ? exp2f(st.m - m) : 0.f;
  const float s = warp_sum(st.s * r);
  const float a = ENT ? warp_sum(st.s > 0.f ? r * (st.a + st.s * (st.m - m)) : 0.f) : 0.f;
  if (lane != 0) return;

  Online row_st{m, s, a};
  const int64_t t = targets[row];
  float4 prev = first ? make_float4(-INFINITY, 0.f, 0.f, 0.f) : state[row];
  if (!first) row_st = online_merge(Online{prev.x, prev.y, prev.z}, row_st);
  float zt = prev.w;
  if (t >= v0 && t < v0 + vc) zt = zr[t - v0] * inv_temp;
  if (!last) {
    state[row] = make_float4(row_st.m, row_st.s, row_st.a, zt);
    return;
  }
  const float log2s = log2f(row_st.s);
  const float l = (row_st.m + log2s) * kLn2;
  const bool valid = t != kIgnoreIndex;
  lse[row] = l;
  logprob[row] = valid ? zt - l : 0.f;
  // entropy = lse - E_p[z] = ln2 (log2 s - E_p[y - m]) with E_p[y - m] = a / s.
  if (ENT) entropy[row] = valid ? kLn2 * (log2s - row_st.a / row_st.s) : 0.f;
}

// Backward epilogue: one warp per row; reads the fp32 logits chunk z and writes dlogits (w.r.t. x = h . w_j) in the
// input dtype to a separate buffer dz (restrict: the two never alias, which also keeps ptxas from spilling):
//   dx_j = p_j (A + B x_j) + [j = t] inv_temp g_lp,  p_j = 2^(x_j c - L log2 e)
//   A = -inv_temp (g_lp + g_ent (E - L)),  B = -inv_temp^2 g_ent
template <typename T, int VEC>
__global__ void __launch_bounds__(kWarps * 32)
    dlogits_chunk_kernel(const float* __restrict__ z, T* __restrict__ dz, int64_t n_rows, int vc, int64_t v0,
                         const int64_t* __restrict__ targets, const float* __restrict__ lse, const float* __restrict__ entropy,
                         const float* __restrict__ g_lp, const float* __restrict__ g_ent, float inv_temp) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= n_rows) return;
  const float* zr = z + row * int64_t(vc);
  T* dzr = dz + row * int64_t(vc);
  const int64_t t = targets[row];
  const bool valid = t != kIgnoreIndex;
  const float glp = (valid && g_lp != nullptr) ? g_lp[row] : 0.f;
  const float gen = (valid && g_ent != nullptr) ? g_ent[row] : 0.f;
  const float L = lse[row];
  const float E = (gen != 0.f) ? entropy[row] : 0.f;
  const float A = -inv_temp * (glp + gen * (E - L));
  const float B = -inv_temp * inv_temp * gen;
  const float c = inv_temp * kLog2e;
  const float off = L * kLog2e;
  const bool zero = (glp == 0.f && gen == 0.f);  // ignored row or zero upstream gradient: write zeros, skip the read
  const int64_t tj = t - v0;                     // target column inside this chunk (may be out of range)

  const int nvec = vc / VEC;
  const Pack<float, VEC>* zp = reinterpret_cast<const Pack<float, VEC>*>(zr);
  Pack<T, VEC>* dzp = reinterpret_cast<Pack<T, VEC>*>(dzr);
  for (int base = lane; base < nvec; base += 32 * kUnroll) {
    Pack<float, VEC> pk[kUnroll];
    if (!zero) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32;
        if (i < nvec) pk[u] = zp[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * 32;
      if (i >= nvec) break;
      Pack<T, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float d = 0.f;
        if (!zero) {
          const float x = pk[u].v[k];
          d = exp2f(x * c - off) * (A + B * x);
          if (int64_t(i) * VEC + k == tj) d += inv_temp * glp;
        }
        o.v[k] = static_cast<T>(d);
      }
      dzp[i] = o;
    }
  }
  for (int j = nvec * VEC + lane; j < vc; j += 32) {
    float d = 0.f;
    if (!zero) {
      const float x = zr[j];
      d = exp2f(x * c - off) * (A + B * x);
      if (j == tj) d += inv_temp * glp;
    }
    dzr[j] = static_cast<T>(d);
  }
}

// Columns per chunk: the chunk buffers, `elem` bytes per (row, column) together, stay within QLFAST_CUDA_CHUNK_MB
// (default 768 MiB); QLFAST_CUDA_CHUNK_COLS forces a width (tests use it to exercise several chunks and a ragged last
// one at small shapes).
int64_t chunk_cols(int64_t n, int64_t vocab, int64_t elem) {
  if (const char* s = std::getenv("QLFAST_CUDA_CHUNK_COLS")) {
    const int64_t c = std::atoll(s);
    if (c > 0) return std::min(vocab, c);
  }
  int64_t mb = 768;
  if (const char* s = std::getenv("QLFAST_CUDA_CHUNK_MB")) mb = std::max<int64_t>(1, std::atoll(s));
  int64_t c = (mb << 20) / (std::max<int64_t>(n, 1) * elem);
  c = std::max<int64_t>(128, c / 128 * 128);  // multiples of 128 keep cuBLAS on its fast tiles
  return std::min(vocab, c);
}

// (N, vc) row-major fp32 logits chunk = hidden (N, H) @ weight[v0 : v0 + vc]^T, i.e. column-major (vc, N) =
// W_c^T' H^T', with fp32 accumulation and an fp32 C whatever the operands' dtype.
void chunk_logits(const at::Tensor& hidden, const at::Tensor& weight, int64_t v0, int64_t vc, float* out) {
  const int64_t n = hidden.size(0), h = hidden.size(1);
  const auto t = hidden.scalar_type();
  const char* w = static_cast<const char*>(weight.data_ptr()) + v0 * h * weight.element_size();
  gemm(true, false, vc, n, h, w, t, h, hidden.data_ptr(), t, h, out, at::kFloat, vc, 0.f);
}

// 16-byte fp32 loads (4 floats) when every row of the (N, vc) chunk starts 16-byte aligned; the input-dtype writes of
// the backward are then 4-element packs, aligned the same way (row stride vc).
template <typename T, typename F>
void dispatch_vec_t(int64_t vc, F&& f) {
  if (vc % 4 == 0) {
    f(T(), std::integral_constant<int, 4>());
  } else {
    f(T(), std::integral_constant<int, 1>());
  }
}

template <typename F>
void dispatch_vec(at::ScalarType st, int64_t vc, F&& f) {
  switch (st) {
    case at::kFloat: return dispatch_vec_t<float>(vc, f);
    case at::kHalf: return dispatch_vec_t<at::Half>(vc, f);
    case at::kBFloat16: return dispatch_vec_t<at::BFloat16>(vc, f);
    default: TORCH_CHECK(false, "linear_logprob (cuda): unsupported dtype ", st);
  }
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets) {
  TORCH_CHECK(hidden.is_cuda() && weight.is_cuda() && targets.is_cuda(), "linear_logprob (cuda): tensors must be CUDA");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_logprob (cuda): hidden must be (N, H) and weight (V, H), got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_logprob (cuda): hidden and weight dtypes differ");
  const auto st = hidden.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "linear_logprob (cuda): dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "linear_logprob (cuda): targets must be (N,)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprob_fwd(const at::Tensor& hidden_in,
                                                                  const at::Tensor& weight_in,
                                                                  const at::Tensor& targets_in, double inv_temp,
                                                                  bool with_entropy) {
  check_inputs(hidden_in, weight_in, targets_in);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const int64_t n = hidden.size(0), vocab = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor logprob = at::empty({n}, f32), lse = at::empty({n}, f32);
  at::Tensor entropy = at::empty({with_entropy ? n : 0}, f32);
  if (n == 0) return {logprob, entropy, lse};
  TORCH_CHECK(vocab > 0, "linear_logprob (cuda): empty vocabulary");

  const int64_t cols = chunk_cols(n, vocab, 4);
  at::Tensor buf = at::empty({n * cols}, f32);                              // (N, Vc) fp32 logits chunk, reused
  at::Tensor state = cols < vocab ? at::empty({n, 4}, f32) : at::Tensor();  // (N, {m, s, a, z_t}) across chunks
  float4* st = state.defined() ? reinterpret_cast<float4*>(state.data_ptr<float>()) : nullptr;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps));
  for (int64_t v0 = 0; v0 < vocab; v0 += cols) {
    const int64_t vc = std::min(cols, vocab - v0);
    chunk_logits(hidden, weight, v0, vc, buf.data_ptr<float>());
    const bool first = v0 == 0, last = v0 + vc >= vocab;
    dispatch_vec_t<float>(vc, [&](auto, auto vec) {
      constexpr int V = decltype(vec)::value;
      const float* zp = buf.data_ptr<float>();
      if (with_entropy) {
        lse_chunk_kernel<V, true><<<grid, kWarps * 32, 0, stream>>>(
            zp, n, int(vc), v0, targets.data_ptr<int64_t>(), float(inv_temp), st, first, last,
            logprob.data_ptr<float>(), entropy.data_ptr<float>(), lse.data_ptr<float>());
      } else {
        lse_chunk_kernel<V, false><<<grid, kWarps * 32, 0, stream>>>(
            zp, n, int(vc), v0, targets.data_ptr<int64_t>(), float(inv_temp), st, first, last,
            logprob.data_ptr<float>(), nullptr, lse.data_ptr<float>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {logprob, entropy, lse};
}

at::Tensor opt_f32(const std::optional<at::Tensor>& t, int64_t n, const char* name) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "linear_logprob_bwd (cuda): ", name, " must be (N,) = (", n,
              ",), got ", t->sizes());
  return t->to(at::kFloat).contiguous();  // upstream grads can be expanded (stride 0) views
}

std::tuple<at::Tensor, at::Tensor> linear_logprob_bwd(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                      const at::Tensor& targets_in, const at::Tensor& lse_in,
                                                      const std::optional<at::Tensor>& entropy_in,
                                                      const std::optional<at::Tensor>& grad_logprob,
                                                      const std::optional<at::Tensor>& grad_entropy,
                                                      double inv_temp) {
  check_inputs(hidden_in, weight_in, targets_in);
  const c10::cuda::CUDAGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const int64_t n = hidden.size(0), h = hidden.size(1), vocab = weight.size(0);
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(lse_in.defined(), "linear_logprob_bwd (cuda): lse (N,) from the forward is required");
  const at::Tensor lse = opt_f32(lse_in, n, "lse");
  const at::Tensor g_lp = opt_f32(grad_logprob, n, "grad_logprob");
  const at::Tensor g_ent = opt_f32(grad_entropy, n, "grad_entropy");
  at::Tensor entropy;
  if (g_ent.defined()) {
    TORCH_CHECK(entropy_in.has_value() && entropy_in->numel() == n,
                "linear_logprob_bwd (cuda): grad_entropy needs the forward's entropy (N,)");
    entropy = entropy_in->to(at::kFloat).contiguous();
  }
  at::Tensor dweight = at::empty_like(weight);
  if (n == 0 || (!g_lp.defined() && !g_ent.defined())) {
    dweight.zero_();
    return {at::zeros_like(hidden), dweight};
  }

  // dhidden accumulates in fp32 across vocabulary chunks; an fp32 input's output buffer is that accumulator.
  at::Tensor dh_acc = at::empty({n, h}, hidden.options().dtype(at::kFloat));
  const int64_t cols = chunk_cols(n, vocab, 4 + hidden.element_size());
  at::Tensor zbuf = at::empty({n * cols}, hidden.options().dtype(at::kFloat));  // (N, Vc) fp32 logits
  at::Tensor dzbuf = at::empty({n * cols}, hidden.options());                   // (N, Vc) dlogits, the GEMM operand
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>((n + kWarps - 1) / kWarps));
  const int64_t esz = weight.element_size();
  for (int64_t v0 = 0; v0 < vocab; v0 += cols) {
    const int64_t vc = std::min(cols, vocab - v0);
    chunk_logits(hidden, weight, v0, vc, zbuf.data_ptr<float>());
    dispatch_vec(dt, vc, [&](auto tag, auto vec) {
      using T = decltype(tag);
      constexpr int V = decltype(vec)::value;
      dlogits_chunk_kernel<T, V><<<grid, kWarps * 32, 0, stream>>>(
          zbuf.data_ptr<float>(), reinterpret_cast<T*>(dzbuf.data_ptr()), n, int(vc), v0, targets.data_ptr<int64_t>(),
          lse.data_ptr<float>(), entropy.defined() ? entropy.data_ptr<float>() : nullptr,
          g_lp.defined() ? g_lp.data_ptr<float>() : nullptr, g_ent.defined() ? g_ent.data_ptr<float>() : nullptr,
          float(inv_temp));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    // dW[v0:v0+vc] (vc, H) = dz^T (vc, N) @ hidden (N, H): column-major (H, vc) = H^T (H, N) . dz (N, vc)
    char* dw = static_cast<char*>(dweight.data_ptr()) + v0 * h * esz;
    gemm(false, true, h, vc, n, hidden.data_ptr(), dt, h, dzbuf.data_ptr(), dt, vc, dw, dt, h, 0.f);
    // dH (N, H) += dz (N, vc) @ W[v0:v0+vc] (vc, H): column-major (H, N) = W_c (H, vc) . dz^T (vc, N), fp32 C
    const char* w = static_cast<const char*>(weight.data_ptr()) + v0 * h * esz;
    gemm(false, false, h, n, vc, w, dt, h, dzbuf.data_ptr(), dt, vc, dh_acc.data_ptr(), at::kFloat, h,
         v0 == 0 ? 0.f : 1.f);
  }
  at::Tensor dhidden = dt == at::kFloat ? dh_acc : dh_acc.to(dt);
  return {dhidden, dweight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qlfast, m) {
  m.def("linear_logprob_fwd(Tensor hidden, Tensor weight, Tensor targets, float inv_temp, bool with_entropy) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("linear_logprob_bwd(Tensor hidden, Tensor weight, Tensor targets, Tensor lse, Tensor? entropy, "
        "Tensor? grad_logprob, Tensor? grad_entropy, float inv_temp) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qlfast, CUDA, m) {
  m.impl("linear_logprob_fwd", &linear_logprob_fwd);
  m.impl("linear_logprob_bwd", &linear_logprob_bwd);
}

}  // namespace qlfast

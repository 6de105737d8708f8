// attn_merge_: merge one block's partial attention into a running (out, lse) in place, for ring attention.
//
//   torch.ops.qlfast.attn_merge_(out (T,H,D) fp32, lse (H,T) fp32, block_out (T,H,D) any float, block_lse (H,T) fp32)
//
// Log-sigmoid form of ring-flash-attention (zhuzilin/ring-flash-attention, utils.py `_update_out_and_lse`), which
// never exponentiates a raw LSE:
//   out <- out - sigmoid(block_lse - lse) * (out - block_out)
//   lse <- lse - logsigmoid(lse - block_lse) = max(lse, block_lse) + log1p(exp(-|lse - block_lse|))
// lse = -inf (the first block, or a row that has seen no key yet) takes the block's values as they are; a block row
// with block_lse = -inf (no visible key) leaves the row unchanged and is not read. No NaN either way.
// Memory: in place, one read of block_out; one warp per (t, h) row, so the row's lse is read by all lanes before
// lane 0 overwrites it.
#include <torch/library.h>

#include <initializer_list>
#include <type_traits>

#include "common.cuh"

namespace qlfast {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(256)
    attn_merge_kernel(float* __restrict__ out, float* __restrict__ lse, const T* __restrict__ block_out,
                      const float* __restrict__ block_lse, int64_t n_tok, int64_t n_head, int64_t dim,
                      int64_t lse_s0, int64_t lse_s1, int64_t blse_s0, int64_t blse_s1) {
  const int lane = threadIdx.x & 31;
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);  // row = t * H + h
  if (row >= n_tok * n_head) return;
  const int64_t t = row / n_head, hh = row % n_head;
  float* lp = lse + hh * lse_s0 + t * lse_s1;
  const float a = *lp;
  const float b = block_lse[hh * blse_s0 + t * blse_s1];
  if (b == -INFINITY && a != -INFINITY) return;  // the block saw no key for this row: nothing to merge
  float w;                                        // weight of the block: sigmoid(b - a), computed without overflow
  float new_lse;
  if (a == -INFINITY) {
    w = 1.f;
    new_lse = b;
  } else {
    const float d = b - a;
    const float e = expf(-fabsf(d));
    w = d >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
    new_lse = fmaxf(a, b) + log1pf(e);
  }
  float* o = out + row * dim;
  const T* bo = block_out + row * dim;
  const int64_t nvec = dim / VEC;
  for (int64_t i = lane; i < nvec; i += 32) {
    Pack<float, VEC> ov = reinterpret_cast<Pack<float, VEC>*>(o)[i];
    const Pack<T, VEC> bv = reinterpret_cast<const Pack<T, VEC>*>(bo)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float x = static_cast<float>(bv.v[k]);
      ov.v[k] = (w == 1.f) ? x : ov.v[k] - w * (ov.v[k] - x);
    }
    reinterpret_cast<Pack<float, VEC>*>(o)[i] = ov;
  }
  for (int64_t j = nvec * VEC + lane; j < dim; j += 32) {
    const float x = static_cast<float>(bo[j]);
    o[j] = (w == 1.f) ? x : o[j] - w * (o[j] - x);
  }
  __syncwarp();
  if (lane == 0) *lp = new_lse;
}

void attn_merge_(const at::Tensor& out, const at::Tensor& lse, const at::Tensor& block_out_in,
                 const at::Tensor& block_lse) {
  TORCH_CHECK(out.is_cuda() && lse.is_cuda() && block_out_in.is_cuda() && block_lse.is_cuda(),
              "attn_merge_ (cuda): tensors must be CUDA");
  TORCH_CHECK(out.dim() == 3 && out.scalar_type() == at::kFloat && out.is_contiguous(),
              "attn_merge_ (cuda): out must be a contiguous fp32 (T, H, D) accumulator, got ", out.sizes(), " ",
              out.scalar_type());
  const int64_t n_tok = out.size(0), n_head = out.size(1), dim = out.size(2);
  TORCH_CHECK(block_out_in.sizes() == out.sizes(), "attn_merge_ (cuda): block_out must be (T, H, D) = ", out.sizes(),
              ", got ", block_out_in.sizes());
  for (const at::Tensor* l : std::initializer_list<const at::Tensor*>{&lse, &block_lse}) {
    TORCH_CHECK(l->dim() == 2 && l->size(0) == n_head && l->size(1) == n_tok && l->scalar_type() == at::kFloat,
                "attn_merge_ (cuda): lse and block_lse must be fp32 (H, T) = (", n_head, ", ", n_tok, "), got ",
                l->sizes(), " ", l->scalar_type());
  }
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const at::Tensor block_out = block_out_in.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = n_tok * n_head;
  const dim3 grid(static_cast<unsigned>((rows + 7) / 8));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, block_out.scalar_type(), "qlfast_attn_merge", [&] {
    // 4-wide packs when every row of out (16 B) and of block_out (4 elements) is aligned; views may be offset.
    const bool vec4 = dim % 4 == 0 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(block_out.data_ptr()) % (4 * sizeof(scalar_t)) == 0;
    auto launch = [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      attn_merge_kernel<scalar_t, V><<<grid, 256, 0, stream>>>(
          out.data_ptr<float>(), lse.data_ptr<float>(), block_out.data_ptr<scalar_t>(), block_lse.data_ptr<float>(),
          n_tok, n_head, dim, lse.stride(0), lse.stride(1), block_lse.stride(0), block_lse.stride(1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec4) {
      launch(std::integral_constant<int, 4>());
    } else {
      launch(std::integral_constant<int, 1>());
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qlfast, m) {
  m.def("attn_merge_(Tensor(a!) out, Tensor(b!) lse, Tensor block_out, Tensor block_lse) -> ()");
}

TORCH_LIBRARY_IMPL(qlfast, CUDA, m) { m.impl("attn_merge_", &attn_merge_); }

}  // namespace qlfast

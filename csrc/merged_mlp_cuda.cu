// CUDA kernel of come_fast::swiglu_mlp (the op is defined in merged_mlp.cpp).
//
//   out = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
//
// The three GEMMs go through at::mm (cuBLAS / cuBLASLt; bf16/fp16 accumulate
// in fp32). silu(gate) * up is one fused, vectorised elementwise kernel that
// writes into the gate buffer in place, so the MLP needs two [N, I]
// intermediates instead of the four of the unfused PyTorch module
// (gate, silu(gate), up, product). Math in fp32 for bf16/fp16, one rounding.
//
// Built only by setup.py's CUDAExtension path (torch with CUDA). Only light
// c10/cuda headers are used (no torch/extension.h, no pybind11).

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "merged_mlp.h"

namespace come_fast {
namespace {

template <typename T>
__device__ __forceinline__ T exp_op(T v);
template <>
__device__ __forceinline__ float exp_op<float>(float v) { return expf(v); }
template <>
__device__ __forceinline__ double exp_op<double>(double v) { return exp(v); }

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) VecT {
  scalar_t val[kVec];
};

// g[i] <- silu(g[i]) * u[i]. With kVec > 1 the pointers are 16-byte aligned
// and the first n / kVec * kVec elements use 16-byte loads/stores; the tail
// (n % kVec) is done element-wise. Grid-stride loops, int64 indices.
template <typename scalar_t, int kVec>
__global__ void silu_mul_inplace_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ u,
                                        int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_vec = n / kVec;
  auto* gv = reinterpret_cast<VecT<scalar_t, kVec>*>(g);
  const auto* uv = reinterpret_cast<const VecT<scalar_t, kVec>*>(u);
  for (int64_t i = tid; i < n_vec; i += stride) {
    VecT<scalar_t, kVec> a = gv[i];
    const VecT<scalar_t, kVec> b = uv[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const opmath_t x = static_cast<opmath_t>(a.val[j]);
      const opmath_t y = static_cast<opmath_t>(b.val[j]);
      a.val[j] = static_cast<scalar_t>(x / (opmath_t(1) + exp_op<opmath_t>(-x)) * y);
    }
    gv[i] = a;
  }
  for (int64_t i = n_vec * kVec + tid; i < n; i += stride) {
    const opmath_t x = static_cast<opmath_t>(g[i]);
    const opmath_t y = static_cast<opmath_t>(u[i]);
    g[i] = static_cast<scalar_t>(x / (opmath_t(1) + exp_op<opmath_t>(-x)) * y);
  }
}

template <typename scalar_t, int kVec>
void launch_silu_mul(scalar_t* g, const scalar_t* u, int64_t n, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t work = std::max<int64_t>(n / kVec, 1);
  // Grid-stride: cap the grid, every thread then loops.
  const int64_t blocks = std::min<int64_t>((work + kThreads - 1) / kThreads, 65535);
  silu_mul_inplace_kernel<scalar_t, kVec>
      <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(g, u, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void silu_mul_inplace_cuda(at::Tensor& gate, const at::Tensor& up) {
  const int64_t n = gate.numel();
  if (n == 0) return;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(gate.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate.scalar_type(), "swiglu_silu_mul_cuda", [&] {
    scalar_t* g = gate.data_ptr<scalar_t>();
    const scalar_t* u = up.const_data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool aligned = reinterpret_cast<uintptr_t>(g) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(u) % 16 == 0;
    if (aligned) {
      launch_silu_mul<scalar_t, kVec>(g, u, n, stream);
    } else {
      launch_silu_mul<scalar_t, 1>(g, u, n, stream);
    }
  });
}

at::Tensor swiglu_mlp_cuda(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                           const at::Tensor& w_down) {
  const int64_t inter = check_swiglu_inputs(x, w_gate, w_up, w_down);
  const c10::cuda::CUDAGuard device_guard(x.device());
  const auto out_sizes = swiglu_out_sizes(x, w_down);
  const int64_t d = x.size(-1);
  if (inter == 0 || x.numel() == 0) {
    return at::zeros(out_sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
  }
  const at::Tensor x2 = x.reshape({-1, d});
  at::Tensor gate = at::mm(x2, w_gate.t());  // [N, I], contiguous
  {
    const at::Tensor up = at::mm(x2, w_up.t());
    silu_mul_inplace_cuda(gate, up);
    // `up` goes back to the caching allocator here; stream order keeps it
    // alive until the kernel above has run.
  }
  at::Tensor out = at::mm(gate, w_down.t());
  return out.view(out_sizes);
}

}  // namespace
}  // namespace come_fast

TORCH_LIBRARY_IMPL(come_fast, CUDA, m) {
  m.impl("swiglu_mlp", &come_fast::swiglu_mlp_cuda);
}

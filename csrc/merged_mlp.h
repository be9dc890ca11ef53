// Shared declarations of the come_fast::swiglu_mlp operator (CPU and CUDA).
//
//   swiglu_mlp(x, w_gate, w_up, w_down) = (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
//
//   x       [..., d]      (any number of leading dims, may be non-contiguous)
//   w_gate  [I, d]        (nn.Linear(d, I).weight layout)
//   w_up    [I, d]
//   w_down  [d_out, I]    (nn.Linear(I, d_out).weight; d_out == d in every
//                          SwiGLU decoder, but any d_out is accepted)
//   returns [..., d_out], contiguous, same dtype/device as x.
//
// Any intermediate width I >= 0 is accepted (merged layers have odd widths
// such as 1271). I == 0 is the empty sum: the result is all zeros, which is
// exactly what an MLP whose every channel was pruned contributes.
// dtypes: float32, float64, bfloat16, float16 (all four tensors the same).
// bf16/fp16 GEMMs accumulate in fp32 (ATen/cuBLAS); silu*mul is evaluated in
// fp32 and rounded once (the unfused PyTorch path rounds twice).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace come_fast {

// Validates shapes/dtypes/devices (TORCH_CHECK) and returns I.
int64_t check_swiglu_inputs(const at::Tensor& x, const at::Tensor& w_gate,
                            const at::Tensor& w_up, const at::Tensor& w_down);

// Output sizes: x.sizes()[:-1] + [w_down.size(0)].
std::vector<int64_t> swiglu_out_sizes(const at::Tensor& x, const at::Tensor& w_down);

}  // namespace come_fast

// Host interface of the CUDA kernels (fused_cuda.cu), called by the binding (fused_cuda_bind.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "fused_job.h"

namespace bcd_cuda {

// Upper bound on the blocks of one launch on `device`: the scratch buffer for the per-block partial sums must
// hold 2 * max_blocks(device) doubles.
int max_blocks(int device);

// Runs `job` on `stream` (the caller has made `device` current). For the step forms, writes ||r||^2 and
// ||x - a||^2 (math type: float, or double for float64) to r2 and d2 through a deterministic two-stage
// reduction: per-block partials to `partials`, then one block sums them in a fixed order.
cudaError_t launch(const bcd::Job& job, int device, cudaStream_t stream, double* partials, void* r2, void* d2);

// Slices per multi-slice launch (they travel in the kernel's parameters); launch_multi splits longer lists.
constexpr int kMaxSlices = 32;

// Runs `job` over `slices` of its buffers (fused_job.h Slices), one launch per kMaxSlices slices. `partials`
// holds 2 * min(count, kMaxSlices) * max_blocks(device) doubles; r2 and d2 receive count values (math type).
cudaError_t launch_multi(const bcd::Job& job, const bcd::Slices& slices, int device, cudaStream_t stream,
                         double* partials, void* r2, void* d2);

}  // namespace bcd_cuda

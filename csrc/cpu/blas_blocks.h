// The blocked GEMM path's loop over blocks of W (csrc/cpu/ops.cpp: base_gemm, base_gemm_t): how
// many groups a block holds, and a parallel loop whose BLAS calls always run on one thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace aqlm_lora::cpu {

// BLAS libraries choose their algorithm, and so their rounding, by their thread count: MKL
// rounds the same product differently with 1 and 2 threads, even a 5x64x16 one. Inside an OpenMP
// parallel region they run on one thread, so every GEMM of the blocked path runs in one: the
// region at::parallel_for opens, or, where it would run the items inline on the calling thread
// (one item, or too little work), a region of two threads whose second one idles. Without this,
// the bits of a small layer would depend on torch.set_num_threads.
template <typename F>
inline void parallel_for_single_threaded_blas(int64_t items, int64_t grain, const F& f) {
  if (items <= 0) return;
#ifdef _OPENMP
  const bool inline_run = items <= grain || items == 1;
  if (inline_run && at::get_num_threads() > 1 && !omp_in_parallel()) {
    std::exception_ptr error;
#pragma omp parallel num_threads(2)
    if (omp_get_thread_num() == 0) {  // the calling thread: its dispatch state is the caller's
      try {
        f(0, items);
      } catch (...) {
        error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  at::parallel_for(0, items, grain, f);
}

// Groups of W per GEMM block: `per_block` (at least 1), but a weight that fits one block gets two,
// so both threads of a small layer have one.
inline int64_t groups_per_gemm_block(int64_t groups, int64_t per_block) {
  per_block = std::max<int64_t>(1, per_block);
  return per_block >= groups && groups > 1 ? (groups + 1) / 2 : per_block;
}

}  // namespace aqlm_lora::cpu

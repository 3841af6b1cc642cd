// slideformer CPU AdamW kernel (its core is cpu_adam_core.h): one pass over a layer's flat FP32 buffers that reads the gradient
// (FP32, BF16 or FP16), updates param / exp_avg / exp_avg_sq in place and writes the BF16/FP16
// upload copy of the updated param, with OpenMP threads over 256 KiB chunks (on AVX-512 CPUs one fused
// vector loop for the BF16/FP32-gradient, BF16-or-no-copy cases: adam_range_vec). The row-wise variants
// of the split embedding update are cpu_adam_rows.cpp, in the same library.
//
// Invariants:
//  * Semantics and FP32 rounding are those of torch's CPU `_fused_adamw_` (AVX2/AVX-512 build):
//    p *= f32(1 - lr*wd); m = fma(w, g - m, m) (lerp); v = fma(f32(1-b2)*g, g, v*f32(b2));
//    p += (f32(-lr/bc1) * m) / (sqrt(v) / f32(sqrt(bc2)) + f32(eps)). Every contraction is an
//    explicit std::fma and the file is compiled with -ffp-contract=off, so the compiler cannot add
//    or drop one: results do not depend on the vector width the compiler picks. The last n % 8
//    elements follow torch's scalar tail (see adam_tail), so every size matches bitwise. The row-wise
//    variants give every element the body's arithmetic (the Python side requires lengths that are
//    multiples of 8), so they match a whole-range call element for element.
//  * A plain C ABI over raw pointers, called through ctypes (which releases the GIL for the call):
//    no Python or torch headers, so it builds in about a second. The Python loader validates
//    dtypes, sizes, devices and contiguity before calling and keeps the tensors alive meanwhile.
//  * No allocation, no exceptions: the only memory written is the caller's buffers.
#include "cpu_adam_core.h"

extern "C" {

// One AdamW step over n elements, in place. Returns the number of threads that ran it, or -1 for
// an unsupported dtype code (nothing is written then).
int slideformer_adamw_step(float* p, const void* g, int grad_dtype, float* m, float* v, void* o,
                           int out_dtype, int64_t n, double lr, double beta1, double beta2,
                           double eps, double weight_decay, double step, double grad_scale,
                           int threads, int stream_out) {
  if (n <= 0) return 0;
  const Coeffs c = make_coeffs(lr, beta1, beta2, eps, weight_decay, step, grad_scale, stream_out != 0 && o != nullptr);
  return dispatch(grad_dtype, out_dtype, StepOp{{p, g, m, v, o}, n, c, threads});
}

int slideformer_has_fp16() { return kHasF16 ? 1 : 0; }

int slideformer_max_threads() { return omp_get_max_threads(); }

const char* slideformer_simd() {
  return ""
#if defined(__AVX512F__)
         "avx512f "
#endif
#if defined(__AVX2__)
         "avx2 "
#endif
#if defined(__FMA__)
         "fma "
#endif
#if defined(__F16C__)
         "f16c "
#endif
#if defined(__ARM_NEON)
         "neon "
#endif
      ;
}

}  // extern "C"


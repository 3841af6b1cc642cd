// slideformer CPU AdamW kernel: one pass over a layer's flat FP32 buffers that reads the gradient
// (FP32, BF16 or FP16), updates param / exp_avg / exp_avg_sq in place and writes the BF16/FP16
// upload copy of the updated param, with OpenMP threads over contiguous 128-byte-aligned ranges.
//
// Invariants:
//  * Semantics and FP32 rounding are those of torch's CPU `_fused_adamw_` (AVX2/AVX-512 build):
//    p *= f32(1 - lr*wd); m = fma(w, g - m, m) (lerp); v = fma(f32(1-b2)*g, g, v*f32(b2));
//    p += (f32(-lr/bc1) * m) / (sqrt(v) / f32(sqrt(bc2)) + f32(eps)). Every contraction is an
//    explicit std::fma and the file is compiled with -ffp-contract=off, so the compiler cannot add
//    or drop one: results do not depend on the vector width the compiler picks.
//  * The kernel touches raw pointers only; the Python loader validates dtypes, sizes, devices and
//    contiguity before calling, and keeps the tensors alive for the duration of the call.
//  * The GIL is released for the whole kernel; nothing here touches Python objects.
//  * No allocation: the only memory written is the caller's buffers.
#include <pybind11/pybind11.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace {

// 32 elements: 128 bytes of FP32 and 64 bytes of BF16/FP16, so no cache line is shared by two
// threads in any buffer.
constexpr int64_t kAlign = 32;
// Below this many elements per thread, waking more threads costs more than it saves.
constexpr int64_t kMinPerThread = 1 << 15;

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNone = -1 };

#if defined(__FLT16_MAX__)
constexpr bool kHasF16 = true;
using half_t = _Float16;
#else
constexpr bool kHasF16 = false;
struct half_t { uint16_t x; };  // placeholder: FP16 is refused at the Python boundary
#endif

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as c10::BFloat16; NaN becomes the canonical quiet NaN 0x7FC0.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(r);
}

template <typename T> inline float to_f32(T x);
template <> inline float to_f32<float>(float x) { return x; }
template <> inline float to_f32<uint16_t>(uint16_t x) { return bf16_to_f32(x); }
#if defined(__FLT16_MAX__)
template <> inline float to_f32<half_t>(half_t x) { return static_cast<float>(x); }
#endif

template <typename T> inline T from_f32(float x);
template <> inline uint16_t from_f32<uint16_t>(float x) { return f32_to_bf16(x); }
#if defined(__FLT16_MAX__)
template <> inline half_t from_f32<half_t>(float x) { return static_cast<half_t>(x); }
#endif

struct NoOut {};

struct Coeffs {
  float grad_scale;  // gradient multiplier (clipping coefficient)
  float decay;       // 1 - lr * weight_decay (1 when weight_decay == 0: exact no-op)
  float lerp_w;      // lerp weight for exp_avg (torch's blend: w or w - 1)
  bool lerp_small;   // |1 - beta1| < 0.5: m = fma(w, g - m, m); else m = fma(w - 1, g - m, g)
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;
  float eps;
  float neg_step;    // -lr / bias_correction1
};

// Elements per block: the FP32 staging of a BF16/FP16 gradient block stays in L1, so the kernel is
// still one pass over DRAM while each of its three loops is simple enough to auto-vectorise.
constexpr int64_t kBlock = 1024;

template <typename T>
void load_block(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f32<T>(src[i]);
}

template <typename T>
void store_block(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_f32<T>(src[i]);
}

void adam_block(float* __restrict p, const float* __restrict g, float* __restrict m,
                float* __restrict v, int64_t n, const Coeffs& c) {
  const float gs = c.grad_scale, dec = c.decay, w = c.lerp_w, b2 = c.beta2, cb2 = c.one_minus_beta2;
  const float bc2s = c.bc2_sqrt, eps = c.eps, ns = c.neg_step;
  const bool small = c.lerp_small;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    const float mi = m[i];
    const float mn = std::fma(w, gi - mi, small ? mi : gi);
    const float vn = std::fma(cb2 * gi, gi, v[i] * b2);
    const float den = std::sqrt(vn) / bc2s + eps;
    m[i] = mn;
    v[i] = vn;
    p[i] = p[i] * dec + (ns * mn) / den;
  }
}

template <typename G, typename O>
void adam_range(float* p, const G* g, float* m, float* v, O* out, int64_t n, const Coeffs& c) {
  alignas(64) float staged[kBlock];
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t len = std::min(kBlock, n - b);
    const float* gf = nullptr;
    if constexpr (std::is_same_v<G, float>) {
      gf = g + b;
    } else {
      load_block<G>(g + b, staged, len);
      gf = staged;
    }
    adam_block(p + b, gf, m + b, v + b, len, c);
    if constexpr (!std::is_same_v<O, NoOut>) store_block<O>(p + b, out + b, len);
  }
}

// torch's fused kernel runs 8-wide vectors (its AVX2 kernel, also used on AVX-512 CPUs) and a
// scalar loop over the last n % 8 elements, where the compiler contracted the second moment the
// other way: v = fma(v, b2, ((1 - b2) * g) * g). Reproduced so that any size matches bitwise.
constexpr int64_t kTorchVec = 8;

template <typename G, typename O>
void adam_tail(float* p, const G* g, float* m, float* v, O* out, int64_t n, const Coeffs& c) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = to_f32<G>(g[i]) * c.grad_scale;
    const float mi = m[i];
    const float mn = std::fma(c.lerp_w, gi - mi, c.lerp_small ? mi : gi);
    const float vn = std::fma(v[i], c.beta2, (c.one_minus_beta2 * gi) * gi);
    const float den = std::sqrt(vn) / c.bc2_sqrt + c.eps;
    m[i] = mn;
    v[i] = vn;
    p[i] = p[i] * c.decay + (c.neg_step * mn) / den;
    if constexpr (!std::is_same_v<O, NoOut>) out[i] = from_f32<O>(p[i]);
  }
}

template <typename G, typename O>
int run_body(float* p, const void* g, float* m, float* v, void* out, int64_t n, const Coeffs& c,
        int threads) {
  const G* gp = static_cast<const G*>(g);
  O* op = static_cast<O*>(out);
  int64_t want = std::max<int64_t>(1, n / kMinPerThread);
  int nt = static_cast<int>(std::min<int64_t>(std::max(threads, 1), want));
  if (nt == 1) {
    adam_range<G, O>(p, gp, m, v, op, n, c);
    return 1;
  }
  int used = nt;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    const int k = omp_get_num_threads();
    if (t == 0) used = k;
    const int64_t units = (n + kAlign - 1) / kAlign;
    const int64_t begin = std::min(n, units * t / k * kAlign);
    const int64_t end = std::min(n, units * (t + 1) / k * kAlign);
    if (end > begin) {
      adam_range<G, O>(p + begin, gp + begin, m + begin, v + begin,
                       op == nullptr ? nullptr : op + begin, end - begin, c);
    }
  }
  return used;
}

template <typename G, typename O>
int run(float* p, const void* g, float* m, float* v, void* out, int64_t n, const Coeffs& c,
        int threads) {
  const int64_t body = n - n % kTorchVec;
  const int used = body > 0 ? run_body<G, O>(p, g, m, v, out, body, c, threads) : 1;
  if (body < n) {
    adam_tail<G, O>(p + body, static_cast<const G*>(g) + body, m + body, v + body,
                    out == nullptr ? nullptr : static_cast<O*>(out) + body, n - body, c);
  }
  return used;
}

template <typename G>
int dispatch_out(int out_dtype, float* p, const void* g, float* m, float* v, void* out, int64_t n,
                 const Coeffs& c, int threads) {
  switch (out_dtype) {
    case kNone: return run<G, NoOut>(p, g, m, v, nullptr, n, c, threads);
    case kBF16: return run<G, uint16_t>(p, g, m, v, out, n, c, threads);
#if defined(__FLT16_MAX__)
    case kF16: return run<G, half_t>(p, g, m, v, out, n, c, threads);
#endif
    default: throw std::invalid_argument("cpu_adam: unsupported out dtype code");
  }
}

// Returns the number of threads that ran the kernel.
int adamw_step(std::uintptr_t param, std::uintptr_t grad, int grad_dtype, std::uintptr_t exp_avg,
               std::uintptr_t exp_avg_sq, std::uintptr_t out, int out_dtype, int64_t n, double lr,
               double beta1, double beta2, double eps, double weight_decay, double step,
               double grad_scale, int threads) {
  if (n <= 0) return 0;
  // Hyperparameters in double, then rounded to float, exactly as torch's fused CPU kernel.
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  const double w = 1.0 - beta1;
  Coeffs c;
  c.grad_scale = static_cast<float>(grad_scale);
  c.decay = weight_decay != 0.0 ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  c.lerp_small = std::fabs(static_cast<float>(w)) < 0.5f;
  c.lerp_w = c.lerp_small ? static_cast<float>(w) : static_cast<float>(w) - 1.0f;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  c.eps = static_cast<float>(eps);
  c.neg_step = static_cast<float>(-(lr / bc1));

  auto* p = reinterpret_cast<float*>(param);
  auto* m = reinterpret_cast<float*>(exp_avg);
  auto* v = reinterpret_cast<float*>(exp_avg_sq);
  const void* g = reinterpret_cast<const void*>(grad);
  void* o = reinterpret_cast<void*>(out);
  switch (grad_dtype) {
    case kF32: return dispatch_out<float>(out_dtype, p, g, m, v, o, n, c, threads);
    case kBF16: return dispatch_out<uint16_t>(out_dtype, p, g, m, v, o, n, c, threads);
#if defined(__FLT16_MAX__)
    case kF16: return dispatch_out<half_t>(out_dtype, p, g, m, v, o, n, c, threads);
#endif
    default: throw std::invalid_argument("cpu_adam: unsupported grad dtype code");
  }
}

std::string simd_flags() {
  std::string s;
#if defined(__AVX512F__)
  s += "avx512f ";
#endif
#if defined(__AVX2__)
  s += "avx2 ";
#endif
#if defined(__FMA__)
  s += "fma ";
#endif
#if defined(__F16C__)
  s += "f16c ";
#endif
#if defined(__ARM_NEON)
  s += "neon ";
#endif
  if (!s.empty()) s.pop_back();
  return s;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.doc() = "slideformer fused CPU AdamW over flat FP32 buffers (see cpu_adam.py)";
  mod.def("adamw_step", &adamw_step, pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.attr("has_fp16") = kHasF16;
  mod.attr("simd") = simd_flags();
  mod.attr("max_threads") = omp_get_max_threads();
}

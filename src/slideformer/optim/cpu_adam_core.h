// slideformer CPU AdamW kernel, shared core (included by cpu_adam.cpp and cpu_adam_rows.cpp, each its
// own translation unit of one library): dtypes and conversions, the per-element arithmetic, the range
// loops (the staged block loops, and on AVX-512 CPUs one fused vector loop), the thread pool and the
// dtype dispatch. The invariants are cpu_adam.cpp's.
#pragma once

#include <omp.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>


namespace {

// Elements per work item of the thread pool (256 KiB of each FP32 buffer): a multiple of 32, so
// no cache line of any buffer is shared by two threads.
constexpr int64_t kChunk = 1 << 16;
// Below this many elements per thread, waking more threads costs more than it saves.
constexpr int64_t kMinPerThread = kChunk;

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
  bool stream_out;   // write the copy with non-temporal stores (no read-for-ownership of `out`)
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

// The copy through an L1 staging block, then 32-byte non-temporal stores where `dst` is aligned: the
// copy buffer is written once and read next by the GPU's DMA, so it need not be read into the cache
// first. Callers end with store_fence() before the data may be read elsewhere.
template <typename T>
void store_block_stream(const float* __restrict src, T* __restrict dst, int64_t n) {
#if defined(__AVX2__)
  static_assert(sizeof(T) == 2, "16-bit copies only");
  alignas(64) T staged[kBlock];
  store_block<T>(src, staged, n);
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 31u) != 0; ++i) dst[i] = staged[i];
  for (; i + 16 <= n; i += 16) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(staged + i)));
  }
  for (; i < n; ++i) dst[i] = staged[i];
#else
  store_block<T>(src, dst, n);
#endif
}

inline void store_fence() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_sfence();
#endif
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

#if defined(__AVX512F__)
// One fused AVX-512 pass for the engine's hot cases (BF16 or FP32 gradient in; BF16 copy or none out):
// 16 elements per step straight from DRAM to registers and back, no L1 staging. Measured on this
// project's hosts (benchmarks/bench_cpu_adam.py): the staged block loops spend ~17% more time per element
// than the FP32-only kernel on one core, which is the BF16 path's whole extra cost. Each lane runs the
// element arithmetic of adam_block (same operations, same order, one IEEE rounding each), so results are
// bitwise those of the portable path.
template <typename G> constexpr bool kVecGrad = std::is_same_v<G, float> || std::is_same_v<G, uint16_t>;
template <typename O> constexpr bool kVecOut = std::is_same_v<O, NoOut> || std::is_same_v<O, uint16_t>;

template <typename G>
inline __m512 load16(const G* g) {
  if constexpr (std::is_same_v<G, float>) {
    return _mm512_loadu_ps(g);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(g));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

// f32_to_bf16 on 16 lanes: round to nearest even, NaN to 0x7FC0.
inline __m256i to_bf16_16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// Up to 16 elements of the vector loop's range with the scalar body arithmetic (its aligning lead and its rest).
template <typename G, typename O>
void adam_piece(float* p, const G* g, float* m, float* v, O* out, int64_t n, const Coeffs& c) {
  alignas(64) float gf[16];
  for (int64_t j = 0; j < n; ++j) gf[j] = to_f32<G>(g[j]);
  adam_block(p, gf, m, v, n, c);
  if constexpr (std::is_same_v<O, uint16_t>) store_block<O>(p, out, n);
}

template <typename G, typename O>
void adam_range_vec(float* p, const G* g, float* m, float* v, O* out, int64_t n, const Coeffs& c) {
  const __m512 gs = _mm512_set1_ps(c.grad_scale), dec = _mm512_set1_ps(c.decay), w = _mm512_set1_ps(c.lerp_w);
  const __m512 b2 = _mm512_set1_ps(c.beta2), cb2 = _mm512_set1_ps(c.one_minus_beta2);
  const __m512 bc2s = _mm512_set1_ps(c.bc2_sqrt), eps = _mm512_set1_ps(c.eps), ns = _mm512_set1_ps(c.neg_step);
  const bool small = c.lerp_small;
  int64_t i = 0;
  // Streamed copy stores need 32-byte alignment: the elements before `out` reaches it take the scalar body.
  if constexpr (std::is_same_v<O, uint16_t>) {
    if (c.stream_out) {
      i = std::min<int64_t>(n, ((32 - (reinterpret_cast<std::uintptr_t>(out) & 31u)) & 31u) / 2);
      if (i > 0) adam_piece<G, O>(p, g, m, v, out, i, c);
    }
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 gi = _mm512_mul_ps(load16<G>(g + i), gs);
    const __m512 mi = _mm512_loadu_ps(m + i);
    const __m512 mn = _mm512_fmadd_ps(w, _mm512_sub_ps(gi, mi), small ? mi : gi);
    const __m512 vn = _mm512_fmadd_ps(_mm512_mul_ps(cb2, gi), gi, _mm512_mul_ps(_mm512_loadu_ps(v + i), b2));
    const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vn), bc2s), eps);
    const __m512 pn = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(p + i), dec),
                                    _mm512_div_ps(_mm512_mul_ps(ns, mn), den));
    _mm512_storeu_ps(m + i, mn);
    _mm512_storeu_ps(v + i, vn);
    _mm512_storeu_ps(p + i, pn);
    if constexpr (std::is_same_v<O, uint16_t>) {
      const __m256i h = to_bf16_16(pn);
      __m256i* dst = reinterpret_cast<__m256i*>(out + i);
      if (c.stream_out && (reinterpret_cast<std::uintptr_t>(dst) & 31u) == 0) {
        _mm256_stream_si256(dst, h);
      } else {
        _mm256_storeu_si256(dst, h);
      }
    }
  }
  if (i < n) adam_piece<G, O>(p + i, g + i, m + i, v + i, out == nullptr ? nullptr : out + i, n - i, c);
  if (c.stream_out) store_fence();
}
#endif

template <typename G, typename O>
void adam_range(float* p, const G* g, float* m, float* v, O* out, int64_t n, const Coeffs& c) {
#if defined(__AVX512F__)
  if constexpr (kVecGrad<G> && kVecOut<O>) {
    adam_range_vec<G, O>(p, g, m, v, out, n, c);
    return;
  }
#endif
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
    if constexpr (!std::is_same_v<O, NoOut>) {
      if (c.stream_out) {
        store_block_stream<O>(p + b, out + b, len);
      } else {
        store_block<O>(p + b, out + b, len);
      }
    }
  }
  if (c.stream_out) store_fence();
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
  // Dynamic chunks rather than one static range per thread: a thread that loses its core (to the
  // engine's main thread, say) delays the step by one chunk, not by its whole share.
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel num_threads(nt)
  {
    if (omp_get_thread_num() == 0) used = omp_get_num_threads();
#pragma omp for schedule(dynamic, 1)
    for (int64_t ci = 0; ci < chunks; ++ci) {
      const int64_t begin = ci * kChunk;
      const int64_t end = std::min(n, begin + kChunk);
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

// Calls op.template call<G, O>() for the gradient and copy dtype codes; -1 for an unsupported code.
template <typename G, typename Op>
int dispatch_out(int out_dtype, const Op& op) {
  switch (out_dtype) {
    case kNone: return op.template call<G, NoOut>();
    case kBF16: return op.template call<G, uint16_t>();
#if defined(__FLT16_MAX__)
    case kF16: return op.template call<G, half_t>();
#endif
    default: return -1;
  }
}

template <typename Op>
int dispatch(int grad_dtype, int out_dtype, const Op& op) {
  switch (grad_dtype) {
    case kF32: return dispatch_out<float>(out_dtype, op);
    case kBF16: return dispatch_out<uint16_t>(out_dtype, op);
#if defined(__FLT16_MAX__)
    case kF16: return dispatch_out<half_t>(out_dtype, op);
#endif
    default: return -1;
  }
}

inline int threads_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>(std::max(threads, 1), std::max<int64_t>(1, n / kMinPerThread)));
}

template <typename O>
inline O* offset(void* out, int64_t i) {
  return out == nullptr ? nullptr : static_cast<O*>(out) + i;
}

// The buffers of one call: param, gradient, moments and the optional copy.
struct Buffers {
  float* p;
  const void* g;
  float* m;
  float* v;
  void* o;
};

struct StepOp {
  Buffers b;
  int64_t n;
  const Coeffs& c;
  int threads;
  template <typename G, typename O> int call() const { return run<G, O>(b.p, b.g, b.m, b.v, b.o, n, c, threads); }
};

// Hyperparameters in double, then rounded to float, exactly as torch's fused CPU kernel.
Coeffs make_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay, double step,
                   double grad_scale, bool stream_out) {
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
  c.stream_out = stream_out;
  return c;
}

}  // namespace

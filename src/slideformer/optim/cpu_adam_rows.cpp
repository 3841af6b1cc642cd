// slideformer CPU AdamW kernel, row-wise entries (one library with cpu_adam.cpp; core in cpu_adam_core.h):
// the split embedding update's two calls (runtime/embedding_split.py, optim/cpu_adam_rows.py), a range of a
// [rows, row_len] matrix with some rows skipped, and a list of rows updated from a compact gradient. Every
// element gets the body's arithmetic (the Python side requires lengths that are multiples of 8), so a row-wise
// call matches a whole-range call element for element; cpu_adam.cpp states the other invariants.
#include "cpu_adam_core.h"

namespace {

// Elements [0, n) of a row-major matrix whose element 0 is element `base` of the whole matrix, every row in
// `skip` (sorted, distinct, whole-matrix row ids) left untouched.
struct SkipRowsOp {
  Buffers b;
  int64_t n, base, row_len;
  const int64_t* skip;
  int64_t n_skip;
  const Coeffs& c;
  int threads;
  template <typename G, typename O> int call() const {
    const G* g = static_cast<const G*>(b.g);
    const int64_t* end = skip + n_skip;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    const int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t ci = 0; ci < chunks; ++ci) {
      int64_t pos = ci * kChunk;
      const int64_t stop = std::min(n, pos + kChunk);
      const int64_t* it = std::lower_bound(skip, end, (base + pos) / row_len);  // the first row not before pos
      while (pos < stop) {
        const int64_t next = it == end ? stop : std::min(stop, std::max(pos, *it * row_len - base));
        if (next > pos) adam_range<G, O>(b.p + pos, g + pos, b.m + pos, b.v + pos, offset<O>(b.o, pos), next - pos, c);
        if (it == end) break;
        pos = std::max(next, (*it + 1) * row_len - base);  // past the skipped row
        ++it;
      }
    }
    return nt;
  }
};

// Elements [lo, lo + n) of a compact row-major gradient whose row i belongs to row rows[i] of the matrices
// p, m, v (and o): each piece of a row updated in place there.
struct RowsOp {
  Buffers b;
  int64_t lo, n, row_len;
  const int64_t* rows;
  const Coeffs& c;
  int threads;
  template <typename G, typename O> int call() const {
    const G* g = static_cast<const G*>(b.g);
    const int64_t first = lo / row_len, last = (lo + n - 1) / row_len;
    const int nt = threads_for(n, threads);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
    for (int64_t i = first; i <= last; ++i) {
      const int64_t s = std::max(lo, i * row_len), e = std::min(lo + n, (i + 1) * row_len);
      const int64_t dst = rows[i] * row_len + (s - i * row_len);
      adam_range<G, O>(b.p + dst, g + (s - lo), b.m + dst, b.v + dst, offset<O>(b.o, dst), e - s, c);
    }
    return nt;
  }
};

// Whether ids[0..n) are strictly increasing and in [0, limit): checked before a row-wise call writes anything.
bool ids_ok(const int64_t* ids, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= limit || (i > 0 && ids[i] <= ids[i - 1])) return false;
  }
  return true;
}

}  // namespace

extern "C" {

// The step over elements [0, n) of a matrix range starting at element `base`, rows in `skip` untouched.
// -2 (nothing written) when `skip` is not sorted, distinct and non-negative.
int slideformer_adamw_skip_rows(float* p, const void* g, int grad_dtype, float* m, float* v, void* o,
                                int out_dtype, int64_t n, int64_t base, int64_t row_len, const int64_t* skip,
                                int64_t n_skip, double lr, double beta1, double beta2, double eps,
                                double weight_decay, double step, double grad_scale, int threads, int stream_out) {
  if (n <= 0) return 0;
  if (!ids_ok(skip, n_skip, INT64_MAX)) return -2;
  const Coeffs c = make_coeffs(lr, beta1, beta2, eps, weight_decay, step, grad_scale, stream_out != 0 && o != nullptr);
  return dispatch(grad_dtype, out_dtype, SkipRowsOp{{p, g, m, v, o}, n, base, row_len, skip, n_skip, c, threads});
}

// The step on rows rows[i] of the matrices from elements [lo, lo + n) of a compact gradient (g: element lo).
// -2 (nothing written) when the n_ids `rows` are not sorted, distinct and in [0, n_matrix_rows).
int slideformer_adamw_rows(float* p, const void* g, int grad_dtype, float* m, float* v, void* o, int out_dtype,
                           int64_t lo, int64_t n, int64_t row_len, const int64_t* rows, int64_t n_ids,
                           int64_t n_matrix_rows, double lr, double beta1, double beta2, double eps,
                           double weight_decay, double step, double grad_scale, int threads, int stream_out) {
  if (n <= 0) return 0;
  if (!ids_ok(rows, n_ids, n_matrix_rows)) return -2;
  const Coeffs c = make_coeffs(lr, beta1, beta2, eps, weight_decay, step, grad_scale, stream_out != 0 && o != nullptr);
  return dispatch(grad_dtype, out_dtype, RowsOp{{p, g, m, v, o}, lo, n, row_len, rows, c, threads});
}

}  // extern "C"

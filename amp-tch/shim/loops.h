// The arithmetic of the CPU loop path: plain loops over spans of f32/f64
// memory, compiled with -O3 -ffp-contract=off (build.rs).
//
// These loops repeat, for speed, formulas that live in Rust:
//   axpy, scale, copy, clip  the reference store's elementwise arithmetic
//                            (`d + a * s` as a separate multiply and add,
//                            never a fused multiply-add; clip coefficient
//                            min(1, max / (n + guard)) in the dtype, a NaN
//                            quotient counting as 1, as Rust's `min`);
//   sum_of_squares           amp-ndarray's `sum_of_squares` (f64, per block
//                            of 2^16 elements 8 lanes, pairwise combination,
//                            tail in order; the blocks' sums in order);
//   perturb_into             amp_core::composed::perturb_from_grads, fused.
// What ties them to the Rust originals is the test suite, bit for bit: the
// conformance property `fused_ops_match_composed` (amp-testkit; run on
// plain and flattened tch stores by tests/tch.rs) and amp-tch's
// tests/fast_path.rs, which compares every operation with amp-ndarray's
// store bit for bit. A change on either side that is not made on the other
// fails those tests.
#pragma once

#include "common.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>

namespace amp_tch {

// Independent partial sums of `sum_of_squares`, as in amp-ndarray.
constexpr size_t LANES = 8;
// Elements per block of `sum_of_squares`, as amp-ndarray's CHUNK.
constexpr int64_t SUM_BLOCK = int64_t{1} << 16;
// Elements checked between two early-exit tests of `all_finite`.
constexpr int64_t FINITE_BLOCK = 4096;

// From this many elements in all, the work of one operation is shared over
// ATen's intra-op threads (at::parallel_for, OpenMP in PyTorch's builds:
// the shim is compiled with -fopenmp). Every element is computed on its
// own, so the bits do not depend on the split; a sum of squares is split
// only at its blocks, whose sums are added in order whatever the split.
constexpr int64_t PARALLEL = int64_t{1} << 18;
// The least number of elements one thread takes of an element-wise loop.
constexpr int64_t GRAIN = int64_t{1} << 16;

// Many small tensors lie scattered in memory, and the hardware prefetcher
// only picks a stream up after a few misses in each: while one tensor is
// processed, the start of the next one is requested.
constexpr int64_t PREFETCH_BYTES = 4096;

inline void prefetch(const std::vector<Span> &v, size_t i, size_t elem) {
  if (i >= v.size()) return;
  int64_t bytes = std::min(v[i].n * static_cast<int64_t>(elem), PREFETCH_BYTES);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(v[i].p + k);
}

// Where each span starts when the spans are read as one range of
// elements: start[i], with start[v.size()] the total.
inline std::vector<int64_t> starts(const std::vector<Span> &v) {
  std::vector<int64_t> start(v.size() + 1, 0);
  for (size_t i = 0; i < v.size(); ++i) start[i + 1] = start[i] + v[i].n;
  return start;
}

// Whether an operation over `total` elements is shared over threads.
inline bool threaded(int64_t total) {
  return total >= PARALLEL && at::get_num_threads() > 1 &&
         !at::in_parallel_region();
}

// f(i, b, e) on elements [b, e) of span i, for every element of every span
// of `v` (the lead list: the others an operation reads have the same
// element counts). Below PARALLEL elements in all, span by span in order;
// from it on, the spans are taken as one range of elements and that range
// is split over threads in pieces of at least GRAIN, so that a thousand
// small tensors are shared out as one large tensor is. f is never called
// on an empty range.
template <typename F> void each_piece(const std::vector<Span> &v, const F &f) {
  std::vector<int64_t> start = starts(v);
  if (!threaded(start.back())) {
    for (size_t i = 0; i < v.size(); ++i) {
      if (v[i].n > 0) f(i, int64_t{0}, v[i].n);
    }
    return;
  }
  at::parallel_for(0, start.back(), GRAIN, [&](int64_t b, int64_t e) {
    // The last span starting at or before b is the non-empty one holding it.
    size_t i = static_cast<size_t>(
        std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1);
    while (b < e) {
      int64_t hi = std::min(e, start[i + 1]);
      if (hi > b) f(i, b - start[i], hi - start[i]);
      b = hi;
      ++i;
    }
  });
}

// f(i) for every span of `v`, each span whole on one thread (for sums,
// whose order must not depend on the split). From PARALLEL elements in
// all, the spans are cut into one run of consecutive spans per thread,
// runs of about equal element counts.
template <typename F> void each_whole(const std::vector<Span> &v, const F &f) {
  std::vector<int64_t> start = starts(v);
  const int64_t total = start.back();
  const int64_t threads = at::get_num_threads();
  if (!threaded(total) || v.size() < 2) {
    for (size_t i = 0; i < v.size(); ++i) f(i);
    return;
  }
  // Run k holds the spans from cut[k] (the first starting at or after
  // k·total/threads) up to cut[k + 1]; the last run takes the rest.
  std::vector<size_t> cut(static_cast<size_t>(threads) + 1, v.size());
  for (int64_t k = 0; k < threads; ++k) {
    int64_t at = total / threads * k + total % threads * k / threads;
    cut[k] = static_cast<size_t>(
        std::lower_bound(start.begin(), start.end() - 1, at) - start.begin());
  }
  cut[0] = 0;
  at::parallel_for(0, threads, 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      for (size_t i = cut[k]; i < cut[k + 1]; ++i) f(i);
    }
  });
}

template <typename T> void fast_copy(const std::vector<Span> &d,
                                     const std::vector<Span> &s) {
  // Overlapping views are copied first, whole, with one memmove each.
  std::vector<bool> moved(d.size(), false);
  for (size_t i = 0; i < d.size(); ++i) {
    char *dp = d[i].p;
    const char *sp = s[i].p;
    int64_t bytes = d[i].n * static_cast<int64_t>(sizeof(T));
    if (d[i].n > 0 && dp != sp && dp < sp + bytes && sp < dp + bytes) {
      std::memmove(dp, sp, static_cast<size_t>(bytes));
      moved[i] = true;
    }
  }
  each_piece(d, [&](size_t i, int64_t b, int64_t e) {
    if (b == 0) prefetch(s, i + 1, sizeof(T));
    if (moved[i] || d[i].p == s[i].p) return;
    std::memcpy(d[i].p + b * sizeof(T), s[i].p + b * sizeof(T),
                static_cast<size_t>(e - b) * sizeof(T));
  });
}

template <typename T> void scale_loop(T *__restrict__ d, int64_t n, T f) {
  for (int64_t k = 0; k < n; ++k) d[k] = d[k] * f;
}

template <typename T> void fast_scale(const std::vector<Span> &d,
                                      const double *factor) {
  each_piece(d, [&](size_t i, int64_t b, int64_t e) {
    if (b == 0) prefetch(d, i + 1, sizeof(T));
    scale_loop<T>(reinterpret_cast<T *>(d[i].p) + b, e - b,
                  static_cast<T>(factor[i]));
  });
}

// d + a * s, rounded after the multiply and after the add (-ffp-contract=off).
template <typename T>
void axpy_loop(T *__restrict__ d, const T *__restrict__ s, int64_t n, T a) {
  for (int64_t k = 0; k < n; ++k) d[k] = d[k] + a * s[k];
}

template <typename T> void fast_axpy(const std::vector<Span> &d,
                                     const std::vector<Span> &s,
                                     const double *alpha) {
  each_piece(d, [&](size_t i, int64_t b, int64_t e) {
    if (b == 0) {
      prefetch(d, i + 1, sizeof(T));
      prefetch(s, i + 1, sizeof(T));
    }
    T *dp = reinterpret_cast<T *>(d[i].p) + b;
    const T *sp = reinterpret_cast<const T *>(s[i].p) + b;
    T a = static_cast<T>(alpha[i]);
    if (dp == sp) {
      // Only reachable through aliasing views; no __restrict__ then.
      for (int64_t k = 0; k < e - b; ++k) dp[k] = dp[k] + a * dp[k];
    } else {
      axpy_loop<T>(dp, sp, e - b, a);
    }
  });
}

// d + a * s with the addend read from b (b is not d; b may be s).
template <typename T>
void axpy_from_loop(T *__restrict__ d, const T *b, const T *s, int64_t n,
                    T a) {
  for (int64_t k = 0; k < n; ++k) d[k] = b[k] + a * s[k];
}

template <typename T> void fast_axpy_from(const std::vector<Span> &d,
                                          const std::vector<Span> &b,
                                          const std::vector<Span> &s,
                                          const double *alpha) {
  each_piece(d, [&](size_t i, int64_t lo, int64_t hi) {
    if (lo == 0) {
      prefetch(b, i + 1, sizeof(T));
      prefetch(s, i + 1, sizeof(T));
    }
    axpy_from_loop<T>(reinterpret_cast<T *>(d[i].p) + lo,
                      reinterpret_cast<const T *>(b[i].p) + lo,
                      reinterpret_cast<const T *>(s[i].p) + lo, hi - lo,
                      static_cast<T>(alpha[i]));
  });
}

// Σ v(x)² in f64 over one block, as amp-ndarray's `block_sum_of_squares`:
// LANES partial sums over whole chunks, combined pairwise, plus the tail
// summed in order.
template <typename T, typename V>
double block_sum_of_squares(const T *__restrict__ p, int64_t n, const V &v) {
  double lanes[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t whole = n - n % static_cast<int64_t>(LANES);
  for (int64_t k = 0; k < whole; k += LANES) {
    for (size_t j = 0; j < LANES; ++j) {
      double x = static_cast<double>(v(p[k + j]));
      lanes[j] += x * x;
    }
  }
  double tail = 0.0;
  for (int64_t k = whole; k < n; ++k) {
    double x = static_cast<double>(v(p[k]));
    tail += x * x;
  }
  for (size_t width = LANES / 2; width >= 1; width /= 2) {
    for (size_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0] + tail;
}

// Σ v(x)² in f64 exactly as amp-ndarray's `sum_of_squares_of`: per block of
// SUM_BLOCK elements, the blocks' sums added in order. From PARALLEL
// elements on (outside a parallel region), the blocks are shared over
// ATen's threads; the bits are the same.
template <typename T, typename V>
double blocked_sum_of_squares(const T *p, int64_t n, const V &v) {
  if (n <= SUM_BLOCK) return block_sum_of_squares<T>(p, n, v);
  const int64_t blocks = (n + SUM_BLOCK - 1) / SUM_BLOCK;
  std::vector<double> sums(static_cast<size_t>(blocks));
  auto run = [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      int64_t at = k * SUM_BLOCK;
      sums[static_cast<size_t>(k)] =
          block_sum_of_squares<T>(p + at, std::min(SUM_BLOCK, n - at), v);
    }
  };
  if (threaded(n)) {
    at::parallel_for(0, blocks, 1, run);
  } else {
    run(0, blocks);
  }
  double total = 0.0;
  for (double s : sums) total += s;
  return total;
}

// Σ x² in f64 exactly as amp-ndarray's `sum_of_squares`.
template <typename T> double sum_of_squares(const T *p, int64_t n) {
  return blocked_sum_of_squares<T>(p, n, [](T x) { return x; });
}

// o[i] <- ‖s[i]‖₂ in T.
template <typename T> void norms_into(const std::vector<Span> &s, T *o) {
  each_whole(s, [&](size_t i) {
    prefetch(s, i + 1, sizeof(T));
    double sum = sum_of_squares<T>(reinterpret_cast<const T *>(s[i].p), s[i].n);
    o[i] = static_cast<T>(std::sqrt(sum));
  });
}

// A 1-D CPU tensor of the dtype T holding ‖s[i]‖₂.
template <typename T> at::Tensor fast_norms(const std::vector<Span> &s,
                                            at::ScalarType type) {
  auto out = at::empty({static_cast<int64_t>(s.size())},
                       at::TensorOptions().dtype(type));
  norms_into<T>(s, out.mutable_data_ptr<T>());
  return out;
}

// min(1, max / (norm + guard)) in T; a NaN quotient gives 1, as Rust's `min`.
template <typename T> T clip_coefficient(double max_norm, T norm, double guard) {
  const T one = static_cast<T>(1);
  T q = static_cast<T>(max_norm) / (norm + static_cast<T>(guard));
  return q < one ? q : one;
}

// `norms` holds one value per tensor of `d`, of type T, on the CPU.
template <typename T> void fast_clip(const std::vector<Span> &d,
                                     const T *norms, const double *max_norm,
                                     double guard) {
  // Only the tensors whose coefficient is not 1 are read at all.
  std::vector<Span> scaled;
  std::vector<T> coefficient;
  for (size_t i = 0; i < d.size(); ++i) {
    T c = clip_coefficient<T>(max_norm[i], norms[i], guard);
    if (c == static_cast<T>(1)) continue;
    scaled.push_back(d[i]);
    coefficient.push_back(c);
  }
  each_piece(scaled, [&](size_t i, int64_t b, int64_t e) {
    if (b == 0) prefetch(scaled, i + 1, sizeof(T));
    scale_loop<T>(reinterpret_cast<T *>(scaled[i].p) + b, e - b, coefficient[i]);
  });
}

// Σ (z·x)² in f64, z·x rounded to T first: `sum_of_squares` of the scaled
// tensor without writing it (z == 1 multiplies by nothing).
template <typename T>
double scaled_sum_of_squares(const T *p, int64_t n, T z) {
  if (z == static_cast<T>(1)) return sum_of_squares<T>(p, n);
  return blocked_sum_of_squares<T>(p, n, [z](T x) { return static_cast<T>(x * z); });
}

// theta <- theta + (z·g)·c, with snap <- theta and delta <- (z·g)·c when
// SNAP and DELTA say so. The products are rounded as the unfused sequence
// rounds them: z·g, then ·c, then the add (a factor of exactly 1, which
// the unfused sequence skips, changes nothing). Branch-free, so that it
// vectorises.
template <typename T, bool SNAP, bool DELTA>
void perturb_loop(T *__restrict__ theta, const T *__restrict__ g,
                  T *__restrict__ snap, T *__restrict__ delta, int64_t n, T z,
                  T c) {
  for (int64_t k = 0; k < n; ++k) {
    T v = (g[k] * z) * c;
    T t = theta[k];
    if constexpr (SNAP) snap[k] = t;
    if constexpr (DELTA) delta[k] = v;
    theta[k] = t + v;
  }
}

template <typename T>
void perturb_range(T *theta, const T *g, T *snap, T *delta, int64_t n, T z,
                   T c) {
  if (snap != nullptr && delta != nullptr) {
    perturb_loop<T, true, true>(theta, g, snap, delta, n, z, c);
  } else if (snap != nullptr) {
    perturb_loop<T, true, false>(theta, g, snap, nullptr, n, z, c);
  } else if (delta != nullptr) {
    perturb_loop<T, false, true>(theta, g, nullptr, delta, n, z, c);
  } else {
    perturb_loop<T, false, false>(theta, g, nullptr, nullptr, n, z, c);
  }
}

template <typename T> T *span_or_null(const std::vector<Span> *v, size_t i) {
  return v ? reinterpret_cast<T *>((*v)[i].p) : nullptr;
}

// The fused first ascent step: per tensor, the norm of z·g, the projection
// coefficient, then one pass writing θ (and the snapshot, δ).
// o[i] <- ‖z·g[i]‖₂ in T. Below PARALLEL elements in all, tensor by tensor
// (g is still in cache for its second read when the tensor is small); from
// it on, every norm first (the tensors shared out whole, or one tensor's
// blocks), then the writes split over threads as one range of elements.
template <typename T>
void perturb_into(const std::vector<Span> &theta, const std::vector<Span> &g,
                  const std::vector<Span> *snap,
                  const std::vector<Span> *delta, const double *inner_lr,
                  const double *max_norm, double guard, T *o) {
  std::vector<T> c(theta.size());
  auto norm = [&](size_t i) {
    prefetch(g, i + 1, sizeof(T));
    T z = static_cast<T>(inner_lr[i]);
    const T *gp = reinterpret_cast<const T *>(g[i].p);
    o[i] = static_cast<T>(std::sqrt(scaled_sum_of_squares<T>(gp, theta[i].n, z)));
    c[i] = clip_coefficient<T>(max_norm[i], o[i], guard);
  };
  auto write = [&](size_t i, int64_t b, int64_t e) {
    if (b == 0) prefetch(theta, i + 1, sizeof(T));
    T *s = span_or_null<T>(snap, i);
    T *d = span_or_null<T>(delta, i);
    perturb_range<T>(reinterpret_cast<T *>(theta[i].p) + b,
                     reinterpret_cast<const T *>(g[i].p) + b, s ? s + b : nullptr,
                     d ? d + b : nullptr, e - b, static_cast<T>(inner_lr[i]),
                     c[i]);
  };
  if (!threaded(starts(theta).back())) {
    for (size_t i = 0; i < theta.size(); ++i) {
      norm(i);
      if (theta[i].n > 0) write(i, 0, theta[i].n);
    }
    return;
  }
  each_whole(theta, norm);
  each_piece(theta, write);
}

template <typename T>
at::Tensor fast_perturb(const std::vector<Span> &theta,
                        const std::vector<Span> &g,
                        const std::vector<Span> *snap,
                        const std::vector<Span> *delta,
                        const double *inner_lr, const double *max_norm,
                        double guard, at::ScalarType type) {
  auto out = at::empty({static_cast<int64_t>(theta.size())},
                       at::TensorOptions().dtype(type));
  perturb_into<T>(theta, g, snap, delta, inner_lr, max_norm, guard,
                  out.mutable_data_ptr<T>());
  return out;
}

// The unsigned integer of T's width, T's exponent mask and the lowest
// exponent bit.
template <typename T> struct Bits;
template <> struct Bits<float> {
  using U = uint32_t;
  static constexpr U EXP = 0x7f800000u;
  static constexpr U ONE = 0x00800000u;
};
template <> struct Bits<double> {
  using U = uint64_t;
  static constexpr U EXP = 0x7ff0000000000000ull;
  static constexpr U ONE = 0x0010000000000000ull;
};

// true when no element of p[0..n) has an all-ones exponent (inf or NaN).
// (u & EXP) + ONE reaches the sign bit exactly when the exponent is all ones;
// OR-ing those sums needs only and/add/or, which vectorise on every x86-64
// (SSE2 has no 64-bit compare).
template <typename T> bool finite_block(const T *__restrict__ p, int64_t n) {
  using U = typename Bits<T>::U;
  U bad = 0;
  for (int64_t k = 0; k < n; ++k) {
    U u;
    std::memcpy(&u, &p[k], sizeof(U));
    bad |= (u & Bits<T>::EXP) + Bits<T>::ONE;
  }
  return (bad >> (8 * sizeof(U) - 1)) == 0;
}

// true when p[b..e) holds no inf or NaN, read FINITE_BLOCK elements at a
// time; gives up early (returning true) once `go` is false, when another
// thread has already found one.
template <typename T>
bool finite_range(const T *p, int64_t b, int64_t e,
                  const std::atomic<bool> &go) {
  for (int64_t k = b; k < e && go.load(std::memory_order_relaxed);
       k += FINITE_BLOCK) {
    if (!finite_block<T>(p + k, std::min(FINITE_BLOCK, e - k))) return false;
  }
  return true;
}

template <typename T> bool fast_all_finite(const std::vector<Span> &s) {
  // Once a thread finds an inf or NaN, every piece not yet read is skipped.
  std::atomic<bool> finite{true};
  each_piece(s, [&](size_t i, int64_t b, int64_t e) {
    if (b == 0) prefetch(s, i + 1, sizeof(T));
    if (!finite_range<T>(reinterpret_cast<const T *>(s[i].p), b, e, finite)) {
      finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

} // namespace amp_tch

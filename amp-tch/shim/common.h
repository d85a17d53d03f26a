// What every part of the amp-tch shim shares: error reporting across the
// FFI boundary, tensor lists, and the spans that the CPU loop path works on.
//
// Entry points take arrays of `at::Tensor*` (what `tch::Tensor::as_ptr`
// hands out), run under `at::NoGradGuard` (the parameters are leaves that
// require grad) and return NULL on success or a malloc'ed error message that
// the caller frees with `amp_tch_free_error`. No C++ exception crosses the
// FFI boundary.
//
// Soundness rule: no address is kept from one call to the next. Every call
// reads each tensor's data pointer, size and storage afresh, so whatever
// the caller did to the tensors in between (`set_data`, `resize_`, `set_`,
// a new `.grad`) the loops only touch memory that the tensors own now.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <type_traits>
#include <vector>

namespace amp_tch {

// Which tensors a list addresses (`TensorView` on the Rust side).
enum View : int {
  // The tensors themselves.
  PLAIN = 0,
  // Their `.grad()`; an undefined gradient reads as zeros.
  GRAD_READ = 1,
  // Their `.grad()`; an undefined gradient is first defined as zeros, so
  // that it can be written in place.
  GRAD_WRITE = 2,
};

inline char *copy_message(const char *message) {
  size_t len = std::strlen(message);
  char *out = static_cast<char *>(std::malloc(len + 1));
  if (out != nullptr) std::memcpy(out, message, len + 1);
  return out;
}

// Runs `body` with autograd off; turns any exception into a message.
template <typename F> char *guarded(F &&body) {
  try {
    at::NoGradGuard no_grad;
    body();
    return nullptr;
  } catch (const c10::Error &e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception in amp-tch shim");
  }
}

// The tensors a list addresses, as pointers: straight to the tensors (or
// their gradients) when every one is defined, which costs no reference
// count traffic; otherwise through copies that `owned` keeps (zeros for a
// gradient that is read but absent, a new zero gradient for one that is
// written).
struct TensorList {
  std::vector<const at::Tensor *> ptrs;
  std::vector<at::Tensor> owned;

  TensorList(at::Tensor **tensors, size_t n, int view) {
    ptrs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor *t = tensors[i];
      if (view != PLAIN) {
        t = &t->grad();
        if (!t->defined()) break;
      }
      ptrs.push_back(t);
    }
    if (ptrs.size() == n) return;
    owned.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &t = *tensors[i];
      if (view == PLAIN) {
        owned.push_back(t);
      } else if (t.grad().defined()) {
        owned.push_back(t.grad());
      } else if (view == GRAD_WRITE) {
        t.mutable_grad() = at::zeros_like(t, at::MemoryFormat::Contiguous);
        owned.push_back(t.grad());
      } else {
        owned.push_back(at::zeros_like(t, at::MemoryFormat::Contiguous));
      }
    }
    ptrs.clear();
    for (const auto &t : owned) ptrs.push_back(&t);
  }

  size_t size() const { return ptrs.size(); }

  // Handles sharing the tensors, for ATen's list operators.
  std::vector<at::Tensor> aten() const {
    std::vector<at::Tensor> out;
    out.reserve(ptrs.size());
    for (const auto *t : ptrs) out.push_back(*t);
    return out;
  }

  // What an in-place ATen op does to its output's version counter.
  void bump() const {
    for (const auto *t : ptrs) t->unsafeGetTensorImpl()->bump_version();
  }
};

// The memory of one tensor (or of a run of tensors lying back to back) on
// the CPU loop path. Valid only during the call that read it.
struct Span {
  char *p; // NULL when n == 0
  int64_t n;
};

// A dense, contiguous, real f32/f64 CPU tensor that plain loops may address
// through its data pointer, whose storage covers all its elements.
inline bool plain_cpu(const at::Tensor &t, at::ScalarType type) {
  if (!(t.defined() && t.layout() == at::kStrided && t.device().is_cpu() &&
        t.scalar_type() == type && t.is_contiguous() && !t.is_neg() &&
        !t.is_conj() && !t._is_zerotensor() && !t.is_inference() &&
        t.has_storage())) {
    return false;
  }
  uint64_t end = static_cast<uint64_t>(t.storage_offset() + t.numel()) *
                 static_cast<uint64_t>(t.element_size());
  return end <= t.storage().nbytes();
}

// The loop path's dtype when `ts` is a non-empty list starting with an f32
// or f64 tensor, else Undefined; `read_spans` then checks every tensor.
inline at::ScalarType loop_type(const TensorList &ts) {
  if (ts.size() == 0 || !ts.ptrs[0]->defined()) return at::ScalarType::Undefined;
  at::ScalarType type = ts.ptrs[0]->scalar_type();
  return type == at::kFloat || type == at::kDouble ? type
                                                   : at::ScalarType::Undefined;
}

// The spans of `ts` as they are now (writable ones when `write`), all of
// `type`, each with the element count of `like[i]` when given; false when
// one tensor does not qualify and the ATen path must run instead.
inline bool read_spans(const TensorList &ts, at::ScalarType type, bool write,
                       std::vector<Span> &out,
                       const std::vector<Span> *like = nullptr) {
  out.clear();
  out.reserve(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    const at::Tensor &t = *ts.ptrs[i];
    if (!plain_cpu(t, type)) return false;
    int64_t n = t.numel();
    if (like != nullptr && (*like)[i].n != n) return false;
    void *p = nullptr;
    if (n > 0) {
      p = write ? t.mutable_data_ptr() : const_cast<void *>(t.const_data_ptr());
      if (p == nullptr) return false;
    }
    out.push_back(Span{static_cast<char *>(p), n});
  }
  return true;
}

// A list of the loop path that an entry point may be given or not (a NULL
// address): a momentum buffer, AMSGrad's maximum, AMP's snapshot or δ.
struct OptionalSpans {
  std::unique_ptr<TensorList> list;
  std::vector<Span> spans;

  // Reads the list `tensors` addresses, if any, as writable spans shaped as
  // `like`; false when one of its tensors does not qualify.
  bool read(at::Tensor **tensors, size_t n, at::ScalarType type,
            const std::vector<Span> &like) {
    if (tensors == nullptr) return true;
    list = std::make_unique<TensorList>(tensors, n, PLAIN);
    return read_spans(*list, type, true, spans, &like);
  }

  // The spans, or NULL when the list was not given.
  std::vector<Span> *get() { return list ? &spans : nullptr; }

  void bump() const {
    if (list) list->bump();
  }
};

// `lists` with `optional` appended when it was given: the lists an
// elementwise entry point coalesces.
inline std::vector<std::vector<Span> *>
with_optional(std::vector<std::vector<Span> *> lists, OptionalSpans &optional) {
  if (optional.get() != nullptr) lists.push_back(optional.get());
  return lists;
}

// The frame of a loop-path entry point: `guarded`, *handled <- 0 first and
// <- 1 when `body` returns true (it ran the loop path and wrote its
// results); otherwise nothing was written and the caller runs the ATen path.
template <typename F> char *loop_entry(int *handled, F &&body) {
  return guarded([&] {
    *handled = 0;
    if (body()) *handled = 1;
  });
}

// Calls f(std::true_type{}) or f(std::false_type{}): a run-time flag as a
// template parameter of the loop it selects.
template <typename F> void with_flag(bool flag, F &&f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls `body(T{})` with T = float or double, the loop path's dtypes.
template <typename F> void by_type(at::ScalarType type, F &&body) {
  if (type == at::kFloat) {
    body(float{});
  } else {
    body(double{});
  }
}

inline size_t elem_size(at::ScalarType type) {
  return type == at::kFloat ? sizeof(float) : sizeof(double);
}

// For elementwise operations: drops empty tensors and merges tensor i + 1
// into the run before it when, in every list, it starts where that run
// ends, and its coefficients (if any) have the same bytes. With the flat
// layout that usually leaves one run per list. The lists keep equal
// lengths; `coef` (one per tensor, or NULL) is shortened alongside. `C` is
// a double or a struct of doubles (no padding, so bytes compare values).
template <typename C>
inline void coalesce_with(const std::vector<std::vector<Span> *> &lists,
                          std::vector<C> *coef, size_t elem) {
  const size_t n = (*lists.begin())->size();
  size_t out = 0;
  for (size_t i = 0; i < n; ++i) {
    bool empty = false;
    for (auto *l : lists) empty = empty || (*l)[i].n == 0;
    if (empty) continue;
    bool joins = out > 0;
    for (auto *l : lists) {
      if (!joins) break;
      const Span &last = (*l)[out - 1];
      joins = last.p + static_cast<size_t>(last.n) * elem == (*l)[i].p;
    }
    if (joins && coef != nullptr) {
      joins = std::memcmp(&(*coef)[out - 1], &(*coef)[i], sizeof(C)) == 0;
    }
    if (joins) {
      for (auto *l : lists) (*l)[out - 1].n += (*l)[i].n;
    } else {
      for (auto *l : lists) (*l)[out] = (*l)[i];
      if (coef != nullptr) (*coef)[out] = (*coef)[i];
      ++out;
    }
  }
  for (auto *l : lists) l->resize(out);
  if (coef != nullptr) coef->resize(out);
}

// `coalesce_with` for operations with one double coefficient per tensor
// (or none).
inline void coalesce(const std::vector<std::vector<Span> *> &lists,
                     std::vector<double> *coef, size_t elem) {
  coalesce_with<double>(lists, coef, elem);
}

} // namespace amp_tch

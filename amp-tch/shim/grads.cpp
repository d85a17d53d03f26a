// Gradients, buffers and the store's tensor bookkeeping: what a store does
// with tensors' `.grad()` and storages, outside the batched arithmetic.

#include "common.h"

#include <algorithm>
#include <tuple>

using namespace amp_tch;

extern "C" {

// Undefines the gradients of all n tensors (PyTorch's zero_grad with
// set_to_none=True). No kernel runs: it only drops references.
char *amp_tch_reset_grads(at::Tensor **params, size_t n) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) params[i]->mutable_grad().reset();
  });
}

// out[i] <- 1 where params[i] has a defined gradient.
char *amp_tch_grad_mask(at::Tensor **params, size_t n, unsigned char *out) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) {
      out[i] = params[i]->grad().defined() ? 1 : 0;
    }
  });
}

// params.grad <- value (a tensor of the parameter's shape, dtype and device).
char *amp_tch_set_grad(at::Tensor *param, at::Tensor *value) {
  return guarded([&] { param->mutable_grad() = value->detach(); });
}

// *out <- a new tensor holding params.grad() (an undefined tensor when
// there is none).
char *amp_tch_get_grad(at::Tensor *param, at::Tensor **out) {
  return guarded([&] { *out = new at::Tensor(param->grad()); });
}

// out[i] <- zero-filled tensors shaped like params[i], all views into one
// contiguous allocation (one allocation and one fill for the whole buffer).
char *amp_tch_alloc_like(at::Tensor **params, size_t n, at::Tensor **out) {
  return guarded([&] {
    if (n == 0) return;
    int64_t total = 0;
    for (size_t i = 0; i < n; ++i) total += params[i]->numel();
    auto flat = at::zeros({total}, params[0]->options().requires_grad(false));
    int64_t offset = 0;
    for (size_t i = 0; i < n; ++i) {
      int64_t numel = params[i]->numel();
      out[i] = new at::Tensor(
          flat.narrow(0, offset, numel).view(params[i]->sizes()));
      offset += numel;
    }
  });
}

// *found <- 1 and (*first, *second) <- two indices first < second such
// that tensors[first] and tensors[second] are the same tensor or their
// memory ranges overlap within one storage (a strided view counts as the
// whole range from its first to its last element); *found <- 0 when no
// pair does. A store over such tensors would perturb and step the shared
// elements twice. Disjoint parts of one storage (the flat layout) pass.
char *amp_tch_find_overlap(at::Tensor **tensors, size_t n, size_t *first,
                           size_t *second, int *found) {
  return guarded([&] {
    *found = 0;
    // (storage, start byte, end byte, index), for tensors with elements.
    std::vector<std::tuple<const void *, uint64_t, uint64_t, size_t>> ranges;
    std::vector<std::pair<const void *, size_t>> impls;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &t = *tensors[i];
      impls.emplace_back(t.unsafeGetTensorImpl(), i);
      if (!t.defined() || !t.has_storage() || t.numel() == 0) continue;
      int64_t last = t.storage_offset();
      for (int64_t d = 0; d < t.dim(); ++d) {
        last += (t.size(d) - 1) * std::max<int64_t>(t.stride(d), 0);
      }
      uint64_t item = static_cast<uint64_t>(t.element_size());
      ranges.emplace_back(t.storage().unsafeGetStorageImpl(),
                          static_cast<uint64_t>(t.storage_offset()) * item,
                          static_cast<uint64_t>(last + 1) * item, i);
    }
    bool any = false;
    size_t a = 0, b = 0;
    auto report = [&](size_t i, size_t j) {
      size_t lo = std::min(i, j), hi = std::max(i, j);
      if (!any || lo < a || (lo == a && hi < b)) {
        a = lo;
        b = hi;
        any = true;
      }
    };
    std::sort(impls.begin(), impls.end());
    for (size_t k = 1; k < impls.size(); ++k) {
      if (impls[k].first == impls[k - 1].first) {
        report(impls[k - 1].second, impls[k].second);
      }
    }
    std::sort(ranges.begin(), ranges.end());
    // Within one storage, sorted by start: a range overlaps an earlier one
    // exactly when it starts before the furthest end seen so far.
    for (size_t k = 1, far = 0; k < ranges.size(); ++k) {
      if (std::get<0>(ranges[k]) != std::get<0>(ranges[far])) {
        far = k;
        continue;
      }
      if (std::get<1>(ranges[k]) < std::get<2>(ranges[far])) {
        report(std::get<3>(ranges[far]), std::get<3>(ranges[k]));
      }
      if (std::get<2>(ranges[k]) > std::get<2>(ranges[far])) far = k;
    }
    if (any) {
      *first = a;
      *second = b;
      *found = 1;
    }
  });
}

} // extern "C"

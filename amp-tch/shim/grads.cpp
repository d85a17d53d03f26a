// Gradients, buffers and the store's tensor bookkeeping: what a store does
// with tensors' `.grad()` and storages, outside the batched arithmetic.

#include "common.h"

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

} // extern "C"

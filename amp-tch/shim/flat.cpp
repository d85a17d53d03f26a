// The flat layout of `TchStore::flatten`: parameters in one allocation,
// gradients in another, zeroed in place. Nothing here keeps an address:
// the store holds the two flat tensors (so their storages live as long as
// it does) and the per-parameter gradient tensors; every call reads them
// afresh.

#include "common.h"
#include "loops.h"

using namespace amp_tch;

extern "C" {

// Every params[i] becomes a view of one new contiguous allocation
// *flat_params (set_data keeps each parameter's own TensorImpl, autograd
// metadata and version counter; values are copied), and every parameter
// that requires grad gets a gradient in one zero-filled allocation
// *flat_grads, views[i] (NULL for the others). Each gradient is a tensor of
// its own over the shared storage (`set_`, not a view), so that it has its
// own version counter: autograd's in-place accumulation bumps it, which is
// how `amp_tch_flat_grad_mask` tells the tensors that received a gradient.
// Existing gradients are copied in. Everything is allocated before any
// parameter is touched.
char *amp_tch_flatten(at::Tensor **params, size_t n, at::Tensor **views,
                      at::Tensor **flat_params, at::Tensor **flat_grads) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) views[i] = nullptr;
    if (n == 0) return;
    int64_t total = 0;
    for (size_t i = 0; i < n; ++i) total += params[i]->numel();
    auto options = params[0]->options().requires_grad(false);
    auto fp = at::empty({total}, options);
    auto fg = at::zeros({total}, options);
    std::vector<at::Tensor> slots, grads;
    slots.reserve(n);
    grads.reserve(n);
    int64_t offset = 0;
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &p = *params[i];
      int64_t numel = p.numel();
      auto slot = fp.narrow(0, offset, numel).view(p.sizes());
      slot.copy_(p);
      slots.push_back(slot);
      at::Tensor g;
      if (p.requires_grad()) {
        g = at::empty({0}, options);
        g.set_(fg.storage(), fg.storage_offset() + offset, p.sizes(),
               slot.strides());
        if (p.grad().defined()) g.copy_(p.grad());
      }
      grads.push_back(g);
      offset += numel;
    }
    for (size_t i = 0; i < n; ++i) {
      params[i]->set_data(slots[i]);
      if (grads[i].defined()) {
        params[i]->mutable_grad() = grads[i];
        views[i] = new at::Tensor(grads[i]);
      } else {
        params[i]->mutable_grad().reset();
      }
    }
    *flat_params = new at::Tensor(fp);
    *flat_grads = new at::Tensor(fg);
  });
}

// zero_grad of the flat layout: re-attaches views[i] as the gradient where
// something replaced it, drops gradients of tensors without a view, zeroes
// *flat_grads in one fill and records each view's version in versions[i].
char *amp_tch_flat_zero(at::Tensor **params, at::Tensor **views, size_t n,
                        at::Tensor *flat_grads, int64_t *versions) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) {
      at::Tensor *view = views[i];
      if (view == nullptr) {
        params[i]->mutable_grad().reset();
        continue;
      }
      const at::Tensor &g = params[i]->grad();
      if (!g.defined() ||
          g.unsafeGetTensorImpl() != view->unsafeGetTensorImpl()) {
        params[i]->mutable_grad() = *view;
      }
    }
    const at::Tensor &flat = *flat_grads;
    if ((plain_cpu(flat, at::kFloat) || plain_cpu(flat, at::kDouble)) &&
        flat.numel() > 0) {
      // memset: no operator dispatch for what is a streaming write, split
      // as every loop of the shim is (`each_piece`: one call below PARALLEL
      // elements, from there pieces of at least GRAIN elements over ATen's
      // threads; one thread's stores reach a third or less of the
      // machine's write bandwidth). All-zero bits are +0.0. `plain_cpu`
      // has just checked that the storage covers the tensor.
      const size_t size = flat.element_size();
      const std::vector<Span> whole{
          Span{static_cast<char *>(flat.mutable_data_ptr()), flat.numel()}};
      each_piece(whole, [&](size_t, int64_t b, int64_t e) {
        std::memset(whole[0].p + b * size, 0,
                    static_cast<size_t>(e - b) * size);
      });
      flat.unsafeGetTensorImpl()->bump_version();
    } else {
      flat_grads->zero_();
    }
    for (size_t i = 0; i < n; ++i) {
      versions[i] = views[i] == nullptr ? 0 : views[i]->_version();
    }
  });
}

// grad_mask of the flat layout: out[i] <- 1 where params[i] received a
// gradient since amp_tch_flat_zero (its view was written, or it has a
// gradient of its own).
char *amp_tch_flat_grad_mask(at::Tensor **params, at::Tensor **views,
                             size_t n, const int64_t *versions,
                             unsigned char *out) {
  return guarded([&] {
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &g = params[i]->grad();
      at::Tensor *view = views[i];
      bool own = view != nullptr &&
                 g.unsafeGetTensorImpl() == view->unsafeGetTensorImpl();
      out[i] = g.defined() && (!own || g._version() != versions[i]) ? 1 : 0;
    }
  });
}

} // extern "C"

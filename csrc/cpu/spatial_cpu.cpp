// CPU kernels of the spatial-memory ops (declared in kernels.h). Each takes the store's six
// arrays by name and checks that they describe one consistent memory before reading them.
// Forward and backward dequantize each block once per call into a small panel and multiply it
// with the whole batch (at::mm on the panel), in parallel over panels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/packed_view.h"
#include "core/quantize.h"
#include "kernels.h"
#include "store_checks.h"
#include "store_view.h"

namespace spatium::cpu {
namespace {

// 4 MiB panels (256 rows of 4096): each at::mm packs the whole batch before it multiplies, so
// a panel must hold enough rows to amortize that (16-row panels of 4096 inputs made the
// batch-256 forward 1.4x slower than one product on the full matrix); 4 MiB still stays in L3.
constexpr int64_t kPanelFloats = int64_t{1} << 20;
constexpr int64_t kMinPanelRows = 8, kMaxPanelRows = 256;
// Weights per parallel task: below it a layer runs on one thread (a parallel region costs
// microseconds, a small layer's whole forward less).
constexpr int64_t kWeightsPerTask = int64_t{1} << 15;
// Up to this many rows, float32 products run straight from the codes (decode a block, dot it
// with each row); above, dense panels through at::mm amortize better.
constexpr int64_t kSmallBatch = 4;

using Store = StoreArrays;

// Neurons per parallel task.
int64_t neuron_grain(const PackedView& v) {
  return std::max<int64_t>(16, kWeightsPerTask / std::max<int64_t>(v.in_features, 1));
}

// Rows per panel of `height` rows of `width`: a panel fits kPanelFloats, and there are panels
// enough for every thread.
int64_t panel_rows(int64_t height, int64_t width) {
  const int64_t per_thread = (height + at::get_num_threads() - 1) / at::get_num_threads();
  return std::clamp<int64_t>(std::min(kPanelFloats / width, per_thread), kMinPanelRows,
                             kMaxPanelRows);
}

// Dequantized rows [n0, n1) as a tensor of x's dtype (fp32 panels are exact in fp64: scale is
// fp16, codes are small integers).
at::Tensor dequantized_panel(const PackedView& v, int64_t n0, int64_t n1, at::ScalarType dtype) {
  at::Tensor panel = at::empty({n1 - n0, v.in_features}, at::kFloat);
  v.dequantize_rows(n0, n1, panel.mutable_data_ptr<float>(), v.in_features);
  return dtype == at::kFloat ? panel : panel.to(dtype);
}

}  // namespace

PackedView checked_view(const StoreArrays& s, int format, int64_t in_features,
                        int64_t out_features) {
  check_store(s, out_features, c10::Device(c10::kCPU));
  PackedView v = validated_view(
      s,
      IndexArrays{s.region_begin.const_data_ptr<int64_t>(), s.bitmap.const_data_ptr<int64_t>(),
                  s.block_begin.const_data_ptr<int64_t>(), s.code_begin.const_data_ptr<int64_t>()},
      format, in_features, out_features);
  v.scales = reinterpret_cast<const uint16_t*>(s.scales.const_data_ptr<at::Half>());
  v.codes = s.codes.const_data_ptr<uint8_t>();
  return v;
}

PackedView view_of(const StoreArrays& s, int64_t format, int64_t in_features,
                   int64_t out_features) {
  return checked_view(s, checked_format(format), in_features, out_features);
}

// The small-batch kernels skip inactive blocks, where a dense product adds 0 x NaN = NaN; a
// batch with a NaN or an infinity takes the dense-panel path instead, so every batch size gives
// F.linear's result.
bool all_finite(const at::Tensor& t) {
  const float* p = t.const_data_ptr<float>();
  // An exponent of all ones is an infinity or a NaN. Integer tests on the bits, with no early
  // exit, so the loop vectorizes (std::isfinite's did not: 5x slower).
  constexpr uint32_t kExponent = 0x7f800000u;
  uint32_t special = 0;
  for (int64_t i = 0, n = t.numel(); i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    special |= static_cast<uint32_t>((bits & kExponent) == kExponent);
  }
  return special == 0;
}

at::Tensor spatial_linear(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& region_begin, const at::Tensor& bitmap,
                              const at::Tensor& block_begin, const at::Tensor& code_begin,
                              const at::Tensor& scales, const at::Tensor& codes,
                              int64_t format, int64_t out_features) {
  check_rows(x_in, "spatial_linear", "x");
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes}, format, x_in.size(1), out_features);
  // Detached: the panels run on worker threads, where grad mode is on again, and an
  // at::mm_out with an input that requires grad would refuse to run there.
  const at::Tensor x = x_in.detach().contiguous();
  const int64_t batch = x.size(0);
  at::Tensor y;
  if (x.scalar_type() == at::kFloat && batch <= kSmallBatch && all_finite(x)) {
    y = at::empty({batch, v.out_features}, x.options());
    const float* xp = x.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    at::parallel_for(0, v.out_features, neuron_grain(v), [&](int64_t n0, int64_t n1) {
      std::vector<float> scratch(static_cast<size_t>(v.scratch_floats(batch)));
      v.linear_rows(n0, n1, xp, batch, v.in_features, yp, v.out_features, scratch.data());
    });
  } else {
    const int64_t rows = panel_rows(v.out_features, v.in_features);
    const int64_t panels = (v.out_features + rows - 1) / rows;
    // y^T, so that each panel writes a contiguous block of rows.
    at::Tensor y_t = at::empty({v.out_features, batch}, x.options());
    if (batch > 0) {
      const at::Tensor x_t = x.t();
      at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n0 = p * rows, n1 = std::min(n0 + rows, v.out_features);
          at::Tensor out = y_t.narrow(0, n0, n1 - n0);
          at::mm_out(out, dequantized_panel(v, n0, n1, x.scalar_type()), x_t);
        }
      });
    }
    y = y_t.t().contiguous();
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == v.out_features,
                      "spatial_linear: bias must be [", v.out_features, "], got ", bias->sizes());
    y.add_(*bias);
  }
  return y;
}

at::Tensor spatial_linear_backward_input(const at::Tensor& grad_y_in, const at::Tensor& region_begin, const at::Tensor& bitmap,
                              const at::Tensor& block_begin, const at::Tensor& code_begin,
                              const at::Tensor& scales, const at::Tensor& codes,
                                             int64_t format, int64_t in_features) {
  check_rows(grad_y_in, "spatial_linear_backward_input", "grad_y");
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes}, format, in_features, grad_y_in.size(1));
  const at::Tensor grad_y = grad_y_in.detach().contiguous();  // as spatial_linear's x
  const int64_t batch = grad_y.size(0);
  const int64_t rows = panel_rows(v.out_features, in_features);
  const int64_t panels = (v.out_features + rows - 1) / rows;
  // grad_x = sum over panels of grad_y[:, panel] @ W_panel: one partial sum per task.
  const int64_t tasks = std::clamp<int64_t>(
      v.out_features * in_features / kWeightsPerTask, 1, std::min<int64_t>(panels, at::get_num_threads()));
  const int64_t per_task = (panels + tasks - 1) / tasks;
  std::vector<at::Tensor> partial(static_cast<size_t>(tasks));
  const bool small =
      grad_y.scalar_type() == at::kFloat && batch <= kSmallBatch && all_finite(grad_y);
  if (batch > 0) {
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        at::Tensor acc = at::zeros({batch, in_features}, grad_y.options());
        const int64_t first = t * per_task, last = std::min(panels, (t + 1) * per_task);
        if (small) {
          std::vector<float> scratch(static_cast<size_t>(v.scratch_floats(batch)));
          v.linear_t_rows(first * rows, std::min(last * rows, v.out_features),
                          grad_y.const_data_ptr<float>(), batch, v.out_features,
                          acc.mutable_data_ptr<float>(), in_features, scratch.data());
        } else {
          for (int64_t p = first; p < last; ++p) {
            const int64_t n0 = p * rows, n1 = std::min(n0 + rows, v.out_features);
            acc.addmm_(grad_y.narrow(1, n0, n1 - n0),
                       dequantized_panel(v, n0, n1, grad_y.scalar_type()));
          }
        }
        partial[static_cast<size_t>(t)] = acc;
      }
    });
  }
  at::Tensor grad_x = at::zeros({batch, in_features}, grad_y.options());
  for (const at::Tensor& p : partial) {
    if (p.defined()) grad_x.add_(p);
  }
  return grad_x;
}

at::Tensor active_mask(const at::Tensor& region_begin, const at::Tensor& bitmap,
                              const at::Tensor& block_begin, const at::Tensor& code_begin,
                              const at::Tensor& scales, const at::Tensor& codes, int64_t in_features,
                           int64_t out_features) {
  // The mask does not depend on the code width, and never reads the codes.
  const PackedView v =
      checked_view(Store{region_begin, bitmap, block_begin, code_begin, scales, codes},
                   PackedView::kCodesUnread, in_features, out_features);
  at::Tensor mask = at::empty({v.out_features, in_features}, at::kBool);
  auto* out = reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>());
  at::parallel_for(0, v.out_features, neuron_grain(v), [&](int64_t n0, int64_t n1) {
    v.active_mask_rows(n0, n1, out + n0 * in_features, in_features);
  });
  return mask;
}

at::Tensor dequantize(const at::Tensor& region_begin, const at::Tensor& bitmap,
                              const at::Tensor& block_begin, const at::Tensor& code_begin,
                              const at::Tensor& scales, const at::Tensor& codes, int64_t format,
                          int64_t in_features, int64_t out_features) {
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes}, format, in_features, out_features);
  at::Tensor dense = at::empty({v.out_features, in_features}, at::kFloat);
  float* out = dense.mutable_data_ptr<float>();
  at::parallel_for(0, v.out_features, neuron_grain(v), [&](int64_t n0, int64_t n1) {
    v.dequantize_rows(n0, n1, out + n0 * in_features, in_features);
  });
  return dense;
}

void requantize(const at::Tensor& latent_in, const at::Tensor& region_begin,
                    const at::Tensor& bitmap, const at::Tensor& block_begin,
                    const at::Tensor& code_begin, at::Tensor& scales, at::Tensor& codes,
                    int64_t format) {
  TORCH_CHECK_VALUE(latent_in.dim() == 2, "requantize_: latent must be 2-D [out, in], got ",
                    latent_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(latent_in.scalar_type()),
                   "requantize_: latent must be floating point, got ", latent_in.scalar_type());
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes},
                               format, latent_in.size(1), latent_in.size(0));
  const at::Tensor latent = latent_in.to(at::kFloat).contiguous();
  const float* w = latent.const_data_ptr<float>();
  auto* scale_out = reinterpret_cast<uint16_t*>(scales.mutable_data_ptr<at::Half>());
  uint8_t* code_out = codes.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, v.out_features, neuron_grain(v), [&](int64_t n0, int64_t n1) {
    v.quantize_rows(n0, n1, w, v.in_features, scale_out, code_out);
  });
}

}  // namespace spatium::cpu

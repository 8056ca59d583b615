// CPU kernels of the spatial-memory ops (declared in kernels.h). Each takes the store's six
// arrays by name and checks that they describe one consistent memory before reading them.
// Forward and backward dequantize each block once per call into a small panel and multiply it
// with the whole batch (at::mm on the panel), in parallel over panels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "core/packed_view.h"
#include "core/quantize.h"
#include "kernels.h"

namespace spatium::cpu {
namespace {

constexpr int64_t kPanelFloats = int64_t{1} << 16;  // 256 KiB panels: they stay in L2
// Weights per parallel task: below it a layer runs on one thread (a parallel region costs
// microseconds, a small layer's whole forward less).
constexpr int64_t kWeightsPerTask = int64_t{1} << 15;
// Up to this many rows, float32 products run straight from the codes (decode a block, dot it
// with each row); above, dense panels through at::mm amortize better.
constexpr int64_t kSmallBatch = 4;

// The store's arrays as the ops receive them.
struct Store {
  const at::Tensor& region_begin;
  const at::Tensor& bitmap;
  const at::Tensor& block_begin;
  const at::Tensor& code_begin;
  const at::Tensor& scales;
  const at::Tensor& codes;
};

void check_part(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "spatium: memory ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous() && t.device().is_cpu(),
                    "spatium: memory ", name, " must be a contiguous 1-D CPU tensor, got ",
                    t.dim(), "-D on ", t.device());
}

// Checks that the six arrays describe one consistent memory and returns the kernels' view.
PackedView view_of(const Store& s, int64_t bits, int64_t in_features, int64_t out_features) {
  TORCH_CHECK_VALUE(quant::valid_bits(static_cast<int>(bits)), "spatium: bits must be 1, 2, 4 or 8, got ",
                    bits);
  check_part(s.region_begin, at::kLong, "region_begin");
  check_part(s.bitmap, at::kLong, "bitmap");
  check_part(s.block_begin, at::kLong, "block_begin");
  check_part(s.code_begin, at::kLong, "code_begin");
  check_part(s.scales, at::kHalf, "scales");
  check_part(s.codes, at::kByte, "codes");
  const at::Tensor& region_begin = s.region_begin;
  const at::Tensor& bitmap = s.bitmap;
  const at::Tensor& block_begin = s.block_begin;
  const at::Tensor& code_begin = s.code_begin;
  const at::Tensor& scales = s.scales;
  const at::Tensor& codes = s.codes;
  PackedView v;
  v.bits = static_cast<int>(bits);
  v.num_regions = region_begin.numel() - 1;
  v.out_features = out_features;
  v.in_features = in_features;
  TORCH_CHECK_VALUE(v.num_regions >= 1 && v.out_features >= 1, "spatium: empty memory");
  TORCH_CHECK_VALUE(bitmap.numel() == bitmap_words(out_features, v.num_regions) &&
                        block_begin.numel() == directory_entries(out_features) &&
                        code_begin.numel() == directory_entries(out_features),
                    "spatium: memory arrays do not fit ", out_features, " neurons x ",
                    v.num_regions, " regions (not from one SpatialMemory?)");
  v.region_begin = region_begin.const_data_ptr<int64_t>();
  v.bitmap = reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>());
  v.block_begin = block_begin.const_data_ptr<int64_t>();
  v.code_begin = code_begin.const_data_ptr<int64_t>();
  v.scales = reinterpret_cast<const uint16_t*>(scales.const_data_ptr<at::Half>());
  v.codes = codes.const_data_ptr<uint8_t>();
  // Offsets start at 0 and never decrease, and a directory entry spans at most its 8 neurons'
  // blocks: with the checks below, every walk stays inside the arrays. O(regions + out / 8).
  bool ordered = v.region_begin[0] == 0 && v.block_begin[0] == 0 && v.code_begin[0] == 0;
  for (int64_t r = 0; ordered && r < v.num_regions; ++r) {
    ordered = v.region_begin[r] < v.region_begin[r + 1];
  }
  const int64_t entries = directory_entries(out_features);
  for (int64_t e = 0; ordered && e + 1 < entries; ++e) {
    const int64_t step = v.block_begin[e + 1] - v.block_begin[e];
    ordered = step >= 0 && step <= kDirectoryStride * v.num_regions &&
              v.code_begin[e + 1] >= v.code_begin[e];
  }
  TORCH_CHECK_VALUE(ordered, "spatium: memory offsets are not increasing from 0 (damaged?)");
  // A full region's size, as the kernels' fixed-size path wants it: the largest region, if a
  // power of two (otherwise every block takes the generic path).
  int64_t largest = 0;
  for (int64_t r = 0; r < v.num_regions; ++r) largest = std::max(largest, v.region_size(r));
  v.full_region_bits = (largest & (largest - 1)) == 0 ? __builtin_ctzll(largest) : -1;
  TORCH_CHECK_VALUE(v.region_begin[v.num_regions] == in_features, "spatium: memory covers ",
                    v.region_begin[v.num_regions], " inputs, the input has ", in_features);
  TORCH_CHECK_VALUE(scales.numel() == v.total_blocks() && codes.numel() == v.total_code_bytes(),
                    "spatium: memory arrays disagree in size (not from one SpatialMemory?)");
  // The bitmap holds exactly the directory's blocks, all within out x regions bits: every walk
  // stays inside the arrays. (One pass of popcounts: microseconds.)
  const int64_t used_bits = out_features * v.num_regions;
  const int64_t words = bitmap.numel();
  int64_t blocks = 0;
  for (int64_t w = 0; w < words; ++w) blocks += __builtin_popcountll(v.bitmap[w]);
  const int64_t tail_bits = used_bits - (words - 1) * 64;
  TORCH_CHECK_VALUE(blocks == v.total_blocks() && (tail_bits == 64 || v.bitmap[words - 1] >> tail_bits == 0),
                    "spatium: memory arrays do not fit ", out_features, " neurons x ",
                    v.num_regions, " regions (not from one SpatialMemory?)");
  return v;
}

void check_input(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": ", name, " must be 2-D [batch, features], got ",
                    x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ",
                   name, " must be float32 or float64, got ", x.scalar_type());
}

// Neurons per parallel task.
int64_t neuron_grain(const PackedView& v) {
  return std::max<int64_t>(16, kWeightsPerTask / std::max<int64_t>(v.in_features, 1));
}

// Rows per panel: a panel of rows x width floats fits kPanelFloats.
int64_t panel_rows(int64_t width) { return std::clamp<int64_t>(kPanelFloats / width, 8, 256); }

// Dequantized rows [n0, n1) as a tensor of x's dtype (fp32 panels are exact in fp64: scale is
// fp16, codes are small integers).
at::Tensor dequantized_panel(const PackedView& v, int64_t n0, int64_t n1, at::ScalarType dtype) {
  at::Tensor panel = at::empty({n1 - n0, v.in_features}, at::kFloat);
  v.dequantize_rows(n0, n1, panel.mutable_data_ptr<float>(), v.in_features);
  return dtype == at::kFloat ? panel : panel.to(dtype);
}

}  // namespace

at::Tensor spatial_linear(const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& region_begin, const at::Tensor& bitmap,
                              const at::Tensor& block_begin, const at::Tensor& code_begin,
                              const at::Tensor& scales, const at::Tensor& codes,
                              int64_t bits, int64_t out_features) {
  check_input(x_in, "spatial_linear", "x");
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes}, bits, x_in.size(1), out_features);
  const at::Tensor x = x_in.contiguous();
  const int64_t batch = x.size(0);
  at::Tensor y;
  if (x.scalar_type() == at::kFloat && batch <= kSmallBatch) {
    y = at::empty({batch, v.out_features}, x.options());
    const float* xp = x.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    at::parallel_for(0, v.out_features, neuron_grain(v), [&](int64_t n0, int64_t n1) {
      std::vector<float> scratch(static_cast<size_t>(v.scratch_floats(batch)));
      v.linear_rows(n0, n1, xp, batch, v.in_features, yp, v.out_features, scratch.data());
    });
  } else {
    const int64_t rows = panel_rows(v.in_features);
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
                                             int64_t bits, int64_t in_features) {
  check_input(grad_y_in, "spatial_linear_backward_input", "grad_y");
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes}, bits, in_features, grad_y_in.size(1));
  const at::Tensor grad_y = grad_y_in.contiguous();
  const int64_t batch = grad_y.size(0);
  const int64_t rows = panel_rows(in_features);
  const int64_t panels = (v.out_features + rows - 1) / rows;
  // grad_x = sum over panels of grad_y[:, panel] @ W_panel: one partial sum per task.
  const int64_t tasks = std::clamp<int64_t>(
      v.out_features * in_features / kWeightsPerTask, 1, std::min<int64_t>(panels, at::get_num_threads()));
  const int64_t per_task = (panels + tasks - 1) / tasks;
  std::vector<at::Tensor> partial(static_cast<size_t>(tasks));
  const bool small = grad_y.scalar_type() == at::kFloat && batch <= kSmallBatch;
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
  // The mask does not depend on the code width; 8 only satisfies the view's check.
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes}, 8, in_features, out_features);
  at::Tensor mask = at::empty({v.out_features, in_features}, at::kBool);
  auto* out = reinterpret_cast<uint8_t*>(mask.mutable_data_ptr<bool>());
  at::parallel_for(0, v.out_features, neuron_grain(v), [&](int64_t n0, int64_t n1) {
    v.active_mask_rows(n0, n1, out + n0 * in_features, in_features);
  });
  return mask;
}

at::Tensor dequantize(const at::Tensor& region_begin, const at::Tensor& bitmap,
                              const at::Tensor& block_begin, const at::Tensor& code_begin,
                              const at::Tensor& scales, const at::Tensor& codes, int64_t bits,
                          int64_t in_features, int64_t out_features) {
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes}, bits, in_features, out_features);
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
                    int64_t bits) {
  TORCH_CHECK_VALUE(latent_in.dim() == 2, "requantize_: latent must be 2-D [out, in], got ",
                    latent_in.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(latent_in.scalar_type()),
                   "requantize_: latent must be floating point, got ", latent_in.scalar_type());
  const PackedView v = view_of(Store{region_begin, bitmap, block_begin, code_begin, scales, codes},
                               bits, latent_in.size(1), latent_in.size(0));
  // The only op that writes into the arrays: the codes must hold exactly this width's bytes for
  // the active blocks, or a width other than the store's would write past them. O(blocks),
  // small next to quantizing every weight.
  std::vector<int64_t> blocks_in_region(static_cast<size_t>(v.num_regions), 0);
  for (int64_t n = 0; n < v.out_features; ++n) {
    v.for_each_region(n, [&](int64_t r) { ++blocks_in_region[static_cast<size_t>(r)]; });
  }
  int64_t bytes = 0;
  for (int64_t r = 0; r < v.num_regions; ++r) {
    bytes += blocks_in_region[static_cast<size_t>(r)] * v.region_bytes(r);
  }
  TORCH_CHECK_VALUE(bytes == v.total_code_bytes(), "requantize_: the codes hold ",
                    v.total_code_bytes(), " bytes, ", bits, "-bit codes of its blocks need ",
                    bytes, " (bits differ from the store's?)");
  const at::Tensor latent = latent_in.to(at::kFloat).contiguous();
  const float* w = latent.const_data_ptr<float>();
  auto* scale_out = reinterpret_cast<uint16_t*>(scales.mutable_data_ptr<at::Half>());
  uint8_t* code_out = codes.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, v.out_features, neuron_grain(v), [&](int64_t n0, int64_t n1) {
    v.quantize_rows(n0, n1, w, v.in_features, scale_out, code_out);
  });
}

}  // namespace spatium::cpu

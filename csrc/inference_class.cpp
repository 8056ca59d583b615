// torch.classes.spatium.InferencePack: a layer's store re-laid for the integer inference kernels
// (core/inference_pack.h), built from the store's arrays and held by the layer as a cache. Its
// linear() is the int8-activation forward of an eval layer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "core/inference_pack.h"
#include "cpu/store_view.h"
#include "errors.h"

namespace spatium {
namespace {

// Weights per parallel task, as the float kernels use.
constexpr int64_t kWeightsPerTask = int64_t{1} << 15;

// The pack of a store's six arrays. It keeps them and the version each had when it was built,
// and builds again when one moved (a re-quantization, a rewire, a load writing in place), so the
// layer only checks that its store still holds the same arrays.
class PackHolder : public torch::CustomClassHolder {
 public:
  PackHolder(std::array<at::Tensor, 6> arrays, int64_t format, int64_t in_features,
             int64_t out_features)
      : arrays_(std::move(arrays)),
        format_(format),
        in_features_(in_features),
        out_features_(out_features) {
    current();  // a store the kernels cannot take is refused here, not at the first forward
  }

  // x W^T + bias for a float32 [batch, in_features] x, activations quantized to int8; nullopt
  // for an input holding NaN or an infinity (the float path gives F.linear's result there).
  std::optional<at::Tensor> linear(const at::Tensor& x_in, const std::optional<at::Tensor>& bias) {
    const std::shared_ptr<const InferencePack> held = current();
    const InferencePack& pack = *held;
    TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat &&
                          x_in.dim() == 2 && x_in.size(1) == pack.in_features(),
                      "InferencePack.linear: x must be a float32 CPU tensor [batch, ",
                      pack.in_features(), "], got ", x_in.scalar_type(), " ", x_in.sizes(),
                      " on ", x_in.device());
    if (bias.has_value()) {
      TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == at::kFloat &&
                            bias->dim() == 1 && bias->size(0) == pack.out_features(),
                        "InferencePack.linear: bias must be float32 [", pack.out_features(),
                        "], got ", bias->scalar_type(), " ", bias->sizes());
    }
    const at::Tensor x = x_in.contiguous();
    const int64_t batch = x.size(0);
    InferencePack::Rows rows;
    if (!pack.quantize(x.const_data_ptr<float>(), batch, pack.in_features(), rows)) {
      return std::nullopt;
    }
    at::Tensor y = at::empty({batch, pack.out_features()}, x.options());
    if (batch > 0) {
      const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
      const float* bias_data = b.defined() ? b.const_data_ptr<float>() : nullptr;
      const int64_t neurons = pack.out_features();
      float* out = y.mutable_data_ptr<float>();
      const int64_t per_group = InferencePack::kGroup * pack.in_features() * batch;
      const int64_t grain = std::max<int64_t>(1, kWeightsPerTask / std::max<int64_t>(per_group, 1));
      at::parallel_for(0, pack.groups(), grain, [&](int64_t g0, int64_t g1) {
        pack.linear_groups(g0, g1, rows, bias_data, out, neurons);
      });
    }
    return y;
  }

  int64_t bytes() { return current()->bytes(); }

 private:
  std::array<int64_t, 6> versions() const {
    std::array<int64_t, 6> versions{};
    for (size_t i = 0; i < arrays_.size(); ++i) versions[i] = static_cast<int64_t>(arrays_[i]._version());
    return versions;
  }

  // The pack for the arrays as they are now. Forwards on several threads share one; a build
  // happens under the lock, and a forward keeps the pack it started with.
  std::shared_ptr<const InferencePack> current() {
    const std::lock_guard<std::mutex> lock(mutex_);
    const std::array<int64_t, 6> now = versions();
    if (pack_ == nullptr || now != built_at_) {
      const auto& [region_begin, bitmap, block_begin, code_begin, scales, codes] = arrays_;
      const PackedView v =
          cpu::view_of(StoreArrays{region_begin, bitmap, block_begin, code_begin, scales, codes},
                       format_, in_features_, out_features_);
      pack_ = with_python_errors([&] { return std::make_shared<const InferencePack>(v); });
      built_at_ = now;
    }
    return pack_;
  }

  const std::array<at::Tensor, 6> arrays_;
  const int64_t format_, in_features_, out_features_;
  std::mutex mutex_;
  std::array<int64_t, 6> built_at_{};
  std::shared_ptr<const InferencePack> pack_;
};

c10::intrusive_ptr<PackHolder> build(const at::Tensor& region_begin, const at::Tensor& bitmap,
                                     const at::Tensor& block_begin, const at::Tensor& code_begin,
                                     const at::Tensor& scales, const at::Tensor& codes,
                                     int64_t format, int64_t in_features, int64_t out_features) {
  TORCH_CHECK(InferencePack::cpu_supported(),
              "InferencePack: this CPU has neither AVX-512 VNNI nor AVX2 with FMA and F16C; the "
              "float kernels serve it");
  return c10::make_intrusive<PackHolder>(
      std::array<at::Tensor, 6>{region_begin, bitmap, block_begin, code_begin, scales, codes},
      format, in_features, out_features);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spatium, m) {
  m.class_<PackHolder>("InferencePack")
      .def(torch::init(&build))
      .def_static("supported", [] { return InferencePack::cpu_supported(); })
      .def_static("isa",
                  [] { return std::string(InferencePack::isa_name(InferencePack::best_isa())); })
      .def("linear", &PackHolder::linear)
      .def("nbytes", &PackHolder::bytes);
}

}  // namespace spatium

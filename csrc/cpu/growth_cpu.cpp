// Statistics growth and pruning read, updated in training forwards: per neuron, an
// EMA of the share of samples with a non-zero output and an EMA of the mean output. One pass
// over the batch and no temporaries, so it costs little next to the layer's matmul.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels.h"

namespace spatium::cpu {
namespace {

// Outputs per parallel task: a small batch runs on the calling thread.
constexpr int64_t kOutputsPerTask = int64_t{1} << 16;

}  // namespace

void track_activity(const at::Tensor& output, at::Tensor& activity, at::Tensor& output_mean,
                        double momentum) {
  TORCH_CHECK_VALUE(output.dim() == 2, "track_activity_: output must be [batch, neurons], got ",
                    output.sizes());
  const int64_t rows = output.size(0), neurons = output.size(1);
  for (const at::Tensor* t : {&activity, &output_mean}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == neurons && t->is_contiguous(),
                      "track_activity_: statistics must be contiguous [", neurons, "], got ",
                      t->sizes());
  }
  TORCH_CHECK_TYPE(at::isFloatingType(output.scalar_type()),
                   "track_activity_: output must be floating point, got ", output.scalar_type());
  TORCH_CHECK_TYPE(activity.scalar_type() == output_mean.scalar_type() &&
                       (activity.scalar_type() == at::kFloat || activity.scalar_type() == at::kDouble),
                   "track_activity_: activity and output_mean must both be float32 or float64, "
                   "got ", activity.scalar_type(), " and ", output_mean.scalar_type());
  TORCH_CHECK_VALUE(0.0 <= momentum && momentum <= 1.0, "track_activity_: momentum must be in "
                    "[0, 1], got ", momentum);
  if (rows == 0) return;
  const at::Tensor out = output.contiguous();
  std::vector<double> nonzero(static_cast<size_t>(neurons)), sum(static_cast<size_t>(neurons));
  const int64_t grain = std::max<int64_t>(1, kOutputsPerTask / rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "track_activity_",
                                  [&] {
    const scalar_t* y = out.const_data_ptr<scalar_t>();
    at::parallel_for(0, neurons, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* row = y + r * neurons;
        for (int64_t n = begin; n < end; ++n) {
          const double v = static_cast<double>(row[n]);
          nonzero[n] += v != 0.0;
          sum[n] += v;
        }
      }
    });
  });
  AT_DISPATCH_FLOATING_TYPES(activity.scalar_type(), "track_activity_", [&] {
    scalar_t* a = activity.data_ptr<scalar_t>();
    scalar_t* m = output_mean.data_ptr<scalar_t>();
    const double keep = 1.0 - momentum, scale = momentum / static_cast<double>(rows);
    for (int64_t n = 0; n < neurons; ++n) {
      a[n] = static_cast<scalar_t>(keep * a[n] + scale * nonzero[n]);
      m[n] = static_cast<scalar_t>(keep * m[n] + scale * sum[n]);
    }
  });
}

}  // namespace spatium::cpu

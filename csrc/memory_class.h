// The spatial memory as a torch custom class: torch.classes.spatium.SpatialMemory.
#pragma once

#include <torch/custom_class.h>

#include "core/spatial_memory.h"

namespace spatium {

struct MemoryHolder : torch::CustomClassHolder {
  explicit MemoryHolder(SpatialMemory m) : memory(std::move(m)) {}
  SpatialMemory memory;
};

}  // namespace spatium

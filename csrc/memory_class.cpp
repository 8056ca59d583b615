// torch.classes.spatium.SpatialMemory: the torch-free store on the host, reachable from Python.
// A layer keeps its store as tensors (buffers on the layer's device); this class builds and
// checks those arrays on the host: a new layout, layout changes (growth, rewiring), validation
// of a saved state, the bloom filter, stats and the point API. parts() and from_parts() are the
// way in and out.
#include "memory_class.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <string>

#include "errors.h"

namespace spatium {
namespace {

using Holder = c10::intrusive_ptr<MemoryHolder>;

template <class T>
std::vector<T> to_vector(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "SpatialMemory: ", name, " must be ", dtype,
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, "SpatialMemory: ", name, " must be 1-D, got ", t.sizes());
  const at::Tensor c = t.to(at::kCPU).contiguous();
  const auto* data = static_cast<const T*>(c.const_data_ptr());
  return std::vector<T>(data, data + c.numel());
}

template <class T>
at::Tensor copy_of(const std::vector<T>& values, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(dtype));
  if (!values.empty()) std::memcpy(out.data_ptr(), values.data(), values.size() * sizeof(T));
  return out;
}

Holder make(int64_t out_features, const at::Tensor& input_codes, int64_t format,
            int64_t region_bits) {
  auto codes = to_vector<uint64_t>(input_codes, at::kLong, "input_codes");
  return with_python_errors([&] {
    return c10::make_intrusive<MemoryHolder>(SpatialMemory(
        out_features, std::move(codes), static_cast<int>(format), static_cast<int>(region_bits)));
  });
}

// The saved state: every array the store holds, by name. input_codes, bitmap, scales and codes
// define the memory; the others are derived from them and checked on load, so the state's size
// is the memory's.
using Parts = c10::Dict<std::string, at::Tensor>;

Parts parts(const Holder& self) {
  const SpatialMemory& m = self->memory;
  Parts out;
  out.insert("input_codes", copy_of(m.stored_input_codes(), at::kLong));
  out.insert("region_keys", copy_of(m.region_keys(), at::kLong));
  out.insert("region_begin", copy_of(m.region_begins(), at::kLong));
  out.insert("bitmap", copy_of(m.bitmap(), at::kLong));
  out.insert("block_begin", copy_of(m.block_begin(), at::kLong));
  out.insert("code_begin", copy_of(m.code_begin(), at::kLong));
  out.insert("scales", copy_of(m.scales(), at::kHalf));
  out.insert("codes", copy_of(m.codes(), at::kByte));
  out.insert("bloom", copy_of(m.bloom().serialize(), at::kByte));
  return out;
}

const at::Tensor& part(const Parts& p, const std::string& name) {
  const auto found = p.find(name);
  TORCH_CHECK_VALUE(found != p.end(), "SpatialMemory: the state has no ", name);
  return found->value();
}

Holder from_parts(int64_t out_features, int64_t in_features, int64_t format, int64_t region_bits,
                  const Parts& p) {
  auto input = to_vector<uint64_t>(part(p, "input_codes"), at::kLong, "input_codes");
  auto bitmap = to_vector<uint64_t>(part(p, "bitmap"), at::kLong, "bitmap");
  auto scales = to_vector<uint16_t>(part(p, "scales"), at::kHalf, "scales");
  auto codes = to_vector<uint8_t>(part(p, "codes"), at::kByte, "codes");
  auto holder = with_python_errors([&] {
    return c10::make_intrusive<MemoryHolder>(SpatialMemory::from_parts(
        out_features, in_features, std::move(input), static_cast<int>(format),
        static_cast<int>(region_bits), std::move(bitmap), std::move(scales), std::move(codes)));
  });
  const Parts rebuilt = parts(holder);
  for (const char* name : {"region_keys", "region_begin", "block_begin", "code_begin", "bloom"}) {
    const at::Tensor& given = part(p, name);
    const at::Tensor& derived = rebuilt.at(name);
    TORCH_CHECK_VALUE(given.scalar_type() == derived.scalar_type() && given.dim() == 1 &&
                          at::equal(given.to(at::kCPU), derived),
                      "SpatialMemory: ", name, " disagrees with the memory (damaged)");
  }
  TORCH_CHECK_VALUE(p.size() == rebuilt.size(), "SpatialMemory: a state has ", rebuilt.size(),
                    " parts, got ", p.size());
  return holder;
}

int64_t state_bytes(const Holder& self) {
  int64_t total = 0;
  for (const auto& entry : parts(self)) total += entry.value().numel() * entry.value().element_size();
  return total;
}

void set_active(const Holder& self, const at::Tensor& mask) {
  SpatialMemory& m = self->memory;
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == m.out_features() &&
                        mask.size(1) == m.num_regions(),
                    "SpatialMemory.set_active: mask must be [", m.out_features(), ", ",
                    m.num_regions(), "] (neurons x regions), got ", mask.sizes());
  const at::Tensor bytes = mask.to(at::kCPU, at::kByte).contiguous();
  with_python_errors([&] { m.set_active(bytes.const_data_ptr<uint8_t>()); });
}

// Per-neuron stats [out, 5]: total_capacity, used_capacity, nonzero, active_regions, bytes.
at::Tensor neuron_stats(const Holder& self) {
  const SpatialMemory& m = self->memory;
  at::Tensor out = at::empty({m.out_features(), 5}, at::kLong);
  auto* row = out.mutable_data_ptr<int64_t>();
  for (int64_t n = 0; n < m.out_features(); ++n, row += 5) {
    const MemoryStats s = m.neuron_stats(n);
    row[0] = s.total_capacity;
    row[1] = s.used_capacity;
    row[2] = s.nonzero;
    row[3] = s.active_regions;
    row[4] = s.bytes;
  }
  return out;
}

std::vector<int64_t> layer_stats(const Holder& self) {
  const MemoryStats s = self->memory.stats();
  return {s.total_capacity, s.used_capacity, s.nonzero, s.active_regions, s.bytes};
}

uint64_t code_arg(int64_t code) {
  TORCH_CHECK_VALUE(code >= 0 && static_cast<uint64_t>(code) < (uint64_t{1} << 48),
                    "SpatialMemory: Morton code must be in [0, 2^48), got ", code);
  return static_cast<uint64_t>(code);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(spatium, m) {
  m.class_<MemoryHolder>("SpatialMemory")
      .def(torch::init(&make))
      .def_static("from_parts", &from_parts)
      .def("out_features", [](const Holder& self) { return self->memory.out_features(); })
      .def("in_features", [](const Holder& self) { return self->memory.in_features(); })
      .def("format", [](const Holder& self) { return int64_t{self->memory.format()}; })
      .def("region_bits", [](const Holder& self) { return int64_t{self->memory.region_bits()}; })
      .def("num_regions", [](const Holder& self) { return self->memory.num_regions(); })
      .def("active_blocks", [](const Holder& self) { return self->memory.active_blocks(); })
      .def("parts", &parts)
      .def("set_active", &set_active)
      .def("contains",
           [](const Holder& self, int64_t neuron, int64_t code) {
             return with_python_errors([&] { return self->memory.contains(neuron, code_arg(code)); });
           })
      .def("read",
           [](const Holder& self, int64_t neuron, int64_t code) {
             return with_python_errors(
                 [&] { return static_cast<double>(self->memory.read(neuron, code_arg(code))); });
           })
      .def("write",
           [](const Holder& self, int64_t neuron, int64_t code, double value) {
             with_python_errors(
                 [&] { self->memory.write(neuron, code_arg(code), static_cast<float>(value)); });
           })
      .def("select_neurons",
           [](const Holder& self, const at::Tensor& rows) {
             auto picked = to_vector<int64_t>(rows, at::kLong, "rows");
             return with_python_errors([&] {
               return c10::make_intrusive<MemoryHolder>(self->memory.select_neurons(picked));
             });
           })
      .def("neuron_stats", &neuron_stats)
      .def("stats", &layer_stats)
      .def("bloom_bytes",
           [](const Holder& self) { return static_cast<int64_t>(self->memory.bloom().size_bytes()); })
      .def("state_bytes", &state_bytes)
      .def("checksum",
           [](const Holder& self) { return static_cast<int64_t>(self->memory.checksum()); })
      .def_pickle(
          [](const Holder& self) {
            const SpatialMemory& mem = self->memory;
            return std::make_tuple(mem.out_features(), mem.in_features(), int64_t{mem.format()},
                                   int64_t{mem.region_bits()}, parts(self));
          },
          [](std::tuple<int64_t, int64_t, int64_t, int64_t, Parts> state) {
            const auto& [out, in, format, region_bits, p] = state;
            return from_parts(out, in, format, region_bits, p);
          });
}

}  // namespace spatium

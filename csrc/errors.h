// Runs core (torch-free) code and turns its std exceptions into the Python exceptions a PyTorch
// user expects: std::invalid_argument -> ValueError, std::out_of_range -> IndexError.
#pragma once

#include <c10/util/Exception.h>

#include <stdexcept>

namespace spatium {

template <class Fn>
auto with_python_errors(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const std::out_of_range& e) {
    TORCH_CHECK_INDEX(false, e.what());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

}  // namespace spatium

// The Python module spatium_torch._C. It holds no Python functions: importing it loads the
// shared library, whose static initializers register the ops with the PyTorch dispatcher.
#include <Python.h>

extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "spatium_torch ops (see torch.ops.spatium)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}

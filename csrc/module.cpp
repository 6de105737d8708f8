// qlfast._C: the Python module that loads the CUDA ops. Importing it runs the TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL registrations in the other translation units, after which torch.ops.qlfast.* exist.
// No Python bindings live here (the ops are called through torch.ops), so there is no pybind11: a bare module.
// The module name is TORCH_EXTENSION_NAME (set by torch's build: `_C` for setup.py, the name given to a JIT load).
#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define QLFAST_STR2(x) #x
#define QLFAST_STR(x) QLFAST_STR2(x)
#define QLFAST_INIT2(name) PyInit_##name
#define QLFAST_INIT(name) QLFAST_INIT2(name)

extern "C" PyObject* QLFAST_INIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, QLFAST_STR(TORCH_EXTENSION_NAME),
                            "qlfast CUDA ops (registered as torch.ops.qlfast.*)", -1, nullptr};
  return PyModule_Create(&def);
}

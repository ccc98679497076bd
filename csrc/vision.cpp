// The Python module align_detr._C. It has no functions: importing it loads this library, whose
// static initialisers register the operators torch.ops.align_detr.* with the dispatcher.
//
// Layout convention: each op's schema (TORCH_LIBRARY_FRAGMENT) and its input validation live in
// csrc/<area>/<op>_ops.cpp; its kernels register per dispatch key (TORCH_LIBRARY_IMPL) in
// <op>_cpu.cpp / <op>_cuda.cu. Fake kernels and autograd are registered in Python, all in
// align_detr/_ext.py, so torch.compile and torch.export can trace models that call the ops.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

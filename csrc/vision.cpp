// Operator schemas of align_detr._C. Kernels register themselves per dispatch key in their own
// files (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered in Python
// (align_detr/_ext.py) so torch.compile and torch.export can trace models that call the ops.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(align_detr, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) "
      "-> (Tensor, Tensor, Tensor)");
}

// A plain Python module with no functions: importing align_detr._C loads this library, whose
// static initialisers register the operators with the dispatcher.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

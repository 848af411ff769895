// r1kernels._C: the Python module whose import runs every TORCH_LIBRARY_FRAGMENT(r1kernels, m) in
// csrc/*.cpp (schemas + CPU impls) and, in CUDA builds, TORCH_LIBRARY_IMPL(r1kernels, CUDA, m) in
// csrc/cuda/*_launch.cpp. One fragment file per op family.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "r1kernels compiled ops", -1, nullptr};
  return PyModule_Create(&def);
}

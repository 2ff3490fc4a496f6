// The Python module cnnkernels._C. Importing it loads the shared library, whose static initialisers
// register every op schema and kernel with the dispatcher. It carries no functions, only the facts
// that cnnkernels/_extension.py checks before using the ops (the torch version it was built against),
// and cpu_isa(): the instruction set our CPU kernels run with here.
#include <Python.h>

#include <torch/library.h>

#include "cnnkernels/build_info.h"
#include "cnnkernels/cpu/map.h"

// The namespace is created once here; every op adds its schemas with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(cnnkernels, m) {}

// "avx512", "avx2" or "default": the copy of our vectorised CPU kernels that runs on this CPU under
// this ATEN_CPU_CAPABILITY (cnnkernels.info()["cpu_isa"]).
static PyObject* cpu_isa(PyObject*, PyObject*) {
  const char* isa = cnnkernels::cpu::has_avx512() ? "avx512"
                    : cnnkernels::cpu::has_avx2() ? "avx2"
                                                  : "default";
  return PyUnicode_FromString(isa);
}

static PyMethodDef cnnkernels_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set our CPU kernels run with."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef cnnkernels_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                               cnnkernels_methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&cnnkernels_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "torch_version", CNNKERNELS_BUILT_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(m, "with_cuda", CNNKERNELS_BUILT_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(m, "cuda_arch_list", CNNKERNELS_BUILT_CUDA_ARCH_LIST) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}

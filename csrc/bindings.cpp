// The one binding file of me_kernels._C: op schemas (TORCH_LIBRARY(me, m)) and their CPU /
// CUDA implementations. Fake (meta) implementations for torch.compile are registered from
// Python in me_kernels/_ops.py. torch.ops.me.* is the stable entry point.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

// `import me_kernels._C` loads this library (and so runs the registrations below); the Python
// module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "me_kernels compiled ops (torch.ops.me)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(me, m) {
  m.def("group_rows(Tensor members, int num_members) -> (Tensor order, Tensor offsets)");
  m.def("grouped_linear(Tensor x, Tensor members, Tensor weight, Tensor? bias=None) -> Tensor");
  // CPU helper of the sampling reference path (the GPU kernels draw their own numbers).
  m.def("philox_uniforms(Tensor seed, Tensor offset, int stream, int n) -> Tensor");
  // Sampling / selection / mixture ops. CPU kernels here; the CUDA kernels are Triton, registered
  // for the CUDA key from Python (me_kernels/sampling.py, selection.py, mixture.py) with the fakes.
  m.def("sample(Tensor logits, Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, Tensor? topp_t, float topp_s, "
        "Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s) -> Tensor");
  m.def("me_step(Tensor logits, Tensor weights, Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, "
        "Tensor? topp_t, float topp_s, Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, "
        "int off_s, bool shared) -> (Tensor, Tensor)");
  m.def("select_members(Tensor weights, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s, int batch) -> Tensor");
  m.def("mixture_sample(Tensor logits, Tensor weights, Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, "
        "Tensor? topp_t, float topp_s, Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, "
        "int off_s) -> Tensor");
  m.def("mixture_logprobs(Tensor logits, Tensor weights) -> Tensor");
  m.def("verify_draft(Tensor target_logits, Tensor draft_logits, Tensor draft_tokens, Tensor weights, "
        "Tensor? ndraft_t, int ndraft_s, Tensor? temp_t, float temp_s, Tensor? topk_t, int topk_s, Tensor? topp_t, "
        "float topp_s, Tensor? minp_t, float minp_s, Tensor? seed_t, int seed_s, Tensor? off_t, int off_s) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(me, CPU, m) {
  m.impl("group_rows", &me::group_rows_cpu);
  m.impl("grouped_linear", &me::grouped_linear_cpu);
  m.impl("philox_uniforms", &me::philox_uniforms_cpu);
  m.impl("sample", &me::sample_cpu);
  m.impl("me_step", &me::me_step_cpu);
  m.impl("select_members", &me::select_members_cpu);
  m.impl("mixture_sample", &me::mixture_sample_cpu);
  m.impl("mixture_logprobs", &me::mixture_logprobs_cpu);
  m.impl("verify_draft", &me::verify_draft_cpu);
}

#ifdef ME_WITH_CUDA
TORCH_LIBRARY_IMPL(me, CUDA, m) {
  m.impl("group_rows", &me::group_rows_cuda);
  m.impl("grouped_linear", &me::grouped_linear_cuda);
}
#endif

// Argument checks shared by the op front ends (csrc/<op>.cpp). Messages name the op and the argument
// and say what was expected, so a user can act on them without reading our sources.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

namespace cnnkernels {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.defined(), op, ": argument '", arg, "' is undefined");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": expected argument '", arg,
              "' to be a float32, float16, bfloat16 or float64 tensor, got ", t.scalar_type());
}

inline void check_same_layout_args(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                                   const char* b_name, const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": '", a_name, "' and '", b_name,
              "' must have the same shape, got ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": '", a_name, "' and '", b_name,
              "' must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": '", a_name, "' and '", b_name,
              "' must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_writable(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": argument '", arg,
              "' is written in place but several of its elements share memory (an expanded or "
              "broadcast view); clone() it first");
}

}  // namespace cnnkernels

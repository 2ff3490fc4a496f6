// batch_norm_act's statistics and backward passes: declarations shared by the schema file and the
// per-device kernels. The forward's elementwise pass is affine_act (affine_act.h).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <optional>
#include <utility>

namespace cnnkernels {

// The layout the kernels walk: channels_last rows ([N·H·W, C]) for 4-D tensors that are dense in
// channels_last and not in NCHW, else channel planes of a contiguous tensor. Every tensor an op
// reads is made dense in this format (a no-op for the usual inputs) and its outputs are too.
at::MemoryFormat kernel_memory_format(const at::Tensor& x);

struct ChannelArg {
  const at::Tensor* tensor;
  const char* name;
};

// x: floating, [N, C, ...]. Per-channel arguments: 1-D of C values in the compute type (float32
// for float32/float16/bfloat16 x, float64 for float64 x) on x's device. grad and residual (either
// may be null): x's shape, dtype and device.
void check_batch_norm_act_args(const at::Tensor& x, const at::Tensor* grad,
                               const std::optional<at::Tensor>& residual,
                               std::initializer_list<ChannelArg> per_channel, const char* op);

// The distance, in values, between consecutive pixels of a 4-D x whose pixels are rows of C
// channels lying further apart than C: a channel slice x[:, :C] of a wider channels_last tensor
// (a DenseNet block's concatenation, read in place). 0 for any other x.
int64_t channels_last_row_stride(const at::Tensor& x);

// What a backward kernel reads, checked and made dense in the kernels' layout. x_row_stride: the
// distance between x's rows in channels_last (C when x is dense; larger when the caller accepts
// strided rows and x is such a slice, see channels_last_row_stride).
struct BackwardInputs {
  at::MemoryFormat format;
  at::Tensor x, grad;
  std::optional<at::Tensor> residual;
  int64_t x_row_stride;
};

// check_batch_norm_act_args + a valid activation code, then grad, x (and residual) in x's kernel
// layout; every per-channel argument is checked the same way. `strided_rows`: leave an x with
// strided channels_last rows as it is (the CPU kernels read it in place).
BackwardInputs backward_inputs(const at::Tensor& grad, const at::Tensor& x,
                               const std::optional<at::Tensor>& residual,
                               std::initializer_list<ChannelArg> per_channel, int64_t activation,
                               const char* op, bool strided_rows = false);

// batch_norm_act_backward_reduce_add_'s `out`: x's sizes, dtype and device, pixels as rows of
// channels (channels_last, or a channel slice of a channels_last tensor).
void check_out_rows(const at::Tensor& out, const at::Tensor& x, const char* op);

// The empty tensor returned in place of grad_residual when it was not asked for.
at::Tensor no_residual_grad(const at::Tensor& x);

// batch_norm_act_fold's arguments, checked, with weight and bias in the compute type (undefined
// where not given) and the running buffers dense (undefined where not given).
struct FoldArgs {
  at::Tensor mean, var, weight, bias, running_mean, running_var;
};
FoldArgs fold_args(const at::Tensor& mean, const at::Tensor& var,
                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                   const std::optional<at::Tensor>& running_mean,
                   const std::optional<at::Tensor>& running_var, double momentum, double eps,
                   int64_t count);

// batch_norm_act_backward_coefs's arguments: four [C] tensors of one floating compute type.
void check_coefs_args(const at::Tensor& sum_dz, const at::Tensor& sum_dz_xmu,
                      const at::Tensor& scale, const at::Tensor& invstd, int64_t count);

}  // namespace cnnkernels

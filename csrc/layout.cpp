// Schema of the layout helper op. Kernel: cpu/layout_kernel.cpp; Python front and fake kernel:
// cnnkernels/ops/layout.py.
//
//   contiguous_from_channels_last(x) -> a contiguous (NCHW) copy of a 4-D tensor whose pixels are
//   rows of channels: channels_last, or a channel slice of a channels_last tensor.
//   copy_to_channels_last_(out!, x): out.copy_(x) for an NCHW-contiguous x and an out whose pixels
//   are rows of channels (channels_last, or a channel slice of it): the other direction.
//
// ATen's CPU copy from channels_last to NCHW is a generic strided copy (6 GB/s on the dev VM
// against 16-33 GB/s the other way); the DenseNet block hands its channels_last output and input
// gradient back in NCHW with it. ATen's copy the other way reaches 6-11 GB/s there, against 20-30
// for the same register transposes. CPU only: on CUDA, ATen's copy runs at bandwidth.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  m.def("contiguous_from_channels_last(Tensor x) -> Tensor");
  m.def("copy_to_channels_last_(Tensor(a!) out, Tensor x) -> ()");
}

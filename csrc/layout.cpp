// Schema of the layout helper op. Kernel: cpu/layout_kernel.cpp; Python front and fake kernel:
// cnnkernels/ops/layout.py.
//
//   contiguous_from_channels_last(x) -> a contiguous (NCHW) copy of a 4-D tensor whose pixels are
//   rows of channels: channels_last, or a channel slice of a channels_last tensor.
//   copy_to_channels_last_(out!, x): out.copy_(x) for an NCHW-contiguous x and an out whose pixels
//   are rows of channels (channels_last, or a channel slice of it): the other direction.
//
// ATen's CPU copy between channels_last and NCHW is a generic strided copy, several times slower
// than register transposes in either direction; the DenseNet block hands its channels_last output
// and input gradient back in NCHW with it. CPU only: on CUDA, ATen's copy runs at bandwidth.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(cnnkernels, m) {
  m.def("contiguous_from_channels_last(Tensor x) -> Tensor");
  m.def("copy_to_channels_last_(Tensor(a!) out, Tensor x) -> ()");
}

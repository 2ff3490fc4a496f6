// Pixel rows of channels: the layout the CPU kernels read channels_last tensors, and channel slices
// of wider channels_last tensors (a DenseNet block's concatenation), in place.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace cnnkernels::cpu {

// Values between t's pixel rows when its element (n, c, h, w) lies at
// n·stride(0) + (h·W + w)·row + c: C for a dense channels_last tensor (strides of size-1 dims do
// not matter: the data is dense NHWC), more for a channel slice of a wider one; 0 when t is not
// laid out so (or not 4-D). The images must not overlap: stride(0) = H·W·row when N > 1.
inline int64_t pixel_row_stride(const at::Tensor& t) {
  if (t.dim() != 4) return 0;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t.size(1);
  const int64_t batch = t.size(0), channels = t.size(1), height = t.size(2), width = t.size(3);
  // the stride of the innermost spatial dim that is not of size 1 (a size-1 dim's is arbitrary)
  const int64_t row = width > 1 ? t.stride(3) : height > 1 ? t.stride(2) : batch > 1 ? t.stride(0)
                                                                                     : channels;
  const bool rows = (channels == 1 || t.stride(1) == 1) && row > channels &&
                    (width == 1 || t.stride(3) == row) &&
                    (height == 1 || t.stride(2) == width * row) &&
                    (batch == 1 || t.stride(0) == height * width * row);
  return rows ? row : 0;
}

}  // namespace cnnkernels::cpu

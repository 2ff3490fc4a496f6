// Activation functors shared by every CPU and CUDA kernel of cnnkernels.
//
// Each functor maps a pre-activation value x to act(x) (`forward`) and an upstream gradient g to
// g * act'(x) (`backward`), both from x alone: fused ops save the pre-activation input, never the
// activation output. The math, including the values at the kinks, follows PyTorch's own kernels so
// that our results are bit-identical to torch.nn.functional on the same device:
//  * hardswish/hardsigmoid forward divide by 6 on the CPU and multiply by 1/6 on CUDA, as ATen does;
//  * hardswish'(x) is 0 for x <= -3, x/3 + 1/2 for -3 < x < 3 and 1 for x >= 3;
//  * hardsigmoid'(x) is 1/6 on the open interval (-3, 3) and 0 elsewhere (g * float(1/6), as ATen);
//  * relu'(0) = 0, relu6'(x) = 1 on the open interval (0, 6), leaky_relu'(0) = slope.
// min/max are written as std::min/std::max are defined, so NaN propagates exactly as in ATen.
// T is the compute ("opmath") type: float for float/half/bfloat16, double for double.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace cnnkernels {

template <typename T>
C10_HOST_DEVICE inline T max_like_std(T a, T b) { return (a < b) ? b : a; }
template <typename T>
C10_HOST_DEVICE inline T min_like_std(T a, T b) { return (b < a) ? b : a; }

// ATen's constant is 1.0f / 6.0f, rounded to float even when the math is done in double.
template <typename T>
constexpr T kOneSixth = static_cast<T>(1.0f / 6.0f);

template <typename T>
C10_HOST_DEVICE inline T divide_by_six(T x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return x * kOneSixth<T>;  // ATen's CUDA kernels multiply by one_sixth
#else
  return x / T(6);  // ATen's CPU kernels divide
#endif
}

struct Identity {
  static constexpr const char* name = "identity";
  template <typename T> C10_HOST_DEVICE T forward(T x) const { return x; }
  template <typename T> C10_HOST_DEVICE T backward(T g, T /*x*/) const { return g; }
};

struct ReLU {
  static constexpr const char* name = "relu";
  template <typename T> C10_HOST_DEVICE T forward(T x) const { return x <= T(0) ? T(0) : x; }
  template <typename T> C10_HOST_DEVICE T backward(T g, T x) const { return x <= T(0) ? T(0) : g; }
};

struct ReLU6 {
  static constexpr const char* name = "relu6";
  template <typename T> C10_HOST_DEVICE T forward(T x) const {
    return min_like_std(max_like_std(x, T(0)), T(6));
  }
  template <typename T> C10_HOST_DEVICE T backward(T g, T x) const {
    return (x <= T(0) || x >= T(6)) ? T(0) : g;
  }
};

struct LeakyReLU {
  static constexpr const char* name = "leaky_relu";
  double negative_slope = 0.01;  // rounded to T where used, as ATen rounds its scalar
  template <typename T> C10_HOST_DEVICE T forward(T x) const {
    return x > T(0) ? x : x * T(negative_slope);
  }
  template <typename T> C10_HOST_DEVICE T backward(T g, T x) const {
    return x > T(0) ? g : g * T(negative_slope);
  }
};

struct HardSwish {
  static constexpr const char* name = "hardswish";
  template <typename T> C10_HOST_DEVICE T forward(T x) const {
    return divide_by_six(x * min_like_std(max_like_std(x + T(3), T(0)), T(6)));
  }
  template <typename T> C10_HOST_DEVICE T backward(T g, T x) const {
    // Every branch computed, then selected: the compiler can turn this into blends and vectorise.
    const T inside = g * ((x / T(3)) + T(0.5));
    return x <= T(-3) ? T(0) : (x < T(3) ? inside : g);
  }
};

struct HardSigmoid {
  static constexpr const char* name = "hardsigmoid";
  template <typename T> C10_HOST_DEVICE T forward(T x) const {
    return divide_by_six(min_like_std(max_like_std(x + T(3), T(0)), T(6)));
  }
  template <typename T> C10_HOST_DEVICE T backward(T g, T x) const {
    return (x > T(-3) && x < T(3)) ? g * kOneSixth<T> : T(0);  // ATen multiplies here, on both devices
  }
};

// Runtime selection for fused ops that take the activation as an argument. The integer values are
// part of the op schemas (see cnnkernels/activations.py); never renumber them.
enum class Activation : int64_t {
  Identity = 0,
  ReLU = 1,
  ReLU6 = 2,
  LeakyReLU = 3,
  HardSwish = 4,
  HardSigmoid = 5,
};

inline Activation activation_from_int(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 5,
              "cnnkernels: activation code must be in [0, 5] (identity, relu, relu6, leaky_relu, "
              "hardswish, hardsigmoid), got ", code);
  return static_cast<Activation>(code);
}

// Calls `body(functor)` with the functor for `code`. `body` is a generic lambda, so each activation
// gets its own instantiation of the kernel and the functor inlines into the inner loop.
template <typename Body>
decltype(auto) dispatch_activation(int64_t code, double negative_slope, Body&& body) {
  switch (activation_from_int(code)) {
    case Activation::Identity: return body(Identity{});
    case Activation::ReLU: return body(ReLU{});
    case Activation::ReLU6: return body(ReLU6{});
    case Activation::LeakyReLU: return body(LeakyReLU{negative_slope});
    case Activation::HardSwish: return body(HardSwish{});
    case Activation::HardSigmoid: return body(HardSigmoid{});
  }
  TORCH_CHECK(false, "cnnkernels: unreachable activation code ", code);
}

}  // namespace cnnkernels

"""Static GPU audit without a GPU: every Triton kernel of the package compiled for Hopper, and the
resources of every kernel (Triton and CUDA C++) read from its cubin.

The Triton configurations are not written out by hand: the launchers themselves run, on fake CUDA
tensors (torch's FakeTensorMode needs no GPU), over a list of layer shapes from real models, dtypes,
layouts and epilogue/prologue variants, and every launch they make is recorded instead of run. So
the audit compiles exactly the block sizes, warps, stages and constexprs the launchers pick on a
GPU, specialised as Triton's runtime specialises them (integer arguments equal to 1 become
constants, pointers and multiples of 16 carry the divisibility hint).

Each configuration is compiled with `triton.compile(ASTSource(...), target=GPUTarget(...))`;
registers, stack and static shared memory come from `cuobjdump -res-usage` on the cubin, spill
traffic from the local-memory instructions (STL/LDL) in its SASS, dynamic shared memory from
Triton's metadata. The same tools read the sm_90 cubins embedded in `cnnkernels/_C*.so` when the
extension was built with CUDA. Occupancy is the theoretical one of one SM (`SM_RESOURCES`).

The Triton kernels must be compiled, not interpreted: with TRITON_INTERPRET=1 set, `triton.jit`
builds interpreter objects that cannot be compiled, so `audit_in_subprocess` runs the audit in a
child process with the variable removed.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import inspect
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Callable, Iterable, Iterator

import torch

TARGETS = {"sm_90": 90, "sm_100": 100}

# One Hopper (H100) SM: the limits that decide how many blocks of a kernel it can hold.
SM_RESOURCES = {
    "registers": 65536,
    "shared_bytes": 228 * 1024,
    "shared_per_block_bytes": 227 * 1024,
    "reserved_shared_per_block_bytes": 1024,  # the driver keeps 1 KB of every block's shared memory
    "max_warps": 64,
    "max_blocks": 32,
    "register_allocation_unit": 256,  # registers are handed out per warp in units of 256
}
CUDA_THREADS_PER_BLOCK = 256  # kThreads of every csrc/cuda kernel launch
LOW_OCCUPANCY = 0.5


# --- resources and occupancy ------------------------------------------------------------------


@dataclasses.dataclass
class Resources:
    registers: int
    stack: int
    static_shared: int
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0


def occupancy(registers: int, shared_bytes: int, warps_per_block: int) -> tuple[float, str]:
    """(active warps / max warps, the limiting resource) on one SM of SM_RESOURCES."""
    sm = SM_RESOURCES
    unit = sm["register_allocation_unit"]
    registers_per_warp = -(-max(registers, 1) * 32 // unit) * unit
    limits = {
        "warps": sm["max_warps"] // warps_per_block,
        "blocks": sm["max_blocks"],
        "registers": sm["registers"] // (registers_per_warp * warps_per_block),
    }
    if shared_bytes > 0:
        limits["shared"] = sm["shared_bytes"] // (shared_bytes + sm["reserved_shared_per_block_bytes"])
    limiter = min(limits, key=limits.get)
    blocks = limits[limiter]
    return blocks * warps_per_block / sm["max_warps"], limiter


def _nvidia_tool(name: str) -> str:
    """A tool Triton ships for its NVIDIA backend (ptxas, cuobjdump), else one on PATH."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: it ships with triton "
                                f"(triton/backends/nvidia/bin) or with the CUDA toolkit")
    return found


def _run_tool(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


_FUNCTION_USAGE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.MULTILINE)
_LOCAL_ACCESS = re.compile(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)\s")
_WIDTH_BYTES = {".64": 8, ".128": 16, ".U8": 1, ".S8": 1, ".U16": 2, ".S16": 2}


def _access_bytes(suffixes: str) -> int:
    for suffix, size in _WIDTH_BYTES.items():
        if suffix in re.findall(r"\.[A-Z0-9]+", suffixes):
            return size
    return 4


def resource_usage(binary: str) -> dict[str, Resources]:
    """Per (mangled) function of a cubin or fat binary: registers, stack, static shared memory,
    and the bytes its local-memory stores and loads move (spills, as no Triton or CUDA kernel
    here keeps arrays in local memory)."""
    cuobjdump = _nvidia_tool("cuobjdump")
    usage = {name: Resources(int(reg), int(stack), int(shared)) for name, reg, stack, shared
             in _FUNCTION_USAGE.findall(_run_tool([cuobjdump, "-res-usage", binary]))}
    sass = _run_tool([cuobjdump, "-sass", binary])
    starts = list(_SASS_FUNCTION.finditer(sass))
    for here, after in zip(starts, starts[1:] + [None]):
        body = sass[here.end():after.start() if after else len(sass)]
        entry = usage.get(here.group(1))
        if entry is None:
            continue
        for op, suffixes in _LOCAL_ACCESS.findall(body):
            if op == "STL":
                entry.spill_store_bytes += _access_bytes(suffixes)
            else:
                entry.spill_load_bytes += _access_bytes(suffixes)
    return usage


# --- the rows of the report -------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    source: str  # "triton" or "cuda"
    kernel: str
    variant: str
    num_warps: int
    num_stages: int | None
    registers: int | None = None
    spill_store_bytes: int | None = None
    spill_load_bytes: int | None = None
    stack: int | None = None
    shared: int | None = None
    occupancy: float | None = None
    limiter: str | None = None
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes or self.stack)

    def fill(self, usage: Resources, dynamic_shared: int) -> None:
        self.registers = usage.registers
        self.spill_store_bytes = usage.spill_store_bytes
        self.spill_load_bytes = usage.spill_load_bytes
        self.stack = usage.stack
        self.shared = usage.static_shared + dynamic_shared
        if self.shared > SM_RESOURCES["shared_per_block_bytes"]:
            self.error = (f"needs {self.shared} B of shared memory per block, more than an SM's "
                          f"{SM_RESOURCES['shared_per_block_bytes']} B")
            return
        self.occupancy, self.limiter = occupancy(usage.registers, self.shared, self.num_warps)


# --- recording what the launchers launch ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pointer:
    dtype: torch.dtype


@dataclasses.dataclass
class Launch:
    """One kernel call as a launcher made it: the kernel, its bound arguments, launch options."""
    kernel: object  # triton.runtime.jit.JITFunction
    arguments: dict
    num_warps: int
    num_stages: int


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_DEFAULT_NUM_WARPS, _DEFAULT_NUM_STAGES = 4, 3  # Triton's defaults for CUDA


class _Recorder:
    """Stands in for torch.library.wrap_triton: `recorder(kernel)[grid](*args, **kwargs)` records
    the call instead of running it."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __call__(self, kernel):
        return _RecordingKernel(self, kernel)


class _RecordingKernel:
    def __init__(self, recorder: _Recorder, kernel):
        self.recorder, self.kernel = recorder, kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            num_warps = kwargs.pop("num_warps", _DEFAULT_NUM_WARPS)
            num_stages = kwargs.pop("num_stages", _DEFAULT_NUM_STAGES)
            bound = inspect.signature(self.kernel.fn).bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = {name: Pointer(v.dtype) if isinstance(v, torch.Tensor) else v
                         for name, v in bound.arguments.items()}
            self.recorder.launches.append(Launch(self.kernel, arguments, num_warps, num_stages))
        return launch


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Inside: tensors made on "cuda" are fake (no GPU needed) and Triton launches are recorded
    into the yielded list, not run."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    recorder = _Recorder()
    saved = torch.library.wrap_triton
    torch.library.wrap_triton = recorder
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield recorder.launches
    finally:
        torch.library.wrap_triton = saved


def _specialise(kernel, arguments: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's runtime would build them for these arguments:
    an integer equal to 1 becomes a constant, a multiple of 16 (and every tensor, assumed
    16-byte aligned as torch allocates) carries tt.divisibility=16."""
    signature, constexprs, attrs = {}, {}, {}
    divisible = [["tt.divisibility", 16]]
    for index, param in enumerate(kernel.params):
        name, value = param.name, arguments[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, Pointer):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = divisible
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int) and not param.do_not_specialize and value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = divisible
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialise argument {name}={value!r}")
    return signature, constexprs, attrs


def _describe(kernel, arguments: dict, constexprs: dict) -> str:
    """The variant column: element type of the first pointer, then every constexpr of the kernel
    (tiles, activation codes, flags) and the strides specialised to 1."""
    first = next((v.dtype for v in arguments.values() if isinstance(v, Pointer)), None)
    parts = [_TRITON_TYPES.get(first, "?")]
    declared = {p.name for p in kernel.params if p.is_constexpr}
    for name, value in constexprs.items():
        if name == "CPU_MATH":  # always False on a GPU
            continue
        if name not in declared:  # an integer argument Triton specialises because it is 1
            parts.append(f"{name}==1")
        elif isinstance(value, bool):
            parts.append(f"{name}={int(value)}")
        else:  # tile sizes and codes, or a tl.dtype (its name: fp32 ...)
            parts.append(f"{name}={getattr(value, 'name', value)}")
    return " ".join(parts)


# --- the problems the launchers are driven over --------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RELU, HARDSWISH = 1, 4
ACTIVATIONS = range(6)  # cnnkernels/activations.py: identity, relu, relu6, leaky_relu, h-swish, h-sigmoid


def _cuda(shape, dtype, channels_last=False):
    t = torch.empty(shape, dtype=dtype, device="cuda")
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _channel_vector(channels: int) -> torch.Tensor:
    return torch.empty(channels, dtype=torch.float32, device="cuda")


# Pointwise (1x1) convolutions: (batch, in, out, size, stride). They cover every tile
# cnnkernels.triton.pointwise_conv2d._blocks picks on a GPU: M 64/128, N 32/64/128, K 16/32.
POINTWISE_LAYERS = [
    (32, 24, 144, 56, 1),    # MobileNetV2 block 3 expand: 128x128x32
    (32, 144, 24, 56, 1),    # MobileNetV2 block 3 project: 128x32x32
    (32, 256, 64, 56, 1),    # ResNet-50 layer1 conv1: 128x64x32
    (32, 1024, 256, 14, 2),  # ResNet-50 layer3 downsample, stride 2: 128x128x32
    (32, 16, 16, 112, 1),    # MobileNetV3 block 1: 128x16x16
    (1, 160, 960, 7, 1),     # MobileNetV2 block 15 expand, batch 1: 64x128x32
]


def _pointwise_forward(x, out_channels, stride, residual=False, activation=0, prologue=None,
                       stats=False):
    from .triton import pointwise_conv2d as pw
    n, c, h, w = x.shape
    weight = _cuda((out_channels, c, 1, 1), x.dtype)
    out_shape = (n, out_channels, (h - 1) // stride + 1, (w - 1) // stride + 1)
    res = None
    if residual:
        res = _cuda(out_shape, x.dtype, x.is_contiguous(memory_format=torch.channels_last))
    in_scale = _channel_vector(c) if prologue is not None else None
    pw.pointwise_conv2d_triton._init_fn(
        x, weight, _channel_vector(out_channels), _channel_vector(out_channels), stride, 1, res,
        activation, 0.01, in_scale, in_scale, prologue or 0, 0.01, stats)


def _pointwise_backward(x, out_channels, stride, activation=0, prologue=None):
    from .triton import pointwise_conv2d as pw
    n, c, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    weight = _cuda((out_channels, c, 1, 1), x.dtype)
    y = _cuda((n, out_channels, (h - 1) // stride + 1, (w - 1) // stride + 1), x.dtype,
              channels_last)
    in_scale = _channel_vector(c) if prologue is not None else None
    pw.pointwise_conv2d_triton_backward._init_fn(
        torch.empty_like(y), x, weight, y, _channel_vector(out_channels), stride, 1, activation,
        in_scale, in_scale, prologue or 0, 0.01, True, True, True, prologue is not None)


def drive_pointwise(quick: bool) -> None:
    layers = POINTWISE_LAYERS[:1] if quick else POINTWISE_LAYERS  # quick: the largest tiles
    for dtype in DTYPES:
        for channels_last in (False,) if quick else (False, True):
            for n, c, o, size, stride in layers:
                x = _cuda((n, c, size, size), dtype, channels_last)
                _pointwise_forward(x, o, stride)
                # every fused part at once: the most registers the forward GEMM can need
                _pointwise_forward(x, o, stride, residual=stride == 1, activation=HARDSWISH,
                                   prologue=HARDSWISH, stats=True)
                _pointwise_backward(x, o, stride)
                _pointwise_backward(x, o, stride, activation=RELU, prologue=HARDSWISH)
    if not quick:  # each activation code, in the epilogue and in the prologue
        x = _cuda(POINTWISE_LAYERS[2][:2] + (56, 56), torch.float32)
        for code in ACTIVATIONS:
            _pointwise_forward(x, 64, 1, activation=code)
            _pointwise_forward(x, 64, 1, prologue=code)
            _pointwise_backward(x, 64, 1, prologue=code)


# Depthwise convolutions: (batch, channels, size, kernel, stride, multiplier).
DEPTHWISE_LAYERS = [
    (32, 144, 56, 3, 1, 1),  # MobileNetV2 block 3
    (32, 96, 112, 3, 2, 1),  # MobileNetV2 block 2, stride 2
    (32, 672, 14, 5, 1, 1),  # MobileNetV3-L block 12
    (32, 96, 56, 7, 1, 1),   # ConvNeXt-T stage 1
    (32, 960, 7, 3, 1, 1),   # MobileNetV2 block 15 (7x7 planes)
    (32, 32, 28, 3, 1, 2),   # channel multiplier 2 (Xception-style)
]


def drive_depthwise(quick: bool) -> None:
    from .triton import depthwise_conv2d as dw
    for dtype in DTYPES:
        for channels_last in (False,) if quick else (False, True):
            # quick: 3x3 in every dtype, 7x7 (the most taps) in float32
            layers = DEPTHWISE_LAYERS if not quick else \
                [DEPTHWISE_LAYERS[0]] + ([DEPTHWISE_LAYERS[3]] if dtype == torch.float32 else [])
            for n, c, size, k, stride, mult in layers:
                x = _cuda((n, c, size, size), dtype, channels_last)
                weight = _cuda((c * mult, 1, k, k), dtype)
                pad = [k // 2] * 2
                y = dw.depthwise_conv2d_triton._init_fn(x, weight, None, [stride] * 2, pad, [1, 1])
                dw.depthwise_conv2d_triton._init_fn(
                    x, weight, _channel_vector(c * mult), [stride] * 2, pad, [1, 1],
                    _channel_vector(c * mult), _channel_vector(c * mult), HARDSWISH)
                dw.depthwise_conv2d_backward_input_triton._init_fn(
                    y, weight, list(x.shape), [stride] * 2, pad, [1, 1])
                dw.depthwise_conv2d_backward_weight_triton._init_fn(
                    y, x, list(weight.shape), [stride] * 2, pad, [1, 1])
    if not quick:
        x = _cuda((32, 144, 56, 56), torch.float32)
        weight = _cuda((144, 1, 3, 3), torch.float32)
        for code in ACTIVATIONS:
            dw.depthwise_conv2d_triton._init_fn(x, weight, None, [1, 1], [1, 1], [1, 1],
                                                None, None, code)


def drive_batch_norm(quick: bool) -> None:
    from .triton import affine_act, batch_norm_act as bn
    codes = (HARDSWISH,) if quick else ACTIVATIONS
    for dtype in (torch.float32, torch.bfloat16) if quick else DTYPES:
        for channels_last in (False, True):
            x = _cuda((32, 96, 56, 56), dtype, channels_last)
            c = _channel_vector(96)
            bn.batch_norm_act_stats_triton._init_fn(x)
            for code in codes:  # quick: with a residual, the variant with the most loads
                for residual in (torch.empty_like(x),) if quick else (None, torch.empty_like(x)):
                    bn.batch_norm_act_backward_reduce_triton._init_fn(x, x, c, c, c, residual,
                                                                      code, 0.01)
                    bn.batch_norm_act_backward_elemt_triton._init_fn(
                        x, x, c, c, c, c, c, c, residual, code, 0.01, residual is not None)
                    affine_act.affine_act_triton._init_fn(x, c, c, code, 0.01, residual)
    for dtype in (torch.float32, torch.float64):
        c = torch.empty(96, dtype=dtype, device="cuda")
        bn.batch_norm_act_fold_triton._init_fn(c, c, c, c, c, c, 0.1, 1e-5, 1000)
        bn.batch_norm_act_backward_coefs_triton._init_fn(c, c, c, c, 1000)


def drive_elementwise(quick: bool) -> None:
    from .triton import hardswish, squeeze_excite
    for dtype in (torch.float32, torch.bfloat16) if quick else DTYPES:
        x = _cuda((32, 96, 56, 56), dtype)
        for op in ("hardswish", "hardsigmoid"):
            getattr(hardswish, f"{op}_triton")._init_fn(x)
            getattr(hardswish, f"{op}_backward_triton")._init_fn(x, x)
        for channels_last in (False, True):
            x = _cuda((32, 120, 28, 28), dtype, channels_last)
            squeeze_excite.squeeze_excite_backward_triton._init_fn(
                x, x, torch.empty((32, 120, 1, 1), dtype=dtype, device="cuda"))


DRIVERS: dict[str, Callable[[bool], None]] = {
    "pointwise_conv2d": drive_pointwise,
    "depthwise_conv2d": drive_depthwise,
    "batch_norm_act": drive_batch_norm,
    "elementwise": drive_elementwise,
}


# --- compiling -----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    kernel: object
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int
    variant: str


def triton_jobs(quick: bool = False, drivers: Iterable[str] = tuple(DRIVERS)) -> list[_Job]:
    """The distinct compilations the launchers ask for, over the problems of `drivers`."""
    _require_compilable_triton()
    with recording_launches() as launches:
        for name in drivers:
            DRIVERS[name](quick)
    jobs, seen = [], set()
    for launch in launches:
        signature, constexprs, attrs = _specialise(launch.kernel, launch.arguments)
        key = (launch.kernel.fn.__module__, launch.kernel.__name__, repr(signature),
               repr(constexprs), repr(sorted(attrs)), launch.num_warps, launch.num_stages)
        if key in seen:
            continue
        seen.add(key)
        jobs.append(_Job(launch.kernel, signature, constexprs, attrs, launch.num_warps,
                         launch.num_stages, _describe(launch.kernel, launch.arguments, constexprs)))
    return jobs


def _require_compilable_triton() -> None:
    from triton.runtime.jit import JITFunction
    from .triton import pointwise_conv2d
    if not isinstance(pointwise_conv2d._pointwise_conv2d_kernel, JITFunction):
        raise RuntimeError("the Triton kernels were imported under TRITON_INTERPRET=1 and cannot be "
                           "compiled; run the audit without it (audit_in_subprocess does)")


_JOBS: list[_Job] = []  # read by the forked workers


def _compile_job(index: int, arch: int) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    job = _JOBS[index]
    row = Row("triton", job.kernel.__name__.lstrip("_"), job.variant, job.num_warps,
              job.num_stages)
    try:
        compiled = triton.compile(
            ASTSource(fn=job.kernel, signature=job.signature, constexprs=job.constexprs,
                      attrs=job.attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        with tempfile.TemporaryDirectory() as folder:
            cubin = os.path.join(folder, "kernel.cubin")
            with open(cubin, "wb") as f:
                f.write(compiled.asm["cubin"])
            usage = resource_usage(cubin)
        row.fill(usage[compiled.metadata.name], compiled.metadata.shared)
    except Exception as error:  # a failed compilation is a row of the report, not a crash
        row.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
    return row


def audit_triton(target: str = "sm_90", quick: bool = False, workers: int | None = None,
                 drivers: Iterable[str] = tuple(DRIVERS)) -> list[Row]:
    """Compiles every recorded configuration for `target` on `workers` processes."""
    arch = TARGETS[target]
    _JOBS[:] = triton_jobs(quick, drivers)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_job(i, arch) for i in range(len(_JOBS))]
    context = multiprocessing.get_context("fork")  # workers inherit _JOBS and the kernels
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_compile_job, range(len(_JOBS)), [arch] * len(_JOBS)))


# --- the CUDA C++ kernels ----------------------------------------------------------------------


def extension_binary() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    return found[0] if found else None


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    done = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, done.stdout.splitlines())) if done.returncode == 0 else \
        {n: n for n in names}


def _short_cuda_name(demangled: str) -> tuple[str, str]:
    """(kernel, template arguments) of `void cnnkernels::(anonymous namespace)::k<T, ...>(...)`."""
    text = re.sub(r"\(anonymous namespace\)::|cnnkernels::|c10::|at::", "", demangled)
    text = text.removeprefix("void ")
    name = re.match(r"[\w:]*", text).group(0)
    template, depth = "", 0
    for i, char in enumerate(text[len(name):]):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if depth == 0:
            template = text[len(name) + 1:len(name) + i] if i else ""
            break
    return name, template


def audit_cuda(binary: str | None = None) -> list[Row]:
    """Rows for every kernel compiled into the extension (empty when it has no CUDA code)."""
    binary = binary or extension_binary()
    if binary is None:
        return []
    try:
        usage = resource_usage(binary)
    except RuntimeError as error:
        if "does not contain device code" in str(error) or "no device code" in str(error).lower():
            return []
        raise
    names = _demangle(list(usage))
    rows = []
    for mangled, resources in sorted(usage.items(), key=lambda item: names[item[0]]):
        kernel, template = _short_cuda_name(names[mangled])
        row = Row("cuda", kernel, template, CUDA_THREADS_PER_BLOCK // 32, None)
        row.fill(resources, 0)
        rows.append(row)
    return rows


# --- the report -------------------------------------------------------------------------------


def summary(rows: list[Row]) -> dict:
    def of(source):
        selected = [r for r in rows if r.source == source]
        return {"kernels": len(selected), "failures": sum(r.error is not None for r in selected),
                "spills": sum(r.spills for r in selected),
                "low_occupancy": sum(r.occupancy is not None and r.occupancy < LOW_OCCUPANCY
                                     for r in selected)}
    return {"triton": of("triton"), "cuda": of("cuda")}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.0%}"
    return str(value).replace("|", "\\|")


_COLUMNS = ("kernel", "variant", "num_warps", "num_stages", "registers", "spill_store_bytes",
            "spill_load_bytes", "stack", "shared", "occupancy", "limiter")
_HEADERS = ("kernel", "variant", "warps", "stages", "regs/thread", "spill st B", "spill ld B",
            "stack B", "smem B", "occupancy", "limited by")


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(_HEADERS) + " | status |",
             "|" + "---|" * (len(_HEADERS) + 1)]
    for row in rows:
        status = "FAILED: " + row.error if row.error else ("SPILLS" if row.spills else "ok")
        lines.append("| " + " | ".join(_cell(getattr(row, c)) for c in _COLUMNS)
                     + f" | {_cell(status)} |")
    return "\n".join(lines)


def report(rows: list[Row], target: str) -> str:
    counts = summary(rows)
    parts = []
    for source, title in (("triton", "Triton kernels"), ("cuda", "CUDA C++ kernels (cnnkernels._C, "
                                                                 f"{CUDA_THREADS_PER_BLOCK} threads per block)")):
        selected = [r for r in rows if r.source == source]
        c = counts[source]
        if not selected:
            parts.append(f"## {title}\n\nnone audited\n")
            continue
        parts.append(f"## {title}, {target}\n\n{c['kernels']} compiled configurations, "
                     f"{c['failures']} failures, {c['spills']} with spills, {c['low_occupancy']} "
                     f"under {LOW_OCCUPANCY:.0%} occupancy\n\n{markdown_table(selected)}\n")
    return "\n".join(parts)


def rows_failing(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.error or r.spills]


def audit(target: str = "sm_90", quick: bool = False, cuda: bool = True,
          workers: int | None = None) -> list[Row]:
    rows = audit_triton(target, quick, workers)
    if cuda and target == "sm_90":  # the extension is built for TORCH_CUDA_ARCH_LIST=9.0
        rows += audit_cuda()
    return rows


def audit_in_subprocess(args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m cnnkernels kernels ARGS` with TRITON_INTERPRET removed, so the kernels are
    compiled rather than interpreted."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "cnnkernels", "kernels", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_json(rows: list[Row], target: str, path: str) -> None:
    payload = {"target": target, "sm": SM_RESOURCES, "summary": summary(rows),
               "rows": [dataclasses.asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false")


def command(target: str, json_path: str | None, quick: bool = False, cuda: bool = True,
            workers: int | None = None) -> int:
    """`cnnkernels kernels`: prints the report; 1 when a kernel fails to compile or spills."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    if _interpreted():  # the kernels must be compiled: run again without the interpreter
        args = ["--target", target] + (["--json", json_path] if json_path else []) \
            + (["--quick"] if quick else []) + ([] if cuda else ["--no-cuda"]) \
            + (["--workers", str(workers)] if workers else [])
        done = audit_in_subprocess(args)
        print(done.stdout, end="")
        print(done.stderr, end="", file=sys.stderr)
        return done.returncode
    rows = audit(target, quick, cuda, workers)
    print(report(rows, target))
    if json_path:
        write_json(rows, target, json_path)
    failing = rows_failing(rows)
    for row in failing:
        print(f"{row.source} {row.kernel} [{row.variant}]: "
              f"{row.error or f'spills {row.spill_store_bytes} B / {row.spill_load_bytes} B'}",
              file=sys.stderr)
    return 1 if failing else 0

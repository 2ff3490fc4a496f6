"""Does a C++ compiler build torch extensions whose errors reach Python intact?

On one GPU machine, a compiler other than the one torch was built with (CXX=/opt/gcc/bin/g++)
produced an extension in which every TORCH_CHECK failure killed the process with a segfault,
instead of raising RuntimeError. This builds a one-op extension with the given compiler and our
flags (-O3 -fopenmp), calls its op with a failing check in a child process and prints whether the
error came back as a RuntimeError. Exit status 0 means the compiler is safe to use.

Usage: python tools/probe_cxx.py CXX            (e.g. g++, /usr/bin/g++, /opt/gcc/bin/g++)
"""
import os
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
at::Tensor probe_fail(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 99, "probe: 'x' must be 99-d, got ", x.dim());
  return x;
}
TORCH_LIBRARY(cxx_probe, m) { m.def("fail(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(cxx_probe, CPU, m) { m.impl("fail", &probe_fail); }
"""

CHILD = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
try:
    torch.ops.cxx_probe.fail(torch.zeros(1))
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0]); sys.exit(0)
print("no error raised"); sys.exit(1)
"""


def build(cxx: str, workdir: str) -> str:
    import torch.utils.cpp_extension as ext

    src = os.path.join(workdir, "probe.cpp")
    lib = os.path.join(workdir, "probe.so")
    with open(src, "w") as f:
        f.write(SOURCE)
    includes = [f"-I{d}" for d in ext.include_paths()]
    libdirs = [f"-L{d}" for d in ext.library_paths()]
    cmd = [cxx, "-shared", "-fPIC", "-O3", "-fopenmp", "-std=c++20", *includes, src, *libdirs,
           "-lc10", "-ltorch", "-ltorch_cpu", "-o", lib]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return lib


def main() -> int:
    cxx = sys.argv[1]
    with tempfile.TemporaryDirectory() as workdir:
        try:
            lib = build(cxx, workdir)
        except (subprocess.CalledProcessError, FileNotFoundError) as e:
            print(f"{cxx}: cannot build ({e})")
            return 2
        child = subprocess.run([sys.executable, "-c", CHILD, lib], capture_output=True, text=True)
    verdict = "ok" if child.returncode == 0 else f"BROKEN (exit {child.returncode})"
    print(f"{cxx}: {verdict}: {child.stdout.strip()} {child.stderr.strip()[-300:]}")
    return 0 if child.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

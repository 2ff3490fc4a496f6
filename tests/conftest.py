"""Test configuration shared by every test file.

Without a GPU, the Triton kernels are tested on CPU tensors through the Triton interpreter; the
variable has to be set before anything imports triton, so it is set here, before cnnkernels loads.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the tests check our kernels, so layers must not swap them for PyTorch's where that is faster;
# tests/test_tuning.py turns tuning on where it tests it
os.environ.setdefault("CNNKERNELS_TUNE", "off")

import pytest  # noqa: E402

import cnnkernels  # noqa: E402
from cnnkernels import backend  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def implementation_params(include_reference: bool = True):
    """(backend, device) pairs to test: every implementation this machine can run, and the ones it
    cannot as explicit skips saying why (CUDA tests run wherever a GPU is present)."""
    no_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
    no_cuda_ext = pytest.mark.skipif(not cnnkernels.info()["cuda_ext"],
                                     reason="cnnkernels._C was built without CUDA kernels")
    no_interp = pytest.mark.skipif(not backend.triton_interpreted(),
                                   reason="TRITON_INTERPRET is off (a GPU is present)")
    no_triton = pytest.mark.skipif(not backend.triton_installed(), reason="triton not installed")
    reference = [pytest.param(("torch", "cpu"), id="torch-cpu")] if include_reference else []
    return [pytest.param(("cpu", "cpu"), id="cpu")] + reference + [
        pytest.param(("triton", "cpu"), id="triton-interp",
                     marks=[pytest.mark.triton, no_triton, no_interp]),
        pytest.param(("cuda", "cuda"), id="cuda", marks=[pytest.mark.cuda, no_gpu, no_cuda_ext]),
        pytest.param(("triton", "cuda"), id="triton-cuda",
                     marks=[pytest.mark.triton, pytest.mark.cuda, no_gpu, no_triton]),
    ]


@pytest.fixture(params=implementation_params())
def impl(request):
    """Runs the test with one backend active; yields (backend name, device string)."""
    name, device = request.param
    with cnnkernels.use_backend(name):
        yield name, device


@pytest.fixture(params=implementation_params(include_reference=False))
def kernel_impl(request):
    """Like `impl`, for our own kernels only (the pure-torch reference is left out)."""
    name, device = request.param
    with cnnkernels.use_backend(name):
        yield name, device


@pytest.fixture(autouse=True)
def full_precision_reference():
    """PyTorch's references run in full float32: cuDNN convolutions default to TF32 on Ampere and
    later (torch.backends.cudnn.allow_tf32), which would make torchvision's 1x1 convs round to a
    10-bit mantissa while our kernels don't."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def run_ranks(worker_file: str, world: int, tmp_path) -> list:
    """Runs `python worker_file RANK WORLD INIT_FILE OUT` once per rank (the workers meet through
    a gloo file store in tmp_path) and returns what each rank torch.save'd to OUT."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [here, os.path.dirname(here)]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(world)]
    workers = [subprocess.Popen([sys.executable, worker_file, str(rank), str(world),
                                 str(tmp_path / "init"), str(outs[rank])], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for rank in range(world)]
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output.decode()
    return [torch.load(out) for out in outs]


class DispatchedOps:
    """`with DispatchedOps() as ops:` records in `ops.names` the name of every op that reaches the
    dispatcher inside the block (on a GPU each of ours is at least one launch)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        names = self.names = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                names.append(str(func))
                return func(*args, **(kwargs or {}))

        self._mode = Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)

    def ours(self):
        """The names of cnnkernels' ops among them."""
        return [name for name in self.names if name.startswith("cnnkernels.")]


@pytest.fixture
def dispatched_ops():
    """The DispatchedOps class, for tests that count or name the ops a call dispatches."""
    return DispatchedOps

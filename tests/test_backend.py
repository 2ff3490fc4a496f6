"""The backend registry, info(), the extension loader and the fallback to the reference."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cnnkernels
from cnnkernels import _extension, backend


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (import-time behaviour can only be tested there)."""
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_info_reports_what_was_built():
    info = cnnkernels.info()
    assert set(info) >= {"version", "cpu_ext", "cuda_ext", "triton", "device", "backend"}
    assert info["version"] == cnnkernels.__version__
    assert info["cpu_ext"] is True, "the test suite must run against the compiled extension"
    if os.environ.get("CNNKERNELS_EXPECT_CUDA_EXT") == "1":
        assert info["cuda_ext"] is True, "FORCE_CUDA build expected, but no CUDA kernels in _C"
    assert info["backend"] == "auto"
    assert info["device"] == ("cpu" if not torch.cuda.is_available() else info["device"])


def test_set_backend_and_context_manager():
    assert cnnkernels.get_backend() == "auto"
    with cnnkernels.use_backend("torch") as name:
        assert name == "torch" and cnnkernels.get_backend() == "torch"
        with cnnkernels.use_backend("CPU"):
            assert cnnkernels.get_backend() == "cpu"
        assert cnnkernels.get_backend() == "torch"
    assert cnnkernels.get_backend() == "auto"
    cnnkernels.set_backend("torch")
    try:
        assert backend.select(torch.device("cpu")) == "torch"
    finally:
        cnnkernels.set_backend("auto")


def test_context_manager_restores_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with cnnkernels.use_backend("torch"):
            1 / 0
    assert cnnkernels.get_backend() == "auto"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown cnnkernels backend 'tpu'; expected one of auto"):
        cnnkernels.set_backend("tpu")
    assert cnnkernels.get_backend() == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without GPU")
def test_cuda_backend_without_gpu_is_refused():
    with pytest.raises(cnnkernels.BackendUnavailableError, match="'cuda' is not available: "):
        cnnkernels.set_backend("cuda")


def test_backend_for_the_wrong_device_is_refused():
    with cnnkernels.use_backend("cpu"):
        with pytest.raises(cnnkernels.BackendUnavailableError, match="cannot run tensors on cuda"):
            backend.select(torch.device("cuda"))


def test_auto_picks_the_compiled_kernel():
    assert backend.select(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        assert backend.select(torch.device("cuda")) == ("cuda" if _extension.cuda_ext else "triton")


def test_environment_variable_selects_the_backend():
    result = run_python("import cnnkernels; print(cnnkernels.info()['backend'])",
                        CNNKERNELS_BACKEND="torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"
    result = run_python("import cnnkernels", CNNKERNELS_BACKEND="bogus")
    assert result.returncode != 0 and "unknown cnnkernels backend 'bogus'" in result.stderr


def test_import_does_not_import_triton():
    result = run_python("import sys, cnnkernels; print('triton' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


MISSING_EXTENSION = """
    import sys, warnings
    sys.modules["cnnkernels._C"] = None          # as if the extension had never been built
    import torch, cnnkernels
    info = cnnkernels.info()
    assert info["cpu_ext"] is False and info["cuda_ext"] is False, info
    x = torch.linspace(-5, 5, 11, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = cnnkernels.ops.hardswish(x)
        y2 = cnnkernels.ops.hardsigmoid(x)
    assert torch.equal(y, torch.nn.functional.hardswish(x))
    y.sum().backward()
    fallbacks = [w for w in caught if issubclass(w.category, cnnkernels.FallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    print(fallbacks[0].message)
    try:
        cnnkernels.set_backend("cpu")
    except cnnkernels.BackendUnavailableError as err:
        print(err)
"""


def test_missing_extension_falls_back_with_one_warning():
    result = run_python(MISSING_EXTENSION)
    assert result.returncode == 0, result.stderr
    assert "running the pure-torch reference instead" in result.stdout
    assert "'cpu' is not available: the compiled extension cnnkernels._C is missing" in result.stdout


def test_missing_extension_is_an_error_in_strict_mode():
    result = run_python(MISSING_EXTENSION, CNNKERNELS_STRICT="1")
    assert result.returncode != 0
    assert "refused because CNNKERNELS_STRICT=1" in result.stderr


def test_extension_built_against_another_torch_fails_import_loudly():
    code = """
        import sys, types
        fake = types.ModuleType("cnnkernels._C")
        fake.torch_version, fake.with_cuda, fake.cuda_arch_list = "1.0.0+cu999", 0, ""
        sys.modules["cnnkernels._C"] = fake
        import cnnkernels
    """
    result = run_python(code)
    assert result.returncode != 0
    assert "cnnkernels._C was built against torch 1.0.0+cu999 but torch" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr


def test_built_version_check():
    _extension.check_built_version(torch.__version__, torch.__version__)
    with pytest.raises(ImportError, match="built against torch 2.6.0\\+cpu"):
        _extension.check_built_version("2.6.0+cpu", "2.6.0+cu124")
    assert _extension._C.torch_version == torch.__version__

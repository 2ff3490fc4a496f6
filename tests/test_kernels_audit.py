"""The static GPU audit (cnnkernels/kernels_audit.py, `cnnkernels kernels`): every Triton kernel
compiles for sm_90 without spilling at the configurations its launcher picks, and so does every
CUDA kernel of an extension built with CUDA. No GPU is needed: Triton compiles ahead of time for a
GPUTarget and its bundled cuobjdump reads the cubins.

The audit runs once, in a subprocess (the test session imported the kernels under
TRITON_INTERPRET=1, and interpreted kernels cannot be compiled), on its quick problem list: every
kernel, every dtype, the largest tiles.
"""
import json

import pytest

import cnnkernels
from cnnkernels import backend, kernels_audit

pytestmark = pytest.mark.skipif(not backend.triton_installed(), reason="triton not installed")

TRITON_KERNELS = {  # every @triton.jit kernel with a launch of its own, by the name the audit gives
    "pointwise_conv2d_kernel", "grad_input_kernel", "grad_weight_kernel",  # pointwise GEMMs
    "forward_kernel", "backward_input_kernel", "backward_weight_kernel", "sum_partials_kernel",
    "pair_sums_kernel", "elemt_kernel", "fold_kernel", "coefs_kernel", "affine_act_kernel",
    "backward_kernel",
}


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    path = tmp_path_factory.mktemp("audit") / "kernels.json"
    done = kernels_audit.audit_in_subprocess(["--target", "sm_90", "--quick", "--json", str(path)],
                                             timeout=900)
    assert path.exists(), f"the audit wrote no JSON (exit {done.returncode}):\n{done.stderr}"
    return done, json.loads(path.read_text())


def _rows(payload, source):
    return [row for row in payload["rows"] if row["source"] == source]


def test_every_triton_kernel_is_compiled_for_sm90(audit):
    _, payload = audit
    compiled = {row["kernel"] for row in _rows(payload, "triton")}
    assert TRITON_KERNELS <= compiled, f"not audited: {sorted(TRITON_KERNELS - compiled)}"


def test_no_triton_kernel_fails_or_spills(audit):
    _, payload = audit
    bad = [(r["kernel"], r["variant"], r["error"], r["stack"], r["spill_store_bytes"])
           for r in _rows(payload, "triton") if r["error"] or r["stack"] or r["spill_store_bytes"]
           or r["spill_load_bytes"]]
    assert not bad, "\n".join(map(str, bad))


def test_pointwise_gemms_are_compiled_in_every_dtype(audit):
    _, payload = audit
    gemms = [r for r in _rows(payload, "triton") if r["kernel"] == "pointwise_conv2d_kernel"]
    assert {r["variant"].split()[0] for r in gemms} == {"fp32", "fp16", "bf16"}
    assert all(r["registers"] and r["registers"] <= 255 and r["occupancy"] > 0 for r in gemms)


@pytest.mark.skipif(not cnnkernels.info()["cuda_ext"],
                    reason="cnnkernels._C was built without CUDA kernels")
def test_cuda_kernels_have_no_spills(audit):
    _, payload = audit
    rows = _rows(payload, "cuda")
    assert rows, "the extension was built with CUDA but no sm_90 kernel was found in it"
    bad = [(r["kernel"], r["variant"], r["error"], r["stack"], r["spill_store_bytes"])
           for r in rows if r["error"] or r["stack"] or r["spill_store_bytes"]
           or r["spill_load_bytes"]]
    assert not bad, "\n".join(map(str, bad))


def test_exit_status_says_whether_everything_compiled_without_spills(audit):
    done, payload = audit
    clean = all(not (r["error"] or r["stack"] or r["spill_store_bytes"] or r["spill_load_bytes"])
                for r in payload["rows"])
    assert (done.returncode == 0) == clean, done.stderr
    assert "| kernel | variant |" in done.stdout


def test_occupancy_of_an_h100_sm():
    # 255 registers, 4 warps: 2 blocks of 128 threads fit the register file
    assert kernels_audit.occupancy(255, 0, 4) == (8 / 64, "registers")
    # 32 registers, 4 warps: the 64-warp limit decides
    assert kernels_audit.occupancy(32, 0, 4) == (1.0, "warps")
    # 100 KB of shared memory per block: two blocks per SM
    assert kernels_audit.occupancy(32, 100 * 1024, 4) == (8 / 64, "shared")


def test_local_memory_accesses_are_counted_by_width():
    assert kernels_audit._access_bytes(".64") == 8
    assert kernels_audit._access_bytes(".128") == 16
    assert kernels_audit._access_bytes("") == 4

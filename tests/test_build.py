"""The build configuration (setup.py's NOISYNN_BUILD_CUDA / TORCH_CUDA_ARCH_LIST handling) and what the
compiled extension says about itself: runs on any machine, no GPU needed.

setup.py builds only when run as the setup script, so importing it here gives its helper functions.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from noisynn_kernels import BackendUnavailableError, NoiseConfig, _ext
from noisynn_kernels._ext import backend_status, extension
from noisynn_kernels._validate import check_mix_add_layernorm
from noisynn_kernels.ops.mix_add_layernorm import cpp as cpp_op

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("noisynn_setup_script", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines the helpers; setup() runs only as __main__
    return mod


def _build_info():
    ext = extension()
    if ext is None:
        pytest.skip(f"the compiled extension is not importable: {_ext.extension_error()}")
    return ext.build_info()


# --------------------------------------------------------------------------------------------------
# setup.py configuration


@pytest.mark.parametrize("value,mode", [(None, "auto"), ("", "auto"), ("auto", "auto"), (" AUTO ", "auto"),
                                        ("0", "0"), ("1", "1"), (" 1\n", "1")])
def test_build_cuda_mode(setup_py, value, mode):
    assert setup_py.cuda_build_mode(value) == mode


@pytest.mark.parametrize("value", ["2", "-1", "yes", "no", "true", "on", "cuda", "auto1", "0 1"])
def test_build_cuda_mode_rejects_other_values(setup_py, value):
    with pytest.raises(setup_py.BuildConfigError,
                       match=r"NOISYNN_BUILD_CUDA=.* is not a valid value.*'auto'.*'1'.*'0'"):
        setup_py.cuda_build_mode(value)


def test_setup_script_fails_loudly_on_a_bad_mode():
    env = dict(os.environ, NOISYNN_BUILD_CUDA="sometimes")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "setup.py"), "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "NOISYNN_BUILD_CUDA='sometimes' is not a valid value" in proc.stderr


def test_cuda_arch_list_default(setup_py):
    # PTX of the highest architecture is always in: a newer GPU JIT-compiles it instead of failing
    assert setup_py.cuda_arch_list({}) == "8.0;9.0+PTX" == setup_py.DEFAULT_CUDA_ARCH_LIST
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": " "}) == "8.0;9.0+PTX"
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}) == "9.0+PTX"
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0;8.0"}) == "9.0+PTX;8.0"
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0 8.6 12.0"}) == "8.0 8.6 12.0+PTX"
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0 8.6+PTX"}) == "8.0 8.6+PTX"
    assert setup_py.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0a"}) == "9.0a"  # torch's own names: as given


def test_decide_cuda(setup_py):
    decide, home = setup_py.decide_cuda, "/usr/local/cuda"
    assert decide("0", "13.0", home, "13.0") == (False, "NOISYNN_BUILD_CUDA=0")
    for mode in ("auto", "1"):
        build, why = decide(mode, "13.0", home, "13.0")
        assert build and "nvcc 13.0" in why
    build, why = decide("auto", None, home, "13.0")
    assert not build and "CPU-only build" in why
    build, why = decide("auto", "13.0", None, None)
    assert not build and "nvcc is missing" in why
    build, why = decide("auto", "12.8", home, "13.0")
    assert not build and "major" in why
    with pytest.raises(setup_py.BuildConfigError, match="NOISYNN_BUILD_CUDA=1 requires.*CPU-only build"):
        decide("1", None, home, "13.0")
    with pytest.raises(setup_py.BuildConfigError, match="NOISYNN_BUILD_CUDA=1 requires.*nvcc is missing"):
        decide("1", "13.0", None, None)
    with pytest.raises(setup_py.BuildConfigError, match="has no working bin/nvcc"):
        decide("1", "13.0", "/opt/nowhere", None)


def test_find_cuda_home(setup_py, tmp_path):
    find = setup_py.find_cuda_home
    assert find({"CUDA_HOME": "/opt/cuda-x"}, which=lambda _: None) == "/opt/cuda-x"
    assert find({"CUDA_PATH": "/opt/cuda-y"}, which=lambda _: None) == "/opt/cuda-y"
    # the toolkit of the nvcc on PATH
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("")
    assert find({}, which=lambda _: str(toolkit / "bin" / "nvcc")) == str(toolkit)
    # a wrapper script outside a toolkit (e.g. /usr/local/bin/nvcc) is not the toolkit; /usr/local/cuda is used
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text("#!/bin/sh\n")
    usr_local_cuda = os.path.join("/usr/local/cuda", "bin", "nvcc")
    assert find({}, which=lambda _: str(wrapper), exists=lambda p: p == usr_local_cuda) == "/usr/local/cuda"
    assert find({}, which=lambda _: str(wrapper), exists=lambda p: False) is None
    assert find({}, which=lambda _: None, exists=lambda p: False) is None


def test_nvcc_version(setup_py):
    class Done:
        stdout = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n"

    assert setup_py.nvcc_version("/opt/cuda", run=lambda *a, **k: Done()) == "13.0"
    assert setup_py.nvcc_version(None) is None

    def missing(*a, **k):
        raise FileNotFoundError("nvcc")

    assert setup_py.nvcc_version("/opt/cuda", run=missing) is None


# --------------------------------------------------------------------------------------------------
# the compiled extension


def test_build_info_reports_cuda():
    info = _build_info()
    for key in ("cuda", "cuda_kernels", "cuda_arch_list", "cuda_version", "cpu_kernels"):
        assert key in info, key
    assert isinstance(info["cuda"], bool) and isinstance(info["cuda_kernels"], list)
    # the C++ op has one schema; its CUDA implementation is registered (by dispatch key) only in CUDA builds
    registered = [torch._C._dispatch_has_kernel_for_dispatch_key(f"noisynn::mix_add_layernorm_{d}_cpp", "CUDA")
                  for d in ("fwd", "bwd")]
    assert all(torch._C._dispatch_has_kernel_for_dispatch_key(f"noisynn::mix_add_layernorm_{d}_cpp", "CPU")
               for d in ("fwd", "bwd"))
    if info["cuda"]:
        assert "mix_add_layernorm" in info["cuda_kernels"]
        assert re.fullmatch(r"\d+\.\d(;\d+\.\d)*", info["cuda_arch_list"]), info["cuda_arch_list"]
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"]), info["cuda_version"]
        assert registered == [True, True]
        assert cpp_op.available("cuda")
    else:
        assert info["cuda_kernels"] == [] and info["cuda_arch_list"] is None and info["cuda_version"] is None
        assert registered == [False, False]
        assert not cpp_op.available("cuda")


def test_build_info_matches_the_requested_build():
    """When the environment names a CUDA build (NOISYNN_BUILD_CUDA=1, as CI sets it), the extension has it."""
    info = _build_info()
    if os.environ.get("NOISYNN_BUILD_CUDA", "").strip() == "1":
        assert info["cuda"] and "mix_add_layernorm" in info["cuda_kernels"]
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if re.fullmatch(r"\d+\.\d(;\d+\.\d)*", arch):
            assert info["cuda_arch_list"] == arch


class _FakeExtension:
    def __init__(self, **info):
        self.info = info

    def build_info(self):
        return self.info


def _pretend_built(monkeypatch, **info):
    """Make noisynn_kernels._ext see an extension whose build_info() is ``info``."""
    monkeypatch.setattr(_ext, "_ext", _FakeExtension(**info))
    if hasattr(_ext, "_build_info"):  # the cached copy of build_info()
        monkeypatch.setattr(_ext, "_build_info", dict(info))


def test_a_gpu_the_build_cannot_run_on_is_reported(monkeypatch):
    """A CUDA build without code for this GPU (say a 9.0 build without PTX on an sm_120 GPU): the cuda
    backend says why and how to rebuild, is not chosen automatically, and backend_info shows it."""
    _pretend_built(monkeypatch, cpu_kernels=["mix_add_layernorm"], cuda_kernels=["mix_add_layernorm"], cuda=True,
                   cuda_arch_list="9.0", cuda_version="13.0")
    monkeypatch.setattr(_ext, "_cuda_image", {"loadable": False, "binary_version": 0, "ptx_version": 0,
                                              "error": "no kernel image is available for execution on the device",
                                              "device_capability": "12.0"})
    why = backend_status("cuda", "cuda")
    assert "compiled for 9.0" in why and "compute capability 12.0" in why and "TORCH_CUDA_ARCH_LIST=12.0" in why
    monkeypatch.delenv("NOISYNN_BACKEND", raising=False)
    assert _ext.select_backend("cuda", supported=("reference", "cuda")) == "reference"
    with pytest.raises(BackendUnavailableError, match="compute capability 12.0"):
        _ext.select_backend("cuda", "cuda")
    monkeypatch.setattr(_ext, "_cuda_image", {"loadable": True, "binary_version": 90, "ptx_version": 90,
                                              "error": "", "device_capability": "9.0"})
    assert backend_status("cuda", "cuda") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_kernels_load_on_this_gpu():
    image = _ext.cuda_kernel_image()
    if not cpp_op.available("cuda") and image is None:
        pytest.skip("the extension was built without CUDA kernels")
    assert image["loadable"], image
    assert "cuda_device" in _ext.backend_info()["extension"]


def test_backend_status_cuda_says_why(monkeypatch):
    assert "runs CUDA tensors only" in backend_status("cuda", "cpu")
    _pretend_built(monkeypatch, cpu_kernels=["mix_add_layernorm"], cuda_kernels=[], cuda=False)
    why = backend_status("cuda", "cuda")
    assert why is not None and "built without CUDA" in why and "NOISYNN_BUILD_CUDA" in why
    assert not cpp_op.available("cuda")
    with pytest.raises(BackendUnavailableError, match="built without CUDA"):
        cpp_op.launch_cuda(torch.randn(1, 2, 4), None, None, None, 1e-6,
                       check_mix_add_layernorm(torch.randn(1, 2, 4), None, None, None, 1e-6, None, 0, None, False),
                       False)
    _pretend_built(monkeypatch, cpu_kernels=["mix_add_layernorm"], cuda_kernels=["mix_add_layernorm"], cuda=True)
    assert backend_status("cuda", "cuda") is None


def test_backend_status_cuda_matches_the_build():
    info = _build_info()
    why = backend_status("cuda", "cuda")
    if "mix_add_layernorm" in info["cuda_kernels"]:
        assert why is None
    else:
        assert "built without CUDA" in why


def test_cuda_launch_refuses_cpu_tensors():
    x = torch.randn(2, 5, 8)
    spec = check_mix_add_layernorm(x, None, None, None, 1e-6, NoiseConfig(kind="shift"), 1, None, False)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        cpp_op.launch_cuda(x, None, None, None, 1e-6, spec, False)
    import noisynn_kernels as nk

    with pytest.raises(BackendUnavailableError, match="runs CUDA tensors only"):
        nk.mix_add_layernorm(x, backend="cuda")


# --------------------------------------------------------------------------------------------------
# the C++ op's one fake (meta) implementation and autograd wiring, for CPU, CUDA and meta tensors
# (no GPU needed: fake tensors never reach a kernel)

needs_cuda_ops = pytest.mark.skipif(not hasattr(torch.ops.noisynn, "mix_add_layernorm_fwd_cpp"),
                                    reason="the compiled extension (with the C++ op) is not importable")


@needs_cuda_ops
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_cuda_op_meta_shapes(dtype):
    x = torch.empty(3, 7, 40, dtype=dtype, device="meta")
    normed, res_out, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd_cpp(x, None, None, None, 1e-6, 2, 0, 0.3,
                                                                               1, None, 1, 1, False, False)
    assert normed.shape == res_out.shape == (3, 7, 40) and normed.dtype == res_out.dtype == dtype
    assert mean.shape == rstd.shape == (21,) and mean.dtype == rstd.dtype == torch.float32
    dx, dw, db = torch.ops.noisynn.mix_add_layernorm_bwd_cpp(normed, None, res_out, None, mean, rstd, 2, 0, 0.3, 1,
                                                              None, 1, 1, False)
    assert dx.shape == (3, 7, 40) and dx.dtype == dtype
    assert dw.shape == db.shape == (40,) and dw.dtype == db.dtype == torch.float32


@needs_cuda_ops
def test_cuda_op_fake_tensors_on_a_cuda_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 9, 16, dtype=torch.bfloat16, device="cuda")
        M = torch.empty(8, 8, device="cuda")
        normed, res_out, mean, rstd = torch.ops.noisynn.mix_add_layernorm_fwd_cpp(x, x, None, None, 1e-6, 3, 0, 0.3, 1,
                                                                                   M, 1, 1, True, False)
        assert normed.device.type == "cuda" and normed.shape == (2, 9, 16) and mean.shape == (18,)


@needs_cuda_ops
@pytest.mark.parametrize("straight_through", (False, True))
def test_cuda_op_autograd_on_meta_tensors(straight_through):
    """The registered autograd formula runs (through the backward op's fake implementation) and gives every
    input a gradient of its shape and dtype."""
    x, r = (torch.empty(2, 5, 8, dtype=torch.bfloat16, device="meta", requires_grad=True) for _ in range(2))
    w, b = (torch.empty(8, device="meta", requires_grad=True) for _ in range(2))
    normed, res_out, _, _ = torch.ops.noisynn.mix_add_layernorm_fwd_cpp(x, r, w, b, 1e-6, 1, 0, 0.3, -1, None, 1,
                                                                         1, False, straight_through)
    (normed.float().sum() + res_out.float().sum()).backward()
    assert x.grad.shape == r.grad.shape == (2, 5, 8) and x.grad.dtype == r.grad.dtype == torch.bfloat16
    assert w.grad.shape == b.grad.shape == (8,) and w.grad.dtype == b.grad.dtype == torch.float32


def test_cpp_op_codes_match_the_python_ones():
    """csrc/op_codes.h repeats noisynn_kernels._op_codes for C++: every kind and axis, the same value."""
    from noisynn_kernels._op_codes import AXIS_CODES, KIND_CODES

    with open(os.path.join(ROOT, "csrc", "op_codes.h")) as f:
        header = dict((name, int(v)) for name, v in re.findall(r"\b((?:KIND|AXIS)_[A-Z]+) = (\d+)", f.read()))
    expected = {f"KIND_{k.upper()}": c for k, c in KIND_CODES.items()}
    expected.update({f"AXIS_{a.upper()}": c for a, c in AXIS_CODES.items()})
    assert header == expected

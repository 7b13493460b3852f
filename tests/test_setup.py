"""setup.py's decisions about the CUDA sources, with a fake toolkit: builds that would
fail inside torch's extension builder skip the CUDA C++ kernels and say why."""
import importlib.util
import os
import pathlib
import stat

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def setup_py(monkeypatch):
    spec = importlib.util.spec_from_file_location("fused_nll_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (not __main__: setup() does not run)
    monkeypatch.delenv("FUSED_NLL_NO_CUDA", raising=False)
    monkeypatch.setattr(module.torch.version, "cuda", "12.4")
    return module


def fake_toolkit(root: pathlib.Path, release: str, headers: bool = True) -> str:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.0'\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return str(root)


def test_a_matching_toolkit_builds_the_cuda_sources(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "CUDA_HOME", fake_toolkit(tmp_path, "12.8"))
    assert setup_py.cuda_skip_reason() is None  # a minor difference: torch only warns


def test_another_cuda_major_version_is_skipped_with_the_reason(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "CUDA_HOME", fake_toolkit(tmp_path, "13.0"))
    reason = setup_py.cuda_skip_reason()
    assert "nvcc 13.0" in reason and "CUDA 12.4" in reason and "CUDA 12.x toolkit" in reason


def test_a_toolkit_without_headers_is_skipped(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "CUDA_HOME", fake_toolkit(tmp_path, "12.4", headers=False))
    assert "no include/cuda_runtime.h" in setup_py.cuda_skip_reason()


def test_no_nvcc_cpu_torch_or_opt_out(setup_py, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_py, "CUDA_HOME", str(tmp_path))
    assert "nvcc was not found" in setup_py.cuda_skip_reason()
    monkeypatch.setenv("FUSED_NLL_NO_CUDA", "1")
    assert "FUSED_NLL_NO_CUDA=1" in setup_py.cuda_skip_reason()
    monkeypatch.delenv("FUSED_NLL_NO_CUDA")
    monkeypatch.setattr(setup_py.torch.version, "cuda", None)
    assert "CPU-only build" in setup_py.cuda_skip_reason()


def test_default_arch_list_only_without_a_gpu_and_unless_set(setup_py, monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(setup_py.torch.cuda, "is_available", lambda: False)
    setup_py.default_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    setup_py.default_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.6"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(setup_py.torch.cuda, "is_available", lambda: True)
    setup_py.default_cuda_arch_list()  # a visible GPU: torch picks its architecture
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_the_installed_build_recorded_this_torch():
    from fused_nll import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert (_build_info.CUDA_SKIP_REASON is None) == torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_nll::cross_entropy_fwd", "CUDA")

"""python -m fused_nll info | verify | bench, as a user runs them."""
import subprocess
import sys

import pytest


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fused_nll", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_lists_every_backend():
    out = run("info")
    assert out.returncode == 0, out.stderr
    for name in ["cpp", "triton", "cuda"]:
        assert f"  {name} " in out.stdout
    assert "torch" in out.stdout and "default:" in out.stdout
    # the opt-in CUDA kernels, and how to turn them on
    assert "FUSED_NLL_CUDA_CLUSTER=1" in out.stdout and "FUSED_NLL_CUDA_ONE_BLOCK=1" in out.stdout
    # the CUDA tuning knobs and their current settings
    assert "L2 policies on (FUSED_NLL_CUDA_L2_HINTS=0" in out.stdout
    assert "FUSED_NLL_CUDA_GRAD_ROWS_PER_SM=k" in out.stdout


def test_info_gives_the_recorded_reason_the_cuda_kernels_were_skipped(monkeypatch):
    # setup.py records why it skipped the CUDA sources (fused_nll/_build_info.py, written
    # at build time); info must say that reason, not guess one.
    import types

    import torch

    from fused_nll import __main__ as cli

    info = types.SimpleNamespace(TORCH_VERSION=torch.__version__, CUDA_ARCH_LIST=None,
                                 CUDA_SKIP_REASON="nvcc 13.0 differs in major version from torch's CUDA 12.4")
    monkeypatch.setitem(sys.modules, "fused_nll._build_info", info)
    assert cli._cuda_skip_reason() == info.CUDA_SKIP_REASON
    info.TORCH_VERSION = "1.0.0"  # the extension was built against another torch
    assert cli._cuda_skip_reason() == f"fused_nll was built against torch 1.0.0, this is torch {torch.__version__}"
    if torch.version.cuda is not None and not cli._backend.cuda_cpp_built():
        (cuda,) = [why for name, _, why in cli.backend_report() if name == "cuda"]
        assert "built against torch 1.0.0" in cuda


def test_a_failed_extension_load_says_how_to_rebuild(monkeypatch):
    import types

    import torch

    from fused_nll import _ops

    monkeypatch.setitem(sys.modules, "fused_nll._build_info", types.SimpleNamespace(TORCH_VERSION="2.6.0"))
    msg = _ops._load_failure(ImportError("undefined symbol: _ZN3c10"))
    assert "undefined symbol" in msg and "built against torch 2.6.0" in msg and torch.__version__ in msg
    assert "pip install --no-build-isolation" in msg


def test_a_missing_or_broken_op_library_raises_import_error(monkeypatch, tmp_path):
    # The op library is loaded with torch.ops.load_library (a plain shared library, see
    # docs/deployment.md): its OSError, or no library at all, becomes the ImportError above.
    from fused_nll import _ops

    broken = tmp_path / "_C.so"
    broken.write_text("not a shared library")
    monkeypatch.setattr(_ops, "library_path", lambda: str(broken))
    with pytest.raises(ImportError, match="failed to load .*Rebuild it against the installed torch"):
        _ops._load_library()
    monkeypatch.setattr(_ops, "library_path", lambda: None)
    with pytest.raises(ImportError, match="was not found: it is not built.*pip install"):
        _ops._load_library()


def test_verify_passes_and_prints_a_table():
    out = run("verify", "--quick", "--device", "cpu", "--backend", "cpp")
    assert out.returncode == 0, out.stdout + out.stderr
    # the same inputs in every process (not Python's per-process string hash), a seed
    # picks others
    from fused_nll._verify import case_seed

    import os

    case = ("ce", (4, 7), True, -100, 0.1)
    got = subprocess.run([sys.executable, "-c", "from fused_nll._verify import case_seed; "
                          f"print(case_seed(0, {case!r}), case_seed(5, {case!r}))"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.split()
    assert got == [str(case_seed(0, case)), str(case_seed(5, case))] and got[0] != got[1]
    assert "--seed 0" in out.stdout
    assert "max err" in out.stdout and "PASS" in out.stdout and "FAIL" not in out.stdout
    assert "cases passed" in out.stdout and " ce-inpl " in out.stdout and " ce-amp " in out.stdout
    assert " ce-layout " in out.stdout and " prob-layout " in out.stdout and " ce-vmap " in out.stdout
    assert " prob-grads " in out.stdout and " ce-hvp " in out.stdout


def test_verify_checks_the_second_order_path(tmp_path):
    # a wrong torch-ops path for second-order transforms (functional._second_order_loss)
    # fails the "ce-hvp" cases, and only those
    (tmp_path / "sitecustomize.py").write_text(
        "from fused_nll import functional\n"
        "real = functional._second_order_loss\n"
        "functional._second_order_loss = lambda *a, **k: real(*a, **k) * 1.001\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-m", "fused_nll", "verify", "--quick", "--backend", "cpp",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = [line for line in out.stdout.splitlines() if line.startswith("FAIL ")]
    assert failed and all("'ce-hvp'" in line for line in failed), out.stdout


@pytest.mark.parametrize("op", ["fwd", "fwd_inplace"])
def test_verify_fails_on_a_wrong_kernel(tmp_path, op):
    # A sitecustomize that corrupts the CPU kernel's loss (the op, and the direct call
    # that eager code takes, _ops.eager_direct): verify must notice and exit 1.
    (tmp_path / "sitecustomize.py").write_text(
        "import fused_nll\n"
        "from fused_nll import _ops\n"
        "def corrupt(real):\n"
        "    return lambda *a, **k: (real(*a, **k)[0] * 1.001, *real(*a, **k)[1:])\n"
        f"_ops.CPP.{op} = corrupt(_ops.CPP.{op})\n"
        f"_ops.CPP.direct.{op} = corrupt(_ops.CPP.direct.{op})\n"
    )
    import os

    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-m", "fused_nll", "verify", "--quick", "--backend", "cpp",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAIL" in out.stdout and "Error" not in out.stdout  # wrong values, not a crash
    if op == "fwd_inplace":
        assert "'ce-inpl'" in out.stdout  # the failing cases are the in-place ones


def test_verify_refuses_an_unusable_backend():
    out = run("verify", "--device", "cpu", "--backend", "cuda")
    assert out.returncode == 2


def test_bench_quick_writes_csv(tmp_path):
    csv = tmp_path / "b.csv"
    out = run("bench", "--device", "cpu", "--shapes", "64x1000,2x5x3x4", "--dtypes", "fp32",
              "--reps", "2", "--impls", "fused_nll,eager", "--csv", str(csv))
    assert out.returncode == 0, out.stderr
    import csv as csv_module

    rows = list(csv_module.DictReader(csv.read_text().splitlines()))
    # per shape, fwd: fused_nll[cpp], torch eager; fwdbwd: those and fused_nll[cpp]
    # inplace_backward
    assert len(rows) == 2 * (2 + 3)
    assert [r["mode"] for r in rows if "inplace_backward" in r["impl"]] == ["fwdbwd"] * 2
    # K-dim (N, C, H, W): rows = N*H*W, V = C
    kdim = [r for r in rows if r["shape"] == "2x5x3x4"]
    assert len(kdim) == 5 and all((r["N"], r["V"]) == ("24", "5") for r in kdim)
    assert "% floor" in out.stdout
    assert {r["targets"] for r in rows} == {"index"} and kdim[0]["layout"] == "contiguous"


def test_bench_exact_implementation_names(tmp_path):
    # "=name" keeps that implementation only (gpu_check.sh's fp32 stage): not the
    # in-place variant that a substring would also keep
    csv = tmp_path / "b.csv"
    out = run("bench", "--device", "cpu", "--shapes", "16x100", "--dtypes", "fp32",
              "--reps", "1", "--modes", "fwdbwd", "--impls", "=fused_nll[cpp],eager",
              "--csv", str(csv))
    assert out.returncode == 0, out.stderr
    import csv as csv_module

    rows = list(csv_module.DictReader(csv.read_text().splitlines()))
    assert sorted(r["impl"] for r in rows) == ["fused_nll[cpp]", "torch eager"]


def test_bench_probability_targets_channels_last(tmp_path):
    csv = tmp_path / "b.csv"
    out = run("bench", "--device", "cpu", "--shapes", "2x5x3x4", "--dtypes", "fp32", "--reps", "2",
              "--impls", "fused_nll,eager", "--targets", "prob", "--layout", "channels_last",
              "--csv", str(csv))
    assert out.returncode == 0, out.stderr
    import csv as csv_module

    rows = list(csv_module.DictReader(csv.read_text().splitlines()))
    # no inplace_backward row: it needs contiguous logits
    assert sorted((r["impl"], r["mode"]) for r in rows) == [
        ("fused_nll[cpp]", "fwd"), ("fused_nll[cpp]", "fwdbwd"),
        ("torch eager", "fwd"), ("torch eager", "fwdbwd")]
    assert all((r["targets"], r["layout"]) == ("prob", "channels_last") for r in rows)
    assert "failed" not in out.stdout


def test_bench_per_sample_gradients(tmp_path):
    # --modes vmapgrad: torch.func.vmap(grad(loss)) over 16 samples; only the
    # implementations that work inside torch.func, only batches that split evenly
    csv = tmp_path / "b.csv"
    out = run("bench", "--device", "cpu", "--shapes", "64x100,8x100,16x5x3", "--dtypes", "fp32",
              "--reps", "2", "--modes", "vmapgrad", "--csv", str(csv))
    assert out.returncode == 0, out.stderr
    import csv as csv_module

    rows = list(csv_module.DictReader(csv.read_text().splitlines()))
    assert sorted((r["impl"], r["shape"]) for r in rows) == [
        ("fused_nll[cpp]", "16x5x3"), ("fused_nll[cpp]", "64x100"),
        ("torch eager", "16x5x3"), ("torch eager", "64x100")]
    assert all(r["mode"] == "vmapgrad" for r in rows) and "failed" not in out.stdout


def test_bench_filters():
    # An implementation marked fwdbwd_only (the same as the plain call without a
    # gradient) is timed in fwd+bwd only, one marked fwd_only in the forward only.
    from fused_nll import _bench

    def impl(x, t):
        return x

    plain, both, fwd = impl, lambda x, t: x, lambda x, t: x
    both.fwdbwd_only = True
    fwd.fwd_only = True
    shape = (64, 100)
    assert _bench.applies_to_mode(plain, shape, "fwd") and _bench.applies_to_mode(plain, shape, "fwdbwd")
    assert not _bench.applies_to_mode(both, shape, "fwd") and _bench.applies_to_mode(both, shape, "fwdbwd")
    assert _bench.applies_to_mode(fwd, shape, "fwd") and not _bench.applies_to_mode(fwd, shape, "fwdbwd")

    short = lambda x, t: x  # noqa: E731
    short.max_classes = 32768  # e.g. the CUDA one-block kernel
    assert _bench.applies(short, (64, 32000)) and not _bench.applies(short, (64, 128256))
    assert _bench.applies(plain, (64, 128256))


def test_default_cuda_backend_follows_the_measured_layouts(monkeypatch):
    # With both GPU backends usable, CUDA tensors take the CUDA C++ kernels where they
    # were measured faster (class-strided K-dim logits, rows of 16384-32768 classes) and
    # the Triton kernels elsewhere; a forced backend wins; without the CUDA C++ kernels
    # everything stays on Triton. Meta tensors stand in for CUDA ones (layouts only).
    import torch

    import fused_nll
    from fused_nll import _backend

    def meta(*shape):
        return torch.empty(shape, device="meta")

    seg = meta(16, 21, 512, 512)
    cases = [(seg, True), (seg.to(memory_format=torch.channels_last), False),
             (meta(8192, 32000), True), (meta(4, 16384), True), (meta(4, 32768), True),
             (meta(4, 32769), False), (meta(8192, 128256), False), (meta(64, 1000), False),
             (meta(8, 21, 1), False), (meta(32000), True),
             # classes innermost: not class-strided (the public functions pass its (R, C) view)
             (meta(4, 7, 32000).transpose(1, 2), False)]
    for x, want in cases:
        assert _backend.prefers_cuda_cpp(x) is want, (tuple(x.shape), x.stride())
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "triton_status", lambda: (True, "ok"))
    for built in (True, False):
        monkeypatch.setattr(_backend, "_CUDA_CPP_BUILT", built)
        for x, want in cases:
            assert _backend.select(cuda, x) == ("cuda" if want and built else "triton")
            with fused_nll.use_backend("triton"):
                assert _backend.select(cuda, x) == "triton"
        assert _backend.select(cuda) == "triton"  # by device alone
    # the public functions choose with the input
    seen = []
    real = _backend.select
    monkeypatch.setattr(_backend, "select", lambda device, input=None: seen.append(input) or real(device, input))
    x = torch.randn(3, 5, 2)
    fused_nll.cross_entropy(x, torch.randint(0, 5, (3, 2)))
    assert any(s is not None and s.shape == x.shape for s in seen), seen


def test_use_backend_as_a_call_and_as_a_block():
    # README: `fused_nll.use_backend("cpp")` forces a backend from there on; as a `with`
    # block it puts back the choice before it (nested blocks too); a bad name raises at
    # the call, and a CPU-only backend on CUDA tensors (meta stands in) is refused.
    import torch

    import fused_nll
    from fused_nll import _backend

    before = _backend._forced[0]
    try:
        fused_nll.use_backend(None)
        assert _backend.select(torch.device("cpu")) == "cpp" and _backend._forced[0] is None
        fused_nll.use_backend("cpp")  # a plain call
        assert _backend._forced[0] == "cpp"
        with pytest.raises(RuntimeError, match="backend 'cpp' runs on CPU tensors only"):
            _backend.select(torch.device("cuda"))
        with fused_nll.use_backend("cuda") as choice:
            assert _backend._forced[0] == "cuda" and repr(choice) == "fused_nll.use_backend('cuda')"
            with fused_nll.use_backend(None):
                assert _backend._forced[0] is None
            assert _backend._forced[0] == "cuda"
        assert _backend._forced[0] == "cpp"
        with pytest.raises(ValueError, match="unknown backend 'gpu'"):
            fused_nll.use_backend("gpu")
        assert _backend._forced[0] == "cpp"
        # a decorator: inside each call only (not from the definition on), eager and
        # compiled; an object kept and entered later restores the choice at its entry
        fused_nll.use_backend(None)

        @fused_nll.use_backend("cpp")
        def chosen():
            return _backend._forced[0]

        assert _backend._forced[0] is None and chosen() == "cpp" and _backend._forced[0] is None
        assert torch.compile(chosen, fullgraph=True, backend="eager")() == "cpp"
        kept = fused_nll.use_backend("cuda")
        fused_nll.use_backend("triton")
        with kept:
            assert _backend._forced[0] == "cuda"
        assert _backend._forced[0] == "triton"
        with pytest.raises(KeyError):
            with fused_nll.use_backend("cpp"):
                raise KeyError
        assert _backend._forced[0] == "triton"
    finally:
        fused_nll.use_backend(before)
    assert _backend._forced[0] == before

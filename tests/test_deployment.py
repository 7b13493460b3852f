"""Deployment (docs/deployment.md): a model whose losses call fused_nll, exported with
torch.export and compiled ahead of time by AOTInductor into a package, runs from Python
(`aoti_load_package`) and from a C++ program with no Python (tests/cpp/aoti_runner.cpp,
which dlopens fused_nll's op library). Both are compared with torch in fp64 at a batch
size other than the one exported (the batch dimension is dynamic). On the CPU with the
C++ kernels; on a GPU (benchmarks/gpu_check.sh) with the Triton kernels (compiled into
the package) and with the CUDA C++ kernels."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

import fused_nll
from fused_nll._reference import close, reference

from conftest import TARGETS

ROOT = Path(__file__).resolve().parent.parent
CLASSES, IGNORE = 10, -1

pytestmark = [pytest.mark.skipif(shutil.which("g++") is None,
                                 reason="AOTInductor and the C++ runner need g++"),
              # one pytest-xdist worker for the whole file (--dist loadgroup): its
              # module-scoped export and AOTInductor compile are then made once
              pytest.mark.xdist_group("deployment")]
# Not the Triton interpreter: AOTInductor compiles Triton kernels for a GPU only.
DEPLOY_TARGETS = [t for t in TARGETS if t != ("cpu", "triton")]


class EvalLosses(torch.nn.Module):
    """An evaluation step's losses on (N, C) logits: weighted, smoothed cross-entropy
    with ignored rows (mean); per-row nll_loss of log-probabilities; soft targets (sum)."""

    def __init__(self):
        super().__init__()
        self.ce = fused_nll.CrossEntropyLoss(weight=torch.rand(CLASSES) + 0.5, ignore_index=IGNORE,
                                             label_smoothing=0.1)

    def forward(self, logits, target, probs):
        return (self.ce(logits, target),
                fused_nll.nll_loss(torch.log_softmax(logits, 1), target, ignore_index=IGNORE,
                                   reduction="none"),
                fused_nll.cross_entropy(logits, probs, reduction="sum"))


def inputs(rows: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, CLASSES, generator=g) * 3
    target = torch.randint(0, CLASSES, (rows,), generator=g)
    target[::4] = IGNORE
    probs = torch.softmax(torch.randn(rows, CLASSES, generator=g), 1)
    return logits.to(device), target.to(device), probs.to(device)


def references(model: EvalLosses, logits, target, probs):
    """torch's three losses in fp64 on the same inputs."""
    w = model.ce.weight.cpu()
    logits, target, probs = logits.cpu(), target.cpu(), probs.cpu()
    ce, _ = reference("cross_entropy", logits, target, weight=w, ignore_index=IGNORE,
                      label_smoothing=0.1)
    nll, _ = reference("nll_loss", torch.log_softmax(logits.double(), 1), target,
                       ignore_index=IGNORE, reduction="none")
    soft, _ = reference("cross_entropy", logits, probs, reduction="sum")
    return ce, nll, soft


def assert_matches_torch(outputs, refs):
    assert len(outputs) == len(refs)
    for name, out, ref in zip(("cross_entropy", "nll_loss", "soft cross_entropy"), outputs, refs):
        assert out.dtype == torch.float32 and out.shape == ref.shape, (name, out.dtype, out.shape)
        ok, detail = close(out, ref, torch.float32)
        assert ok, f"{name}: {detail}"


@pytest.fixture(scope="module", params=DEPLOY_TARGETS, ids=["/".join(t) for t in DEPLOY_TARGETS])
def exported(request):
    """(model, exported program, device): EvalLosses exported with a dynamic batch
    dimension, on the device, with the backend forced."""
    device, backend = request.param
    torch.manual_seed(0)
    model = EvalLosses().eval().to(device)
    rows = torch.export.Dim("rows", min=2, max=1 << 20)
    with fused_nll.use_backend(backend):
        program = torch.export.export(model, inputs(8, seed=1, device=device),
                                      dynamic_shapes=({0: rows}, {0: rows}, {0: rows}))
    assert any("fused_nll" in str(n.target) for n in program.graph.nodes)
    return model, program, device


@pytest.fixture(scope="module")
def package(exported, tmp_path_factory):
    """(model, package path, device): the AOTInductor package of the exported program."""
    model, program, device = exported
    path = tmp_path_factory.mktemp("aoti") / "eval_losses.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return model, str(path), device


def test_exported_program_saves_and_loads(exported, tmp_path):
    # torch.export.save / load (the .pt2 of an ExportedProgram, not compiled): the
    # loading process needs fused_nll imported, as for any custom op.
    model, program, device = exported
    torch.export.save(program, tmp_path / "eval_losses_ep.pt2")
    loaded = torch.export.load(tmp_path / "eval_losses_ep.pt2")
    x, t, y = inputs(13, seed=4, device=device)
    assert_matches_torch(loaded.module()(x, t, y), references(model, x, t, y))


def test_aoti_package_runs_from_python(package):
    model, path, device = package
    runner = torch._inductor.aoti_load_package(path)
    x, t, y = inputs(13, seed=2, device=device)
    assert_matches_torch(runner(x, t, y), references(model, x, t, y))


def test_exported_module_trains():
    # The exported graph is torch.export's training IR: backward through ep.module()
    # runs fused_nll's autograd, and the parameter gradients are torch's.
    torch.manual_seed(5)
    head = torch.nn.Linear(8, CLASSES).double()
    h, t = torch.randn(6, 8, dtype=torch.float64), torch.randint(0, CLASSES, (6,))
    t[2] = IGNORE

    class Step(torch.nn.Module):
        def __init__(self, loss):
            super().__init__()
            self.head, self.loss = head, loss

        def forward(self, h, t):
            return self.loss(self.head(h), t, ignore_index=IGNORE, label_smoothing=0.1)

    module = torch.export.export(Step(fused_nll.cross_entropy), (h, t)).module()
    module(h, t).backward()
    grads = [p.grad.clone() for p in module.parameters()]
    assert len(grads) == 2 and all(g is not None for g in grads)
    head.zero_grad()
    Step(torch.nn.functional.cross_entropy)(h, t).backward()
    for got, want in zip(grads, [head.weight.grad, head.bias.grad]):
        ok, detail = close(got, want, torch.float64)
        assert ok, detail


@pytest.fixture(scope="module")
def cpp_runner(tmp_path_factory):
    """tests/cpp/aoti_runner.cpp built against this torch's libtorch (no Python)."""
    exe = tmp_path_factory.mktemp("runner") / "aoti_runner"
    lib_dirs = cpp_extension.library_paths()
    libs = ["-ltorch", "-ltorch_cpu", "-lc10"]
    if any((Path(d) / "libtorch_cuda.so").exists() for d in lib_dirs):
        # A CUDA build of torch: its CUDA libraries run CUDA packages, and the op
        # library's CUDA kernels need them loaded (docs/deployment.md).
        libs += ["-ltorch_cuda", "-lc10_cuda"]
    cmd = ["g++", "-std=c++20", "-O1", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{d}" for d in cpp_extension.include_paths()],
           str(ROOT / "tests/cpp/aoti_runner.cpp"), "-o", str(exe),
           *[f"-L{d}" for d in lib_dirs], *[f"-Wl,-rpath,{d}" for d in lib_dirs],
           "-Wl,--no-as-needed", *libs, "-ldl"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    return exe


def _save(tensor: torch.Tensor, path: Path) -> str:
    """FILE:DTYPE:SHAPE, the runner's input format."""
    path.write_bytes(bytes(tensor.contiguous().untyped_storage()))
    return f"{path}:{str(tensor.dtype).removeprefix('torch.')}:{'x'.join(map(str, tensor.shape))}"


def test_aoti_package_runs_from_cpp_without_python(package, cpp_runner, tmp_path):
    model, path, device = package
    x, t, y = inputs(13, seed=3)
    specs = [_save(v, tmp_path / f"in{i}.bin") for i, v in enumerate((x, t, y))]
    run = subprocess.run([str(cpp_runner), fused_nll.library_path(), path, device,
                          str(tmp_path / "out"), *specs], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert lines == ["output 0 Float ", "output 1 Float 13", "output 2 Float "], lines
    outputs = []
    for i in range(3):
        data = bytearray((tmp_path / f"out{i}.bin").read_bytes())
        outputs.append(torch.frombuffer(data, dtype=torch.float32).reshape([13] if i == 1 else []))
    assert_matches_torch(outputs, references(model, x, t, y))


def test_the_op_library_needs_no_python():
    # The runner above dlopens it with RTLD_NOW; this says why when that would fail.
    if shutil.which("nm") is None:
        pytest.skip("needs nm")
    symbols = subprocess.run(["nm", "-D", "--undefined-only", fused_nll.library_path()],
                             capture_output=True, text=True, check=True).stdout
    python_symbols = [s for s in symbols.split() if s.startswith(("Py", "_Py"))]
    assert python_symbols == [], python_symbols

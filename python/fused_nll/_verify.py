"""`python -m fused_nll verify`: a parity matrix of fused_nll against torch's
nn.CrossEntropyLoss and nn.NLLLoss(log_softmax(x)) (in fp64, on the same
inputs), loss and gradient, for every backend usable on the device; also
cross_entropy with inplace_backward=True ("ce-inpl"), under torch.autocast ("ce-amp":
the loss must have torch's autocast dtype, float32 for fp16/bf16, at fp32 precision),
on logits in another memory layout (channels-last (N, C, H, W), a transposed (C, N)
matrix) with class-index ("ce-layout") and probability ("prob-layout") targets, and
per-sample losses and gradients by torch.func.vmap(grad(...)) over two halves of the
batch ("ce-vmap", against torch's module on each half), and the gradients with respect
to probability targets and the class weight ("prob-grads": both require grad, as a
distillation target from a model being trained or learned class weights), and a
Hessian-vector product by torch.func.jvp(grad(...)) ("ce-hvp": second order, which
fused_nll computes with torch's ops, in the accumulation dtype).
Shapes: LM-like rows, short rows, (N, C, H, W) with a few and with many pixels, and
70000 rows of 3 classes for "ce" and "nll" (not fp16): a mean's divisor summed over more
rows than one GPU program or block sums (and than a serial fp32 sum keeps exact enough)."""
from __future__ import annotations

import itertools
import time
import zlib

import torch
import torch.nn as nn

import fused_nll
from fused_nll import _backend
from fused_nll._reference import compare, tolerance

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]


def _torch_reference(kind, x, target, weight, ignore_index, reduction, label_smoothing, grad_out):
    """torch's modules in fp64 on the same (rounded) input: nn.CrossEntropyLoss
    on logits, or nn.NLLLoss on log-probabilities (x = log_softmax(logits))."""
    x64 = x.detach().double().requires_grad_(True)
    w64 = None if weight is None else weight.double()
    if kind == "nll":
        loss = nn.NLLLoss(weight=w64, ignore_index=ignore_index, reduction=reduction)(x64, target)
    else:
        module = nn.CrossEntropyLoss(weight=w64, ignore_index=ignore_index, reduction=reduction,
                                     label_smoothing=label_smoothing)
        loss = module(x64, target.double() if target.is_floating_point() else target)
    (grad,) = torch.autograd.grad(loss, x64, grad_out.double())
    return loss.detach(), grad


MANY_ROWS = (70000, 3)  # > 65536 rows (Triton: one program's part of W), > 16384 (CUDA C++)


def cases(quick: bool, many_rows: bool = True):
    """(kind, shape, weighted, ignore_index, label_smoothing) combinations.
    many_rows: include MANY_ROWS (not through the Triton interpreter: minutes there)."""
    if many_rows and not quick:
        for weighted, ls in itertools.product([False, True], [0.0, 0.1]):
            yield "ce", MANY_ROWS, weighted, -100, ls
        for weighted in [False, True]:
            yield "nll", MANY_ROWS, weighted, -100, 0.0
    shapes = [(16, 1000), (4, 33, 3, 2), (70, 21), (2, 21, 9, 7)] if not quick else [(8, 257)]
    for shape, weighted in itertools.product(shapes, [False, True]):
        for ignore_index, ls in itertools.product([-100, 1], [0.0, 0.1]):
            yield "ce", shape, weighted, ignore_index, ls
        for ls in [0.0, 0.1]:
            yield "ce-prob", shape, weighted, -100, ls
            yield "prob-grads", shape, weighted, -100, ls
        for ignore_index in [-100, 1]:
            yield "nll", shape, weighted, ignore_index, 0.0
        for ls in [0.0, 0.1]:  # inplace_backward=True: the gradient over the logits
            yield "ce-inpl", shape, weighted, -100, ls
        for ls in [0.0, 0.1]:  # under torch.autocast (bf16)
            yield "ce-amp", shape, weighted, -100, ls
        for ls in [0.0, 0.1]:  # channels-last / transposed logits
            yield "ce-layout", shape, weighted, -100, ls
            yield "prob-layout", shape, weighted, -100, ls
        for ls in [0.0, 0.1]:  # torch.func: per-sample gradients
            yield "ce-vmap", shape, weighted, -100, ls
        for ls in [0.0, 0.1]:  # torch.func: second order
            yield "ce-hvp", shape, weighted, -100, ls


def _per_sample_case(x, target, weight, ignore_index, reduction, ls, gen, device):
    """"ce-vmap": the batch as two samples of N/2 rows; vmap of the loss and
    vmap(grad(...)) of the loss times a per-sample upstream gradient, against torch
    per sample. Returns (loss, grad, reference loss, reference grad, upstream)."""
    xs, ts = x.unflatten(0, (2, -1)), target.unflatten(0, (2, -1))

    def loss_of(xb, tb):
        return fused_nll.cross_entropy(xb, tb, weight=weight, ignore_index=ignore_index,
                                       reduction=reduction, label_smoothing=ls)

    loss = torch.func.vmap(loss_of)(xs, ts)
    grad_out = (torch.randn(loss.shape, generator=gen, dtype=torch.float64) if reduction == "none"
                else torch.ones(loss.shape, dtype=torch.float64)).to(loss.dtype).to(device)
    grad = torch.func.vmap(torch.func.grad(lambda xb, tb, gb: (loss_of(xb, tb) * gb).sum()))(
        xs, ts, grad_out)
    refs = [_torch_reference("ce", xs[b], ts[b], weight, ignore_index, reduction, ls, grad_out[b])
            for b in range(2)]
    return (loss, grad, torch.stack([r[0] for r in refs]), torch.stack([r[1] for r in refs]),
            grad_out)


def _target_weight_case(x, target, weight, reduction, ls, gen, device):
    """"prob-grads": the gradients of cross_entropy with respect to the logits, the
    probability targets and the weight (when given), against torch's in fp64.
    Returns (ok, max error, fraction of the tolerance) over the loss and the three."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, target, weight)
              if t is not None]
    loss = fused_nll.cross_entropy(*leaves[:2], weight=leaves[2] if weight is not None else None,
                                   reduction=reduction, label_smoothing=ls)
    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = nn.functional.cross_entropy(*refs[:2], weight=refs[2] if weight is not None else None,
                                      reduction=reduction, label_smoothing=ls)
    grad_out = (torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype).to(device)
                if reduction == "none" else torch.ones((), dtype=loss.dtype, device=device))
    grads = torch.autograd.grad(loss, leaves, grad_out)
    ref_grads = torch.autograd.grad(ref, refs, grad_out.double())
    rows = max(1, x.numel() // x.shape[1]) if reduction == "mean" else 1
    floor = grad_out.abs().max().item() / rows
    results = [compare(loss, ref, x.dtype)]
    for leaf, g, r in zip(leaves, grads, ref_grads):
        # each in its tensor's dtype, at the looser of its and the logits' tolerance
        dtype = max((x.dtype, leaf.dtype), key=lambda d: tolerance(d)[0])
        results.append(compare(g, r, dtype, scale_floor=floor) if g.dtype == leaf.dtype
                       else (False, float("inf"), float("inf"), f"dtype {g.dtype}"))
    return (all(r[0] for r in results), max(r[1] for r in results),
            max(r[2] for r in results))


def _hvp_case(x, target, weight, ignore_index, reduction, ls, gen, device):
    """"ce-hvp": the gradient and a Hessian-vector product of the loss (summed for
    reduction="none"), by torch.func.jvp(grad(...)), against torch's in fp64.
    Returns (ok, max error, fraction of the tolerance) over the two."""
    v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(device)

    def loss_of(fn, w):
        return lambda a: fn(a, target, weight=w, ignore_index=ignore_index,
                            reduction=reduction, label_smoothing=ls).sum()

    grad, hvp = torch.func.jvp(torch.func.grad(loss_of(fused_nll.cross_entropy, weight)),
                               (x,), (v,))
    w64 = None if weight is None else weight.double()
    ref_grad, ref_hvp = torch.func.jvp(torch.func.grad(loss_of(nn.functional.cross_entropy, w64)),
                                       (x.double(),), (v.double(),))
    rows = max(1, x.numel() // x.shape[1]) if reduction == "mean" else 1
    results = [compare(grad, ref_grad, x.dtype, scale_floor=1 / rows),
               compare(hvp, ref_hvp, x.dtype, scale_floor=v.abs().max().item() / rows)]
    dtypes_ok = grad.dtype == hvp.dtype == x.dtype
    return (dtypes_ok and all(r[0] for r in results), max(r[1] for r in results),
            max(r[2] for r in results))


def case_seed(seed: int, case) -> int:
    """The inputs' seed of one case: the run's seed and the case itself, not Python's
    hash (randomised per process for strings), so that a run repeats exactly."""
    return (seed ^ zlib.crc32(repr(case).encode())) % 2**31


def run_case(kind, shape, weighted, ignore_index, ls, dtype, reduction, device, seed=0):
    gen = torch.Generator().manual_seed(case_seed(seed, (kind, shape, weighted, ignore_index, ls)))
    classes = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype).to(device)
    rows_shape = (shape[0], *shape[2:])
    if kind.endswith("-layout"):  # the same values; K-dim: classes innermost in memory
        # (channels-last); 2-D: a transposed (C, N) matrix, classes N apart
        x = x.movedim(1, -1).contiguous().movedim(-1, 1) if x.dim() > 2 else x.t().contiguous().t()
    if kind in ("ce-prob", "prob-layout", "prob-grads"):
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=torch.float64), 1).to(dtype).to(device)
    else:
        target = torch.randint(0, classes, rows_shape, generator=gen)
        target.view(-1)[::5] = ignore_index  # some ignored rows
        target = target.to(device)
    weight = (torch.rand(classes, generator=gen) + 0.2).to(device) if weighted else None
    if kind == "nll":  # nll_loss takes log-probabilities
        x = torch.log_softmax(x.double(), 1).to(dtype)
    if kind == "prob-grads":
        return _target_weight_case(x, target, weight, reduction, ls, gen, device)
    if kind == "ce-hvp":
        return _hvp_case(x, target, weight, ignore_index, reduction, ls, gen, device)
    if kind == "ce-vmap":
        loss, grad, ref_loss, ref_grad, grad_out = _per_sample_case(
            x, target, weight, ignore_index, reduction, ls, gen, device)
        ok_l, err_l, ratio_l, _ = compare(loss, ref_loss, dtype)
        ok_g, err_g, ratio_g, _ = compare(grad, ref_grad, dtype, scale_floor=grad_out.abs().max()
                                          .item() / max(1, x.numel() // classes // 2))
        return ok_l and ok_g, max(err_l, err_g), max(ratio_l, ratio_g)
    xin = x.detach().clone().requires_grad_(True)
    if kind == "nll":
        loss = fused_nll.nll_loss(xin, target, weight=weight, ignore_index=ignore_index, reduction=reduction)
    else:
        inplace = kind == "ce-inpl"  # on a non-leaf copy, as a model's logits
        with torch.autocast(device, dtype=torch.bfloat16, enabled=kind == "ce-amp"):
            loss = fused_nll.cross_entropy(xin.clone() if inplace else xin, target, weight=weight,
                                           ignore_index=ignore_index, reduction=reduction,
                                           label_smoothing=ls, inplace_backward=inplace)
            if kind == "ce-amp":
                w_same = None if weight is None else weight.to(x.dtype)  # torch's nll needs it
                torch_dtype = nn.functional.cross_entropy(x, target, weight=w_same).dtype
    grad_out = (torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype).to(device)
                if reduction == "none" else torch.ones((), dtype=loss.dtype, device=device))
    (grad,) = torch.autograd.grad(loss, xin, grad_out)

    ref_loss, ref_grad = _torch_reference(kind, xin, target, weight, ignore_index, reduction, ls, grad_out)
    rows = max(1, x.numel() // classes)
    if kind == "ce-amp" and loss.dtype != torch_dtype:
        raise TypeError(f"loss dtype {loss.dtype}, torch's {torch_dtype}")
    ok_l, err_l, ratio_l, _ = compare(loss, ref_loss, loss.dtype if kind == "ce-amp" else dtype)
    ok_g, err_g, ratio_g, _ = compare(grad, ref_grad, dtype, scale_floor=grad_out.abs().max().item() / rows)
    return ok_l and ok_g, max(err_l, err_g), max(ratio_l, ratio_g)


def backends_for(device: str) -> list[str]:
    usable = []
    for name in _backend.BACKENDS:
        try:
            with fused_nll.use_backend(name):
                _backend.select(torch.device(device))
            usable.append(name)
        except RuntimeError:
            pass
    return usable


def run(device: str | None = None, backend: str | None = None, quick: bool = False,
        seed: int = 0) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("verify: --device cuda, but torch sees no CUDA GPU.")
        return 2
    backends = [backend] if backend else backends_for(device)
    if backend and backend not in backends_for(device):
        print(f"verify: backend {backend!r} cannot run on {device} here (see python -m fused_nll info).")
        return 2
    print(f"fused_nll verify on {device}: backends {', '.join(backends)}; reference: torch "
          f"{torch.__version__} nn.CrossEntropyLoss / nn.NLLLoss(log_softmax) in fp64; inputs: "
          f"--seed {seed}")
    print("(max err: the largest absolute difference from the reference; of tol: the "
          "largest difference as a fraction of its tolerance, rtol·|ref| + atol·max|ref|: "
          "PASS when every case is <= 1)")
    header = f"{'backend':8s} {'dtype':9s} {'case':11s} {'reduction':9s} {'cases':>5s} {'max err':>10s} {'rtol':>8s} {'of tol':>7s}  result"
    print(header)
    print("-" * len(header))
    failures, total, start = [], 0, time.perf_counter()
    for name in backends:
        with fused_nll.use_backend(name):
            for dtype, kind, reduction in itertools.product(DTYPES, ["ce", "ce-prob", "nll", "ce-inpl",
                                                                    "ce-amp", "ce-layout",
                                                                    "prob-layout", "ce-vmap",
                                                                    "prob-grads", "ce-hvp"],
                                                            REDUCTIONS):
                # (MANY_ROWS not in fp16, whose sum of 70000 losses overflows and whose
                # mean's gradient, ~1/70000, is subnormal, so no longer at fp16's rtol)
                many_rows = (device != "cpu" or name != "triton") and dtype != torch.float16
                group = [c for c in cases(quick, many_rows) if c[0] == kind]
                worst_err, worst_ratio, ok_all = 0.0, 0.0, True
                for case in group:
                    try:
                        ok, err, ratio = run_case(*case, dtype, reduction, device, seed)
                    except Exception as exc:  # report, keep going
                        ok, err, ratio = False, float("inf"), float("inf")
                        failures.append((name, dtype, reduction, case, f"{type(exc).__name__}: {exc}"))
                    else:
                        if not ok:
                            failures.append((name, dtype, reduction, case, f"max err {err:.3g} ({ratio:.2f} of tolerance)"))
                    worst_err, worst_ratio = max(worst_err, err), max(worst_ratio, ratio)
                    ok_all &= ok
                    total += 1
                dname = str(dtype).replace("torch.", "")
                print(f"{name:8s} {dname:9s} {kind:11s} {reduction:9s} {len(group):5d} {worst_err:10.3g} "
                      f"{tolerance(dtype)[0]:8.1g} {worst_ratio:7.2f}  {'PASS' if ok_all else 'FAIL'}")
    elapsed = time.perf_counter() - start
    for name, dtype, reduction, case, why in failures:
        print(f"FAIL {name} {dtype} reduction={reduction} case={case}: {why}")
    if failures:
        print(f"(the same inputs again: python -m fused_nll verify --seed {seed} "
              f"--device {device}{' --quick' if quick else ''})")
    print(f"{total - len(failures)}/{total} cases passed in {elapsed:.1f} s"
          + ("" if not failures else f"; {len(failures)} FAILED"))
    return 1 if failures else 0

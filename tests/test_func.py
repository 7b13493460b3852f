"""torch.func: vmap (the ops' batching rules: one call, no per-sample loop),
per-sample gradients vmap(grad), vjp / jacrev / jvp / jacfwd, against torch's fp64
reference on every backend runnable here; second-order transforms (computed with torch's
ops) against torch's."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import fused_nll
from conftest import cpu_kernel_only
from fused_nll import _func
from fused_nll._reference import close

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# torch 2.6: reverse mode through a vmap of the loss fails inside torch, so fused_nll
# refuses it up front with this message (fused_nll._func.refuse_reverse_mode_through_vmap)
OLD_TORCH_VMAP_BACKWARD = not _func._VMAP_BACKWARD_TAKES_NONE
REVERSE_THROUGH_VMAP = "reverse-mode derivatives through a torch.func.vmap"
REDUCTIONS = ["none", "mean", "sum"]
B, C = 3, 7


def _case(kind, per_sample, dtype, device, seed=0):
    """Batched logits (B, *per_sample), targets and per-class weight. Index targets
    ignore some rows; one sample (when it has several rows) ignores all of them."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, *per_sample, generator=g, dtype=torch.float64) * 3)
    rows = [per_sample[0], *per_sample[2:]] if len(per_sample) > 1 else []
    if kind == "prob":
        t = torch.softmax(torch.randn(B, *per_sample, generator=g, dtype=torch.float64), 2
                          if len(per_sample) > 1 else 1).to(dtype)
    else:
        t = torch.randint(0, C, (B, *rows), generator=g)
        t.view(-1)[::4] = -100
        if rows:
            t[1] = -100
    if kind == "nll":
        x = torch.log_softmax(x, 2 if len(per_sample) > 1 else 1)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1
    return x.to(dtype).to(device), t.to(device), w.to(device)


def _fused(kind, **kw):
    fn = fused_nll.nll_loss if kind == "nll" else fused_nll.cross_entropy
    return lambda x, t: fn(x, t, **kw)


def _torch64(kind, weight=None, **kw):
    """torch's function in fp64, on one sample (looped over samples by the caller)."""
    fn = F.nll_loss if kind == "nll" else F.cross_entropy
    w = None if weight is None else weight.double()
    return lambda x, t: fn(x.double(), t.double() if t.is_floating_point() else t, weight=w, **kw)


def _per_sample(f, *args):
    return torch.stack([f(*(a[b] for a in args)) for b in range(B)])


def _options(kind, weighted, smoothing, w):
    kw = {"weight": w if weighted else None}
    if kind != "nll":
        kw["label_smoothing"] = smoothing
    return kw


def _no_fallback(record):
    slow = [str(r.message) for r in record if "fallback" in str(r.message).lower()
            or "performance drop" in str(r.message).lower()]
    assert not slow, f"vmap fell back to a per-sample loop: {slow[0]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ce", "nll", "prob"])
@pytest.mark.parametrize("per_sample", [(C,), (5, C), (2, C, 3, 2)], ids=["C", "NC", "NCHW"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_vmap_and_per_sample_gradients(target, dtype, kind, per_sample, reduction, weighted):
    x, t, w = _case(kind, per_sample, dtype, target, seed=len(per_sample))
    kw = _options(kind, weighted, 0.1, w)
    if kind == "prob" and kw["weight"] is not None:
        kw["weight"] = kw["weight"].to(dtype)  # (the loss's dtype promotes with it)
    fused, ref = _fused(kind, reduction=reduction, **kw), _torch64(kind, reduction=reduction, **kw)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = vmap(fused)(x, t)
        grads = vmap(grad(lambda x, t: fused(x, t).sum()))(x, t)
    _no_fallback(record)
    want = _per_sample(ref, x, t)
    assert loss.dtype == (torch.result_type(x, t) if kind == "prob" else dtype)
    ok, detail = close(loss, want, dtype)
    assert ok, f"loss: {detail}"
    want_grads = torch.stack([
        torch.func.grad(lambda xb, tb: ref(xb, tb).sum())(x[b].double(), t[b]) for b in range(B)])
    assert grads.dtype == dtype and grads.shape == x.shape
    ok, detail = close(grads, want_grads, dtype, scale_floor=0.1)
    assert ok, f"per-sample gradients: {detail}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_vjp_jacrev_jvp_jacfwd(target, dtype, reduction):
    x, t, w = _case("ce", (4, C), dtype, target, seed=7)
    x, t = x[0], t[0]
    kw = dict(weight=w, label_smoothing=0.05, reduction=reduction)
    fused, ref = _fused("ce", **kw), _torch64("ce", **kw)
    x64 = x.double()
    want_jac = jacrev(lambda x: ref(x, t))(x64)
    for name, jac in [("jacrev", jacrev(lambda x: fused(x, t))(x)),
                      ("jacfwd", jacfwd(lambda x: fused(x, t))(x))]:
        assert jac.dtype == dtype, name
        ok, detail = close(jac, want_jac, dtype, scale_floor=0.1)
        assert ok, f"{name}: {detail}"
    loss, vjp_fn = vjp(lambda x: fused(x, t), x)
    cot = torch.randn(loss.shape, dtype=torch.float64).to(dtype).to(target)
    (got,) = vjp_fn(cot)
    (want,) = vjp(lambda x: ref(x, t), x64)[1](cot.double())
    ok, detail = close(got, want, dtype, scale_floor=0.1)
    assert ok, f"vjp: {detail}"
    tangent = torch.randn(x.shape, dtype=torch.float64).to(dtype).to(target)
    _, got = jvp(lambda x: fused(x, t), (x,), (tangent,))
    _, want = jvp(lambda x: ref(x, t), (x64,), (tangent.double(),))
    assert got.dtype == dtype
    ok, detail = close(got, want, dtype, scale_floor=0.1)
    assert ok, f"jvp: {detail}"


def test_vmap_in_dims_and_unbatched_arguments(target):
    # the vmapped dimension anywhere (a copy where the rows cannot be merged as a
    # view), shared targets, shared logits with batched targets
    x, t, w = _case("ce", (5, C), torch.float64, target, seed=3)
    kw = dict(weight=w, reduction="mean", label_smoothing=0.1)
    fused, ref = _fused("ce", **kw), _torch64("ce", **kw)
    want = _per_sample(ref, x, t)
    for name, got in [
        ("dim 1", vmap(fused, in_dims=(1, 1))(x.movedim(0, 1), t.movedim(0, 1))),
        ("dim 2", vmap(fused, in_dims=(2, 1))(x.movedim(0, 2), t.movedim(0, 1))),
    ]:
        ok, detail = close(got, want, torch.float64)
        assert ok, f"{name}: {detail}"
    got = vmap(fused, in_dims=(0, None))(x, t[0])
    ok, detail = close(got, torch.stack([ref(x[b], t[0]) for b in range(B)]), torch.float64)
    assert ok, f"shared targets: {detail}"
    got = vmap(fused, in_dims=(None, 0))(x[0], t)
    ok, detail = close(got, torch.stack([ref(x[0], t[b]) for b in range(B)]), torch.float64)
    assert ok, f"shared logits: {detail}"
    got = vmap(grad(fused), in_dims=(None, 0))(x[0], t)
    want = torch.stack([grad(ref)(x[0], t[b]) for b in range(B)])
    ok, detail = close(got, want, torch.float64, scale_floor=0.1)
    assert ok, f"shared logits, per-sample gradients: {detail}"


@pytest.mark.parametrize("kind", ["ce", "prob"])
def test_vmap_over_the_weight(target, kind):
    # a per-sample class weight: one call per sample (no batching rule for it)
    x, t, _ = _case(kind, (5, C), torch.float64, target, seed=4)
    ws = torch.rand(B, C, dtype=torch.float64, device=target) + 0.1
    fn = lambda x, t, w: fused_nll.cross_entropy(x, t, weight=w)  # noqa: E731
    got = vmap(fn)(x, t, ws)
    want = torch.stack([_torch64(kind, weight=ws[b])(x[b], t[b]) for b in range(B)])
    ok, detail = close(got, want, torch.float64)
    assert ok, detail
    got = vmap(grad(fn))(x, t, ws)
    want = torch.stack([grad(_torch64(kind, weight=ws[b]))(x[b].double(), t[b])
                        for b in range(B)])
    ok, detail = close(got, want, torch.float64, scale_floor=0.1)
    assert ok, detail


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=REDUCTIONS)
def test_batching_rules_of_the_ops(target, prob, reduction):
    # the ops called directly under vmap, compute_grad included: equal to a loop
    triton = fused_nll._backend.select(torch.device(target)) == "triton"
    ops = fused_nll._ops.triton_family() if triton else fused_nll._ops.CPP
    x, t, w = _case("prob" if prob else "ce", (4, C, 2), torch.float64, target, seed=5)
    if prob:
        fwd = lambda x, t: ops.prob_fwd(x, t, w, 0.1, reduction, True)  # noqa: E731
        bwd = lambda g, x, t, lse: ops.prob_bwd(g, x, t, w, lse, 0.1, reduction)  # noqa: E731
    else:
        fwd = lambda x, t: ops.fwd(x, t, w, -100, 0.1, reduction, False, True)  # noqa: E731
        bwd = lambda g, x, t, lse: ops.bwd(g, x, t, w, lse, -100, 0.1, reduction,  # noqa: E731
                                           False)
    got = vmap(fwd)(x, t)
    want = [torch.stack(o) for o in zip(*(fwd(x[b], t[b]) for b in range(B)))]
    for name, a, b in zip(["loss", "lse", "grad"], got, want):
        ok, detail = close(a, b, torch.float64, scale_floor=0.1)
        assert ok, f"{name}: {detail}"
    g = torch.randn(got[0].shape, dtype=torch.float64, device=target)
    got = vmap(bwd)(g, x, t, got[1])
    want = torch.stack([bwd(g[b], x[b], t[b], want[1][b]) for b in range(B)])
    ok, detail = close(got, want, torch.float64, scale_floor=0.1)
    assert ok, f"backward: {detail}"


def test_vmapped_forward_then_plain_backward(target):
    # an ensemble: vmap over a stack of LM heads, then loss.backward() as usual
    h = torch.randn(6, 8, dtype=torch.float64, device=target)
    t = torch.randint(0, C, (6,), device=target)
    heads = torch.randn(B, 8, C, dtype=torch.float64, device=target, requires_grad=True)
    f = vmap(lambda w: fused_nll.cross_entropy(h @ w, t, label_smoothing=0.1))
    if OLD_TORCH_VMAP_BACKWARD:
        with pytest.raises(RuntimeError, match=REVERSE_THROUGH_VMAP):
            f(heads)
        return
    loss = f(heads)
    loss.sum().backward()
    ref = heads.detach().clone().requires_grad_(True)
    want = torch.stack([F.cross_entropy(h @ ref[b], t, label_smoothing=0.1) for b in range(B)])
    want.sum().backward()
    ok, detail = close(loss, want, torch.float64)
    assert ok, detail
    ok, detail = close(heads.grad, ref.grad, torch.float64)
    assert ok, detail


def _second_order(f, x, v):
    """Second-order derivatives of the scalar f at x (v: a direction), by name."""
    def hvp_by_linearize():
        return torch.func.linearize(grad(f), x)[1](v)

    return {
        "hessian": lambda: torch.func.hessian(f)(x),
        "grad(grad)": lambda: grad(lambda a: (grad(f)(a) * v).sum())(x),
        "jacfwd(jacfwd)": lambda: jacfwd(jacfwd(f))(x),
        "jacrev(jacrev)": lambda: jacrev(jacrev(f))(x),
        "jvp(grad)": lambda: jvp(grad(f), (x,), (v,))[1],
        "grad(jvp)": lambda: grad(lambda a: jvp(f, (a,), (v,))[1])(x),
        "vjp(grad)": lambda: vjp(grad(f), x)[1](v)[0],
        "linearize(grad)": hvp_by_linearize,
        "vmap(hessian)": None,  # (filled in by the caller: needs a batch)
        "forward AD over autograd.grad": lambda: _grad_of_dual(f, x, v),
    }


def _grad_of_dual(f, x, v):
    """Forward-over-reverse with plain forward AD: the gradient's tangent is a
    Hessian-vector product."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        xd = fwAD.make_dual(x.clone().requires_grad_(True), v)
        g, = torch.autograd.grad(f(xd), xd)
        tangent = fwAD.unpack_dual(g).tangent  # (None where the gradient is constant: nll_loss)
        return torch.zeros_like(x) if tangent is None else tangent


@pytest.mark.parametrize("kind", ["ce", "nll", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_order_derivatives_match_torch(target, kind, reduction):
    # second-order transforms are seen at the forward (_func.second_order_ahead) and
    # computed with torch's own ops: the results are torch's, in fp64 and in fp32
    for dtype, per_sample in ((torch.float64, (5, C)), (torch.float32, (2, C, 3))):
        x, t, w = _case(kind, per_sample, dtype, target, seed=31)
        kw = _options(kind, True, 0.1, w)
        fused, ref = _fused(kind, reduction=reduction, **kw), _torch64(kind, reduction=reduction, **kw)
        v = torch.randn_like(x[0])
        got = _second_order(lambda a: fused(a, t[0]).sum(), x[0], v)
        want = _second_order(lambda a: ref(a, t[0]).sum().to(dtype), x[0].double(), v.double())
        got["vmap(hessian)"] = lambda: vmap(torch.func.hessian(lambda a, b: fused(a, b).sum()))(x, t)
        want["vmap(hessian)"] = lambda: torch.stack(
            [torch.func.hessian(lambda a: ref(a, t[b]).sum())(x[b].double()) for b in range(B)])
        # (the terms that cancel in a Hessian-vector product are O(|v|): the atol's scale;
        # in fp32 torch's own rounding there reached 1.04x a floor of 0.1, seed 886416659)
        floor = max(0.1, v.abs().max().item())
        for name, call in got.items():
            ok, detail = close(call(), want[name](), dtype, scale_floor=floor)
            assert ok, f"{dtype}, {name}: {detail}"


def test_second_order_derivatives_wrt_probability_targets_and_weight(target):
    # the Hessian of the loss in (logits, targets, weight) together, and jvp(grad) mixed
    x, y, w = _case("prob", (4, C), torch.float64, target, seed=32)
    x, y = x[0], y[0]
    kw = dict(reduction="mean", label_smoothing=0.2)
    for fn, ref in ((fused_nll.cross_entropy, F.cross_entropy),):
        got = torch.func.hessian(lambda a, b, c: fn(a, b, weight=c, **kw), argnums=(0, 1, 2))(x, y, w)
        want = torch.func.hessian(lambda a, b, c: ref(a, b, weight=c, **kw), argnums=(0, 1, 2))(x, y, w)
        for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(got),
                                       torch.utils._pytree.tree_leaves(want))):
            ok, detail = close(a, b, torch.float64, scale_floor=0.1)
            assert ok, f"hessian[{i}]: {detail}"
        vy = torch.randn_like(y)
        got = jvp(lambda b: grad(lambda a: fn(a, b, **kw))(x), (y,), (vy,))[1]
        want = jvp(lambda b: grad(lambda a: ref(a, b, **kw))(x), (y,), (vy,))[1]
        ok, detail = close(got, want, torch.float64, scale_floor=0.1)
        assert ok, f"jvp over the targets of grad over the logits: {detail}"


def test_second_order_with_a_bf16_loss_under_autocast(target):
    # the loss dtype and values of the fused path (float32 under autocast), and torch's
    # Hessian for bf16 logits
    x, t, _ = _case("ce", (4, C), torch.bfloat16, target, seed=33)
    x, t = x[0], t[0]
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        h = torch.func.hessian(lambda a: fused_nll.cross_entropy(a, t))(x)
        loss = torch.func.grad_and_value(lambda a: fused_nll.cross_entropy(a, t))(x)[1]
    assert h.dtype == torch.bfloat16 and loss.dtype == torch.float32, (h.dtype, loss.dtype)
    want = torch.func.hessian(lambda a: F.cross_entropy(a.double(), t))(x.double())
    ok, detail = close(h.double(), want, torch.bfloat16, scale_floor=0.1)
    assert ok, detail


def test_second_order_out_of_range_target(target):
    # never a device-side assert: on the backends whose kernels give a nan row (Triton,
    # CUDA C++) the second-order path gives a nan row too (loss and derivatives), the
    # other rows torch's with that row ignored; the C++ CPU kernels raise torch's
    # IndexError, and so does this path there
    x = torch.randn(4, C, dtype=torch.float64, device=target)
    t = torch.tensor([1, C, -100, 2], device=target)
    v, ok_rows = torch.randn_like(x), torch.tensor([0, 2, 3])
    cpp = fused_nll._backend.select(x.device) == "cpp"
    for reduction in REDUCTIONS:
        def hvp(fn, t):  # (gradient, loss as returned, Hessian-vector product)
            def f(a):
                loss = fn(a, t, reduction=reduction)
                return loss.sum(), loss
            (g, loss), (hv, _) = jvp(grad(f, has_aux=True), (x,), (v,))
            return g, loss, hv

        if cpp:
            with pytest.raises(IndexError, match="out of bounds"):
                hvp(fused_nll.cross_entropy, t)
            continue
        g, loss, hv = hvp(fused_nll.cross_entropy, t)
        assert g[1].isnan().all() and hv[1].isnan().all(), reduction
        assert loss.isnan().any() and (loss.isnan().all() or reduction == "none"), loss
        # the other rows as if that one were ignored (a mean's divisor too), as the kernels
        want_g, want_loss, want_hv = hvp(F.cross_entropy, t.where(t < C, -100))
        for name, a, b in (("grad", g[ok_rows], want_g[ok_rows]),
                           ("hvp", hv[ok_rows], want_hv[ok_rows])) + (
                (("loss", loss[ok_rows], want_loss[ok_rows]),) if reduction == "none" else ()):
            ok, detail = close(a, b, torch.float64)
            assert ok, f"{reduction}, {name}: {detail}"


def test_second_order_wrt_the_weight_with_class_indices_is_refused(target):
    # as on the fused path (torch's nll_loss has no reverse-mode derivative for the
    # weight, and a forward-mode one of 0): raised, never a silent 0
    x, t, w = _case("ce", (4, C), torch.float64, target, seed=34)
    x, t = x[0], t[0]
    for fn in (fused_nll.cross_entropy, fused_nll.nll_loss):
        for name, call in [
            ("grad of a jvp over the weight",
             lambda: grad(lambda a: jvp(lambda c: fn(a, t, weight=c), (w,), (w,))[1])(x)),
            ("jacfwd(jacfwd)", lambda: jacfwd(lambda a: jacfwd(lambda c: fn(a, t, weight=c))(w))(x)),
            ("hessian over both", lambda: torch.func.hessian(
                lambda a, c: fn(a, t, weight=c), argnums=(0, 1))(x, w)),
        ]:
            with pytest.raises(RuntimeError, match="class weight|with respect to argument 'weight'"):
                call()
            assert name
        # the weight as a constant, next to a second order in the logits: torch's
        got = torch.func.hessian(lambda a: fn(a, t, weight=w))(x)
        want = torch.func.hessian(lambda a: getattr(F, fn.__name__)(a, t, weight=w))(x)
        ok, detail = close(got, want, torch.float64)
        assert ok, detail


DIFFERENTIATED_GRADIENT = "a gradient of the fused loss is being differentiated"


def test_second_order_refused_where_it_cannot_be_seen_at_the_forward(target):
    # create_graph=True is decided after the forward: still a clear error, never 0
    xs = torch.randn(2, 4, C, dtype=torch.float64, device=target, requires_grad=True)
    t = torch.randint(0, C, (4,), device=target)
    f = lambda x: fused_nll.cross_entropy(x, t)  # noqa: E731
    refused = REVERSE_THROUGH_VMAP if OLD_TORCH_VMAP_BACKWARD else (
        "second-order derivative|double backward .* not supported")
    with pytest.raises(RuntimeError, match=refused):
        torch.autograd.grad(vmap(f)(xs).sum(), xs, create_graph=True)
    # inside one torch.func.grad, a create_graph=True gradient differentiated by that
    # same transform (it gave zeros: indistinguishable from torch.func's own backward)
    x, y = xs[0].detach(), torch.softmax(xs[1].detach(), 1)
    for target_ in (t, y):
        g = lambda a: torch.autograd.grad(  # noqa: E731
            fused_nll.cross_entropy(a, target_), a, create_graph=True)[0]
        for name, call in [("grad", lambda: grad(lambda a: g(a).pow(2).sum())(x)),
                           ("jacrev", lambda: jacrev(g)(x))]:
            with pytest.raises(RuntimeError, match=DIFFERENTIATED_GRADIENT):
                call()
            assert name
    # ... and the same thing through two transforms works (seen at the forward)
    got = grad(lambda a: grad(lambda b: fused_nll.cross_entropy(b, t))(a).pow(2).sum())(x)
    want = grad(lambda a: grad(lambda b: F.cross_entropy(b, t))(a).pow(2).sum())(x)
    ok, detail = close(got, want, torch.float64)
    assert ok, detail


def test_inplace_backward_is_refused_inside_torch_func(target):
    x = torch.randn(4, C, device=target)
    t = torch.randint(0, C, (4,), device=target)
    with pytest.raises(RuntimeError, match="inplace_backward=True is not supported inside "
                                           "torch.func"):
        grad(lambda x: fused_nll.cross_entropy(x * 2, t, inplace_backward=True))(x)


@cpu_kernel_only
def test_out_of_range_target_under_vmap():
    # batched targets cannot be read in Python there: the C++ kernel's own check
    x = torch.randn(B, 4, C)
    t = torch.randint(0, C, (B, 4))
    t[2, 1] = C
    with fused_nll.use_backend("cpp"), pytest.raises(IndexError, match=f"Target {C} is out"):
        vmap(lambda x, t: fused_nll.cross_entropy(x, t))(x, t)


def _transforms(f, x, t, v):
    """torch.func transforms of the loss f(x, t): batched over dim 0 (vmap), or on
    sample 0."""
    def total(a, b):
        return f(a, b).sum()

    x0, t0, v0 = x[0], t[0], v[0]
    return {
        "vmap": lambda: vmap(f)(x, t),
        "vmap(grad)": lambda: vmap(grad(total))(x, t),
        "grad(vmap)": lambda: grad(lambda a: vmap(f)(a, t).sum())(x),
        "grad": lambda: grad(total)(x0, t0),
        "vjp": lambda: vjp(lambda a: f(a, t0), x0)[1](torch.ones_like(f(x0, t0)) * 1.5)[0],
        "jacrev": lambda: jacrev(f)(x0, t0),
        "jvp": lambda: jvp(lambda a: f(a, t0), (x0,), (v0,))[1],
        "jacfwd": lambda: jacfwd(f)(x0, t0),
    }


@cpu_kernel_only
@pytest.mark.parametrize("kind,reduction", [("ce", "mean"), ("nll", "none"), ("prob", "sum")])
def test_transforms_compiled_fullgraph(kind, reduction):
    # torch.compile(fullgraph=True) of every torch.func transform: the op's own autograd
    # (a single-level autograd.Function) and its batching rules, traced by Dynamo
    x, t, w = _case(kind, (5, C), torch.float64, "cpu", seed=11)
    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    kw = _options(kind, True, 0.1, w)
    fused = _transforms(_fused(kind, reduction=reduction, **kw), x, t, v)
    ref = _torch64(kind, reduction=reduction, **kw)
    sample_grads = torch.stack([grad(lambda a: ref(a, t[b]).sum())(x[b]) for b in range(B)])
    wants = {"vmap": _per_sample(ref, x, t), "vmap(grad)": sample_grads,
             "grad(vmap)": sample_grads}
    wants.update({name: call() for name, call in _transforms(ref, x, t, v).items()
                  if "vmap" not in name})
    for name, call in fused.items():
        torch._dynamo.reset()
        got = torch.compile(call, fullgraph=True)()
        ok, detail = close(got, wants[name], torch.float64, scale_floor=0.1)
        assert ok, f"{name}: {detail}"


@cpu_kernel_only
def test_refusals_compiled_fullgraph():
    # second order, and derivatives with respect to the weight with class indices:
    # raised while torch.compile traces (never a silent 0)
    x = torch.randn(4, C, dtype=torch.float64)
    y = torch.softmax(torch.randn(4, C, dtype=torch.float64), 1)
    t = torch.randint(0, C, (4,))
    w = torch.rand(C, dtype=torch.float64)
    f = lambda x: fused_nll.cross_entropy(x, t)  # noqa: E731
    for name, call, message in [
        ("hessian", lambda: torch.func.hessian(f)(x), "second-order derivatives"),
        ("grad(grad)", lambda: grad(lambda x: grad(f)(x).sum())(x), "second-order derivatives"),
        ("hessian wrt targets", lambda: torch.func.hessian(
            lambda y: fused_nll.cross_entropy(x, y))(y), "second-order derivatives"),
        ("grad wrt weight, class indices",
         lambda: grad(lambda w: fused_nll.cross_entropy(x, t, weight=w))(w), "weight"),
    ]:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            torch.compile(call, fullgraph=True)()
        assert name


def test_transforms_of_the_ops_called_directly(target):
    # direct op users (and opcheck): the ops' autograd gives the same derivatives,
    # also when the forward op computed the gradient itself (compute_grad=True)
    x, t, w = _case("ce", (5, C), torch.float64, target, seed=13)
    v = torch.randn_like(x)
    ops = fused_nll._ops.triton_family() if fused_nll._backend.select(
        torch.device(target)) == "triton" else fused_nll._ops.CPP
    ref = _torch64("ce", weight=w, label_smoothing=0.1)
    for compute_grad in (False, True):
        fused = _transforms(lambda a, b: ops.fwd(a, b, w, -100, 0.1, 1, False, compute_grad)[0],
                            x, t, v)
        for name in ("vmap(grad)", "grad", "jacrev", "jvp", "jacfwd"):
            want = _transforms(ref, x, t, v)[name] if "vmap" not in name else (
                lambda: torch.stack([grad(ref)(x[b], t[b]) for b in range(B)]))
            ok, detail = close(fused[name](), want(), torch.float64, scale_floor=0.1)
            assert ok, f"{name}, compute_grad={compute_grad}: {detail}"


@cpu_kernel_only
def test_compiled_transforms_that_need_more_than_one_level_raise():
    # under torch.compile the op's autograd records at the innermost differentiating
    # level only: a transform over tensors plain autograd records too, or a derivative
    # of a transform's primal output, raises instead of silently losing that level
    x = torch.randn(4, C, dtype=torch.float64)
    t = torch.randint(0, C, (4,))
    f = lambda x: fused_nll.cross_entropy(x, t)  # noqa: E731
    for name, call, message in [
        ("jvp primal, x requires grad",
         lambda: jvp(f, (x.clone().requires_grad_(),), (x,))[0], "plain autograd would not"),
        ("vjp primal, x requires grad",
         lambda: vjp(f, x.clone().requires_grad_())[0], "plain autograd would not"),
        ("grad of a vjp primal", lambda: grad(lambda x: vjp(f, x)[0])(x),
         # (no apostrophe: torch 2.14's Dynamo escapes it, quoting our error in a repr)
         "a derivative of an inner transform"),
    ]:
        torch._dynamo.reset()
        with pytest.raises(Exception, match=message):
            torch.compile(call, fullgraph=True)()
        assert name
    # eager, the public functions record every level (FuncLoss): torch's results
    xp = x.clone().requires_grad_()
    loss = jvp(f, (xp,), (x,))[0]
    loss.backward()
    want = x.clone().requires_grad_()
    F.cross_entropy(want, t).backward()
    ok, detail = close(xp.grad, want.grad, torch.float64)
    assert ok, detail
    ok, detail = close(grad(lambda x: vjp(f, x)[0])(x), want.grad, torch.float64)
    assert ok, detail


def test_samples_with_zero_total_weight(target):
    # mean over a sample whose counted rows all have class weight 0: torch's loss is
    # nan, its gradient nan on those rows and 0 on ignored ones (not inf, not finite)
    x = torch.randn(2, 3, 4, dtype=torch.float64, device=target)
    t = torch.tensor([[0, -100, 0], [2, 3, 2]], device=target)
    w = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=target)
    for ls in (0.0, 0.2):
        kw = dict(weight=w, label_smoothing=ls)
        f, ref = _fused("ce", **kw), _torch64("ce", **kw)
        for name, got, want in [
            ("loss", vmap(f)(x, t), torch.stack([ref(x[b], t[b]) for b in range(2)])),
            ("grad", vmap(grad(f))(x, t), torch.stack([grad(ref)(x[b], t[b]) for b in range(2)])),
        ]:
            ok, detail = close(got, want, torch.float64, scale_floor=0.1)
            assert ok, f"{name}, label_smoothing={ls}: {detail}"
        ops = fused_nll._ops.triton_family() if fused_nll._backend.select(
            torch.device(target)) == "triton" else fused_nll._ops.CPP
        op = lambda x, t: ops.fwd(x, t, w, -100, ls, 1, False, True)  # noqa: E731
        got = vmap(op)(x, t)
        want = [torch.stack(o) for o in zip(*(op(x[b], t[b]) for b in range(2)))]
        for name, a, b in zip(["op loss", "op lse", "op grad"], got, want):
            ok, detail = close(a, b, torch.float64, scale_floor=0.1)
            assert ok, f"{name}, label_smoothing={ls}: {detail}"


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_vmap_small_integer_targets_with_weight(target, dtype):
    # the per-sample mean's weight sum indexes the weight with the targets
    x, t, w = _case("ce", (6, C), torch.float64, target, seed=8)
    t = t.clamp_min(0).to(dtype)
    f, ref = _fused("ce", weight=w), _torch64("ce", weight=w)
    ok, detail = close(vmap(f)(x, t), _per_sample(ref, x, t.long()), torch.float64)
    assert ok, detail


def test_forward_ad_and_linearize(target):
    # plain forward AD (dual tensors) and torch.func.linearize must carry the tangent
    import torch.autograd.forward_ad as fwAD

    x, t, w = _case("ce", (5, C), torch.float64, target, seed=9)
    x, t = x[0], t[0]
    tangent = torch.randn_like(x)
    for reduction in REDUCTIONS:
        f = _fused("ce", weight=w, reduction=reduction, label_smoothing=0.1)
        ref = _torch64("ce", weight=w, reduction=reduction, label_smoothing=0.1)
        want = jvp(lambda x: ref(x, t), (x,), (tangent,))[1]
        with fwAD.dual_level():
            got = fwAD.unpack_dual(f(fwAD.make_dual(x, tangent), t)).tangent
        assert got is not None, reduction
        ok, detail = close(got, want, torch.float64, scale_floor=0.1)
        assert ok, f"forward AD, {reduction}: {detail}"
        _, linear = torch.func.linearize(lambda x: f(x, t), x)
        ok, detail = close(linear(tangent), want, torch.float64, scale_floor=0.1)
        assert ok, f"linearize, {reduction}: {detail}"


def test_autograd_functional_jvp_points_at_torch_func_jvp(target):
    # torch.autograd.functional.jvp computes a first-order jvp by a double backward
    # (create_graph=True), which fused_nll refuses; the message names the way that works
    x, t, _ = _case("ce", (4, C), torch.float64, target, seed=14)
    x, t, v = x[0], t[0].clamp_min(0), torch.randn_like(x[0])
    f = lambda a: fused_nll.cross_entropy(a, t)  # noqa: E731
    with pytest.raises(RuntimeError, match="use torch.func.jvp"):
        torch.autograd.functional.jvp(f, x, v)
    want = torch.autograd.functional.jvp(lambda a: F.cross_entropy(a, t), x, v)[1]
    ok, detail = close(jvp(f, (x,), (v,))[1], want, torch.float64)
    assert ok, detail


def test_torch_func_derivative_inside_a_forward_ad_level(target):
    # torch.func.linearize(grad(f)) traces grad(f) on dual logits with make_fx, where the
    # tangent is invisible to fused_nll (it silently gave zeros from session 7 to 16,
    # then was refused): any torch.func derivative inside a plain forward-AD level now
    # takes torch's ops, so linearize(grad(f)) (test above) and a first-order grad
    # inside the user's own dual_level() both give torch's results
    import torch.autograd.forward_ad as fwAD

    x, t, _ = _case("ce", (4, C), torch.float64, target, seed=12)
    x, t = x[0], t[0].clamp_min(0)
    with fwAD.dual_level():
        got = grad(lambda a: fused_nll.cross_entropy(a, t))(x)
    want = grad(lambda a: F.cross_entropy(a, t))(x)
    ok, detail = close(got, want, torch.float64)
    assert ok, detail
    # first order inside a forward-AD level: linearize of the loss itself (fused path)
    _, linear = torch.func.linearize(lambda a: fused_nll.cross_entropy(a, t), x)
    want = jvp(lambda a: F.cross_entropy(a, t), (x,), (x.cos(),))[1]
    ok, detail = close(linear(x.cos()), want, torch.float64)
    assert ok, detail


def test_vmap_inside_grad_and_jacfwd(target):
    x, t, _ = _case("ce", (4, C), torch.float64, target, seed=10)
    t = t[0].clamp_min(0)
    f = vmap(lambda xb: fused_nll.cross_entropy(xb, t, reduction="none"))
    ref = vmap(lambda xb: F.cross_entropy(xb, t, reduction="none"))
    reverse = [("grad(vmap)", lambda: grad(lambda x: f(x).sum())(x), grad(lambda x: ref(x).sum())(x)),
               ("jacrev(vmap)", lambda: jacrev(f)(x), jacrev(ref)(x))]
    if OLD_TORCH_VMAP_BACKWARD:
        for _, call, _ in reverse:
            with pytest.raises(RuntimeError, match=REVERSE_THROUGH_VMAP):
                call()
        reverse = []
    for name, got, want in [(name, call(), want) for name, call, want in reverse] + [
        ("jacfwd(vmap)", jacfwd(f)(x), jacfwd(ref)(x)),
        ("jvp(vmap)", jvp(f, (x,), (x.cos(),))[1], jvp(ref, (x,), (x.cos(),))[1]),
        ("linearize(vmap)", torch.func.linearize(f, x)[1](x.cos()), jvp(ref, (x,), (x.cos(),))[1]),
    ]:
        ok, detail = close(got, want, torch.float64, scale_floor=0.1)
        assert ok, f"{name}: {detail}"


def test_jvp_of_a_nan_mean_is_nan(target):
    # every row ignored: the mean is 0/0 = nan, and so is its derivative (torch's too)
    x = torch.randn(3, C, dtype=torch.float64, device=target)
    t = torch.full((3,), -100, device=target)
    got = jvp(lambda x: fused_nll.cross_entropy(x, t), (x,), (torch.randn_like(x),))[1]
    assert got.isnan()


def test_torch_func_derivative_of_recorded_parameters_warns(target):
    # parameters that plain autograd records too (not detached): the derivative that
    # torch.func returns has no history through the loss; say so
    lin = torch.nn.Linear(4, C).double().to(target)
    h = torch.randn(3, 4, dtype=torch.float64, device=target)
    t = torch.randint(0, C, (3,), device=target)

    def loss(p):
        return fused_nll.cross_entropy(torch.func.functional_call(lin, p, (h,)), t)

    params = dict(lin.named_parameters())
    for name, derivative in [("grad", lambda: grad(loss)(params)),
                             ("jacrev", lambda: jacrev(loss)(params)),
                             ("vjp", lambda: vjp(loss, params)[1](torch.ones((), dtype=torch.float64))),
                             ("jvp", lambda: jvp(loss, (params,), (params,)))]:
        with pytest.warns(UserWarning, match="gradient penalty"):
            derivative()
        assert name
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*gradient penalty")
        got = grad(loss)({k: v.detach() for k, v in params.items()})
    want = grad(lambda p: F.cross_entropy(torch.func.functional_call(lin, p, (h,)), t))(
        {k: v.detach() for k, v in params.items()})
    for k in want:
        ok, detail = close(got[k], want[k], torch.float64)
        assert ok, f"{k}: {detail}"


def _target_weight_transforms(f, x, y, w, vx, vy, vw):
    """torch.func derivatives of the loss f(x, y, w) with respect to all three
    (probability targets y, class weight w): vmap(grad) over dim 0, the rest on sample 0."""
    def total(a, b, c):
        return f(a, b, c).sum()

    x0, y0 = x[0], y[0]
    return {
        "grad": lambda: grad(total, argnums=(0, 1, 2))(x0, y0, w),
        "vmap(grad)": lambda: vmap(grad(total, argnums=(1, 2)), in_dims=(0, 0, None))(x, y, w),
        "vjp": lambda: vjp(f, x0, y0, w)[1](torch.ones_like(f(x0, y0, w)) * 1.5),
        "jacrev": lambda: jacrev(f, argnums=(0, 1, 2))(x0, y0, w),
        "jvp": lambda: jvp(f, (x0, y0, w), (vx[0], vy[0], vw))[1],
        "jvp targets only": lambda: jvp(lambda b: f(x0, b, w), (y0,), (vy[0],))[1],
        "jacfwd": lambda: jacfwd(f, argnums=(1, 2))(x0, y0, w),
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("per_sample", [(C,), (5, C), (2, C, 3, 2)], ids=["C", "NC", "NCHW"])
def test_derivatives_wrt_probability_targets_and_weight(target, reduction, per_sample):
    # torch differentiates its probability-target loss with respect to the targets and
    # the class weight; so does fused_nll, in every transform (fp64, against torch's)
    x, y, w = _case("prob", per_sample, torch.float64, target, seed=21)
    g = torch.Generator().manual_seed(22)
    vx, vy = (torch.randn(x.shape, dtype=torch.float64, generator=g).to(target) for _ in "xy")
    vw = torch.randn(C, dtype=torch.float64, generator=g).to(target)
    kw = dict(reduction=reduction, label_smoothing=0.1)
    fused = _target_weight_transforms(
        lambda a, b, c: fused_nll.cross_entropy(a, b, weight=c, **kw), x, y, w, vx, vy, vw)
    ref = _target_weight_transforms(
        lambda a, b, c: F.cross_entropy(a, b, weight=c, **kw), x, y, w, vx, vy, vw)
    for name, call in fused.items():
        got, want = call(), ref[name]()
        for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(got),
                                       torch.utils._pytree.tree_leaves(want))):
            ok, detail = close(a, b, torch.float64, scale_floor=0.1)
            assert ok, f"{name}[{i}]: {detail}"


@cpu_kernel_only
def test_derivatives_wrt_probability_targets_and_weight_compiled_fullgraph():
    # under torch.compile the same derivatives come from the op's own autograd
    x, y, w = _case("prob", (5, C), torch.float64, "cpu", seed=23)
    g = torch.Generator().manual_seed(24)
    vx, vy = (torch.randn(x.shape, dtype=torch.float64, generator=g) for _ in "xy")
    vw = torch.randn(C, dtype=torch.float64, generator=g)
    kw = dict(reduction="mean", label_smoothing=0.2)
    fused = _target_weight_transforms(
        lambda a, b, c: fused_nll.cross_entropy(a, b, weight=c, **kw), x, y, w, vx, vy, vw)
    ref = _target_weight_transforms(
        lambda a, b, c: F.cross_entropy(a, b, weight=c, **kw), x, y, w, vx, vy, vw)
    for name in ("grad", "vmap(grad)", "jvp"):
        torch._dynamo.reset()
        got = torch.compile(fused[name], fullgraph=True)()
        for i, (a, b) in enumerate(zip(torch.utils._pytree.tree_leaves(got),
                                       torch.utils._pytree.tree_leaves(ref[name]()))):
            ok, detail = close(a, b, torch.float64, scale_floor=0.1)
            assert ok, f"{name}[{i}]: {detail}"
    # plain autograd of a compiled loss: the targets' and the weight's .grad
    leaves = [t.clone().requires_grad_() for t in (x[0], y[0], w)]
    refs = [t.clone().requires_grad_() for t in (x[0], y[0], w)]
    torch._dynamo.reset()
    torch.compile(lambda a, b, c: fused_nll.cross_entropy(a, b, weight=c, **kw),
                  fullgraph=True)(*leaves).backward()
    F.cross_entropy(refs[0], refs[1], weight=refs[2], **kw).backward()
    for name, a, b in zip(("input", "target", "weight"), leaves, refs):
        ok, detail = close(a.grad, b.grad, torch.float64, scale_floor=0.1)
        assert ok, f"{name}: {detail}"


def test_targets_and_weight_recorded_outside_torch_func(target):
    # probability targets or a weight that require grad outside a torch.func derivative
    # of the logits: eager, fused_nll warns (the derivative has no history through them,
    # as for recorded parameters above); forward-over-reverse through their plain
    # forward-mode tangents is second order: seen at the forward, torch's ops
    import torch.autograd.forward_ad as fwAD

    x, y, w = _case("prob", (4, C), torch.float64, target, seed=25)
    x, y = x[0], y[0]
    for kw in ({"target": y.clone().requires_grad_()},
               {"target": y, "weight": w.clone().requires_grad_()}):
        with pytest.warns(UserWarning, match="gradient penalty"):
            grad(lambda a: fused_nll.cross_entropy(a, kw["target"], kw.get("weight")))(x)
    for dual in ("target", "weight"):
        with fwAD.dual_level():
            yy = fwAD.make_dual(y, torch.randn_like(y)) if dual == "target" else y
            ww = fwAD.make_dual(w, torch.randn_like(w)) if dual == "weight" else w
            for reduction in REDUCTIONS:
                got, want = (fwAD.unpack_dual(torch.autograd.grad(
                    fn(xx, yy, ww, reduction=reduction).sum(), xx)[0]).tangent
                    for fn, xx in ((fused_nll.cross_entropy, x.clone().requires_grad_()),
                                   (F.cross_entropy, x.clone().requires_grad_())))
                ok, detail = close(got, want, torch.float64, scale_floor=0.1)
                assert ok, f"{dual}, {reduction}: {detail}"


@cpu_kernel_only
def test_targets_and_weight_recorded_outside_torch_func_compiled():
    # compiled, the op is recorded at the innermost transform only, so plain autograd
    # cannot see a target or weight that requires grad outside it: refused, not dropped
    x, y, w = _case("prob", (4, C), torch.float64, "cpu", seed=26)
    x, y = x[0], y[0]
    for yy, ww in ((y.clone().requires_grad_(), w), (y, w.clone().requires_grad_())):
        for name, call in (("vjp", lambda: vjp(lambda a: fused_nll.cross_entropy(a, yy, ww), x)[0]),
                           ("grad", lambda: grad(lambda a: fused_nll.cross_entropy(a, yy, ww))(x))):
            torch._dynamo.reset()
            with pytest.raises(Exception, match="plain autograd would not"):
                torch.compile(call, fullgraph=True)()
            assert name


def test_backward_through_vmap_to_probability_targets(target):
    # plain autograd after a vmap of the loss, with only the targets requiring grad
    x, y, w = _case("prob", (4, C), torch.float64, target, seed=27)
    yy, yr = y.clone().requires_grad_(), y.clone().requires_grad_()
    call = lambda: vmap(lambda a, b: fused_nll.cross_entropy(a, b, w))(x, yy).sum().backward()  # noqa: E731
    if OLD_TORCH_VMAP_BACKWARD:
        with pytest.raises(RuntimeError, match=REVERSE_THROUGH_VMAP):
            call()
        return
    call()
    torch.stack([F.cross_entropy(x[b], yr[b], w) for b in range(B)]).sum().backward()
    ok, detail = close(yy.grad, yr.grad, torch.float64)
    assert ok, detail


def test_derivatives_wrt_the_weight_with_class_indices_are_refused(target):
    # (torch has none either: "the derivative for 'weight' is not implemented")
    x = torch.randn(3, C, dtype=torch.float64, device=target)
    t = torch.randint(0, C, (3,), device=target)
    w = torch.rand(C, dtype=torch.float64, device=target)
    with pytest.raises(RuntimeError, match="weight.*class-index targets"):
        grad(lambda w: fused_nll.cross_entropy(x, t, weight=w))(w)
    with pytest.raises(RuntimeError, match="weight.*class-index targets"):
        jvp(lambda w: fused_nll.cross_entropy(x, t, weight=w), (w,), (w,))
    with pytest.raises(RuntimeError, match="weight.*class-index targets"):
        fused_nll.cross_entropy(x, t, weight=w.clone().requires_grad_(True))


def test_jvp_of_an_empty_mean_with_probability_targets(target):
    # torch's mean over no row is a constant nan for probability targets (tangent 0),
    # 0/0 for class indices (tangent nan, test above)
    x = torch.randn(0, C, dtype=torch.float64, device=target)
    y = torch.softmax(torch.randn(0, C, dtype=torch.float64, device=target), 1)
    v = torch.randn_like(x)
    loss, got = jvp(lambda x: fused_nll.cross_entropy(x, y), (x,), (v,))
    _, want = jvp(lambda x: F.cross_entropy(x, y), (x,), (v,))
    assert loss.isnan() and got == want == 0

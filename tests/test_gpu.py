"""Public-API checks that need a CUDA GPU (skipped elsewhere): every CUDA
backend under torch.compile, opcheck on the Triton ops, CUDA-graph capture of
forward + backward, no host sync (also for per-sample gradients through torch.func),
no device-side assert for bad targets.
(The parity suite runs on the CUDA backends too, through conftest.TARGETS.)"""
import pytest
import torch

import fused_nll
from conftest import TARGETS
from fused_nll._reference import close, reference

CUDA_BACKENDS = [b for d, b in TARGETS if d == "cuda"]
pytestmark = pytest.mark.skipif(not CUDA_BACKENDS, reason="needs a CUDA GPU")


@pytest.fixture(params=CUDA_BACKENDS or ["none"])
def backend(request):
    with fused_nll.use_backend(request.param):
        yield request.param


def _data(n=64, v=1000, dtype=torch.bfloat16):
    x = torch.randn(n, v, device="cuda", dtype=dtype)
    t = torch.randint(0, v, (n,), device="cuda")
    t[::7] = -100
    return x, t


@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace_backward"])
def test_compile_fullgraph_no_graph_breaks(backend, inplace):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    head = torch.nn.Linear(32, 1000, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    _, t = _data()

    def step(h, t):
        return fused_nll.cross_entropy(head(h), t, label_smoothing=0.1, inplace_backward=inplace)

    eager = step(h, t)
    eager.backward()
    g_eager = head.weight.grad.clone()
    head.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)(h, t)
    compiled.backward()
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(head.weight.grad, g_eager, rtol=2e-2, atol=1e-2)


def test_compile_reduce_overhead_cuda_graphs(backend):
    # torch.compile(mode="reduce-overhead"): Inductor replays the training step as CUDA
    # graphs; replays with new inputs copied into the static ones give torch's values.
    torch._dynamo.reset()
    head = torch.nn.Linear(32, 1000, device="cuda")

    def loss_of(h, t):
        return fused_nll.cross_entropy(head(h), t, label_smoothing=0.1)

    compiled = torch.compile(loss_of, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # (warm-up runs, recording, replays; forward and backward graphs)
        h = torch.randn(64, 32, device="cuda")
        _, t = _data()
        head.zero_grad()
        loss = compiled(h, t)
        loss.backward()
        got, g = loss.detach().clone(), head.weight.grad.clone()
        head.zero_grad()
        want = torch.nn.functional.cross_entropy(head(h), t, label_smoothing=0.1)
        want.backward()
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g, head.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("triton" not in CUDA_BACKENDS, reason="triton backend not usable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_triton_ops(dtype):
    import fused_nll._triton_ops  # noqa: F401

    ops = torch.ops.fused_nll
    for requires_grad in (False, True):
        x = torch.randn(6, 11, device="cuda", dtype=dtype, requires_grad=requires_grad)
        t = torch.tensor([0, 3, -100, 10, 2, 5], device="cuda")
        w = torch.rand(11, device="cuda")
        for reduction in (0, 1, 2):
            torch.library.opcheck(ops.triton_cross_entropy_fwd.default, (x, t, w, -100, 0.1, reduction, False, False))
            torch.library.opcheck(ops.triton_cross_entropy_fwd.default, (x, t, None, -100, 0.0, reduction, False, True))
            y = torch.softmax(torch.randn(6, 11, device="cuda"), 1).to(dtype)
            torch.library.opcheck(ops.triton_cross_entropy_prob_fwd.default, (x, y, w, 0.1, reduction, False))
            if requires_grad:  # the targets' and the weight's gradients too
                torch.library.opcheck(ops.triton_cross_entropy_prob_fwd.default,
                                      (x, y.clone().requires_grad_(True),
                                       w.clone().requires_grad_(True), 0.1, reduction, False))
    torch.library.opcheck(ops.triton_scale_grad_.default, (torch.randn(6, 11, device="cuda", dtype=dtype),
                                                            torch.tensor(0.5, device="cuda", dtype=dtype)))
    x = torch.randn(6, 11, device="cuda", dtype=dtype)
    torch.library.opcheck(ops.triton_cross_entropy_fwd_inplace.default, (x.clone(), t, w, -100, 0.1, 1, False))
    torch.library.opcheck(ops.triton_cross_entropy_prob_fwd_inplace.default, (x.clone(), y, w, 0.1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_cuda_cpp_ops(dtype):
    if not fused_nll._backend.cuda_cpp_built():
        pytest.skip("CUDA C++ kernels not built")
    ops = torch.ops.fused_nll
    for requires_grad in (False, True):
        x = torch.randn(6, 11, device="cuda", dtype=dtype, requires_grad=requires_grad)
        t = torch.tensor([0, 3, -100, 10, 2, 5], device="cuda")
        for reduction in (0, 1, 2):
            for compute_grad in (False, True):
                torch.library.opcheck(ops.cross_entropy_fwd.default, (x, t, None, -100, 0.1, reduction, False, compute_grad))
    x = torch.randn(6, 11, device="cuda", dtype=dtype)
    for log_probs in (False, True):
        torch.library.opcheck(ops.cross_entropy_fwd_inplace.default, (x.clone(), t.clamp_min(0), None, -100, 0.1, 1, log_probs))
    y = torch.softmax(torch.randn(6, 11, device="cuda"), 1).to(dtype)
    torch.library.opcheck(ops.cross_entropy_prob_fwd_inplace.default, (x.clone(), y, None, 0.1, 2))


def test_cuda_graph_capture_forward_backward(backend):
    x, t = _data()
    x.requires_grad_(True)
    static_scale = torch.tensor(1.0, device="cuda")

    def step():
        x.grad = None
        loss = fused_nll.cross_entropy(x, t) * static_scale
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = fused_nll.cross_entropy(x, t) * static_scale
        loss.backward()
    for scale in (1.0, 0.25):
        static_scale.fill_(scale)
        x.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref_loss, ref_grad = reference("cross_entropy", x, t, grad_output=torch.tensor(scale))
        assert close(loss / scale, ref_loss, torch.bfloat16)[0]
        assert close(x.grad, ref_grad, torch.bfloat16)[0]


def test_no_host_sync(backend):
    x, t = _data()
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fused_nll.cross_entropy(x, t, label_smoothing=0.1).backward()
        fused_nll.cross_entropy(x.detach(), t, reduction="none")
        fused_nll.nll_loss(x, t, reduction="sum").backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_per_sample_gradients_no_host_sync_and_parity(backend):
    # torch.func on the GPU: vmap(grad) through the ops' batching rules, with no host
    # synchronisation, equal to torch's per-sample gradients (fp64 reference)
    x, t = _data(64, 1000)
    xs, ts = x.unflatten(0, (8, -1)), t.unflatten(0, (8, -1))
    per_sample = torch.func.vmap(torch.func.grad(
        lambda x, t: fused_nll.cross_entropy(x, t, label_smoothing=0.1)))
    per_sample(xs, ts)  # compile the kernels outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = per_sample(xs, ts)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = torch.stack([reference("cross_entropy", xs[b], ts[b], label_smoothing=0.1,
                                  grad_output=torch.tensor(1.0, device="cuda"))[1]
                        for b in range(8)])
    ok, detail = close(got, want, torch.bfloat16, scale_floor=1.0 / 8)
    assert ok, detail


def test_out_of_range_target_is_nan_not_device_assert(backend):
    x, t = _data(8, 50)
    t = torch.tensor([0, 1, 50, 3, -5, 5, 6, -100], device="cuda")
    loss = fused_nll.cross_entropy(x.float(), t, reduction="none")
    torch.cuda.synchronize()  # a device assert would surface here
    assert torch.isnan(loss[2]) and torch.isnan(loss[4])
    assert torch.isfinite(loss[[0, 1, 3, 5, 6, 7]]).all()
    assert torch.isnan(fused_nll.cross_entropy(x.float(), t))  # mean: nan, no crash
    fused_nll.set_debug(True)
    try:
        with pytest.raises(IndexError, match=r"Target 50 is out of bounds.*target\[2\]"):
            fused_nll.cross_entropy(x, t)
    finally:
        fused_nll.set_debug(False)
    # the CUDA context is still usable
    assert torch.isfinite(fused_nll.cross_entropy(x, t.clamp(0, 49)))


def test_second_order_hvp_parity_and_out_of_range_target(backend):
    # torch.func second order takes torch's ops (functional._second_order_loss): a
    # Hessian-vector product matches torch's in fp64, and an out-of-range class index
    # is a nan row there too, never a device-side assert
    x, t = _data(16, 300, torch.float32)
    v = torch.randn_like(x)

    def hvp(fn, t):
        return torch.func.jvp(torch.func.grad(lambda a: fn(a, t, label_smoothing=0.1)),
                              (x,), (v,))

    got = hvp(fused_nll.cross_entropy, t)
    want = hvp(torch.nn.functional.cross_entropy, t)
    for a, b in zip(got, want):
        ok, detail = close(a, b, torch.float32)
        assert ok, detail
    bad = t.clone()
    bad[3] = 300
    grad, hv = hvp(fused_nll.cross_entropy, bad)
    torch.cuda.synchronize()  # a device assert would surface here
    assert hv[3].isnan().all() and grad[3].isnan().all()
    assert torch.isfinite(hv[[0, 1, 2, 4]]).all()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace_backward"])
def test_tensors_on_another_device_than_the_current_one(backend, inplace):
    # Logits on cuda:1 while cuda:0 is current (model / pipeline parallelism without
    # torch.cuda.set_device): the kernels run on cuda:1, on its current stream.
    torch.cuda.set_device(0)
    x = torch.randn(64, 1000, device="cuda:1", dtype=torch.bfloat16)
    t = torch.randint(0, 1000, (64,), device="cuda:1")
    t[::7] = -100
    ref_loss, ref_grad = reference("cross_entropy", x, t, label_smoothing=0.1,
                                   grad_output=torch.tensor(1.0))
    leaf = x.clone().requires_grad_(True)
    xg = leaf * 1 if inplace else leaf  # (in place: not a leaf)
    loss = fused_nll.cross_entropy(xg, t, label_smoothing=0.1, inplace_backward=inplace)
    loss.backward()
    torch.cuda.synchronize(1)
    assert loss.device == leaf.grad.device == torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0
    assert close(loss, ref_loss, torch.bfloat16)[0]
    assert close(leaf.grad, ref_grad, torch.bfloat16, scale_floor=1 / 64)[0]


def test_large_vocab_parity(backend):
    for v in (128256, 256000):
        x, t = _data(16, v)
        ref_loss, ref_grad = reference("cross_entropy", x, t, grad_output=torch.tensor(1.0))
        xg = x.clone().requires_grad_(True)
        loss = fused_nll.cross_entropy(xg, t)
        loss.backward()
        assert close(loss, ref_loss, torch.bfloat16)[0]
        assert close(xg.grad, ref_grad, torch.bfloat16, scale_floor=1 / 16)[0]


@pytest.mark.parametrize("log_probs", [False, True], ids=["cross_entropy", "nll_loss"])
def test_large_vocab_inplace_backward(backend, log_probs):
    """Long rows (many warps per row): every thread reads x_t before any
    thread overwrites it with the gradient."""
    x, t = _data(16, 128256)
    if log_probs:
        x = torch.log_softmax(x.float(), 1).to(torch.bfloat16)
    fn = "nll_loss" if log_probs else "cross_entropy"
    ref_loss, ref_grad = reference(fn, x, t, grad_output=torch.tensor(1.0))
    leaf = x.clone().requires_grad_(True)
    xi = leaf.clone()
    loss = getattr(fused_nll, fn)(xi, t, inplace_backward=True)
    loss.backward()
    assert close(loss, ref_loss, torch.bfloat16)[0]
    assert close(leaf.grad, ref_grad, torch.bfloat16, scale_floor=1 / 16)[0]
    assert torch.equal(xi.detach(), leaf.grad)


SEGMENTATION_CASES = ["nchw-21-bf16", "channels-last-21-bf16", "rows-65536x21-fp32",
                      "nchw-150-bf16-sum", "nchw-1000-fp32-class-blocks", "nchw-21-none",
                      "nchw-21-probabilities"]


def _segmentation_case(name):
    """(logits, target, kwargs) at real segmentation / short-row shapes: the Triton tile
    kernels (and the CUDA C++ kernels' small row groups). Built on the GPU when called."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def logits(*shape, dtype=torch.bfloat16):
        return torch.randn(shape, device="cuda", dtype=dtype, generator=g) * 3

    def labels(shape, classes, ignore=255):
        t = torch.randint(0, classes, shape, device="cuda", generator=g)
        t.view(-1)[::11] = ignore  # VOC / Cityscapes style ignore label
        return t

    seg = dict(weight=torch.rand(21, device="cuda", generator=g) + 0.5, ignore_index=255,
               label_smoothing=0.1)
    if name == "nchw-21-bf16":
        return logits(8, 21, 128, 128), labels((8, 128, 128), 21), seg
    if name == "channels-last-21-bf16":
        x = logits(8, 21, 128, 128).contiguous(memory_format=torch.channels_last)
        return x, labels((8, 128, 128), 21), seg
    if name == "rows-65536x21-fp32":
        return logits(65536, 21, dtype=torch.float32), labels((65536,), 21, ignore=-100), {}
    if name == "nchw-150-bf16-sum":
        return logits(4, 150, 64, 64), labels((4, 64, 64), 150), dict(ignore_index=255,
                                                                       reduction="sum")
    if name == "nchw-1000-fp32-class-blocks":
        return logits(2, 1000, 32, 32, dtype=torch.float32), labels((2, 32, 32), 1000), \
            dict(ignore_index=255)
    if name == "nchw-21-none":
        return logits(8, 21, 128, 128), labels((8, 128, 128), 21), dict(ignore_index=255,
                                                                         reduction="none")
    assert name == "nchw-21-probabilities"
    return logits(8, 21, 128, 128), torch.softmax(logits(8, 21, 128, 128, dtype=torch.float32), 1), {}


@pytest.mark.parametrize("name", SEGMENTATION_CASES)
def test_segmentation_and_short_rows_parity(backend, name):
    x, t, kwargs = _segmentation_case(name)
    reduction = kwargs.get("reduction", "mean")
    rows_shape = (t.shape[0], *t.shape[2:]) if t.is_floating_point() else t.shape
    rows = max(1, torch.Size(rows_shape).numel())
    g_out = (torch.rand(rows_shape, device="cuda", dtype=torch.float64)
             if reduction == "none" else torch.tensor(1.0, dtype=torch.float64, device="cuda"))
    ref_loss, ref_grad = reference("cross_entropy", x, t, grad_output=g_out, **kwargs)
    xg = x.detach().clone().requires_grad_(True)
    loss = fused_nll.cross_entropy(xg, t, **kwargs)
    loss.backward(g_out.to(loss.dtype))
    ok, detail = close(loss, ref_loss, x.dtype)
    assert ok, f"loss: {detail}"
    ok, detail = close(xg.grad, ref_grad, x.dtype,
                       scale_floor=1 / rows if reduction == "mean" else 1.0)
    assert ok, f"grad: {detail}"
    if x.is_contiguous() and reduction != "none":  # in place: the same numbers
        leaf = x.detach().clone().requires_grad_(True)
        xi = leaf * 1
        loss_i = fused_nll.cross_entropy(xi, t, inplace_backward=True, **kwargs)
        loss_i.backward()
        assert torch.equal(loss_i.detach(), loss.detach())
        assert torch.equal(leaf.grad, xg.grad)


def test_segmentation_compile_fullgraph(backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, t, kwargs = _segmentation_case("nchw-21-bf16")
    xe = x.detach().clone().requires_grad_(True)
    fused_nll.cross_entropy(xe, t, **kwargs).backward()
    xc = x.detach().clone().requires_grad_(True)
    loss = torch.compile(lambda a, b: fused_nll.cross_entropy(a, b, **kwargs), fullgraph=True)(xc, t)
    loss.backward()
    assert sum(counters["graph_break"].values()) == 0
    torch.testing.assert_close(xc.grad, xe.grad, rtol=2e-2, atol=1e-4)

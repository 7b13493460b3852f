"""torch.compile(fullgraph=True) through the fused op: same loss and parameter
gradients as eager, no graph breaks, also with dynamic shapes."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

import fused_nll


class TinyLM(torch.nn.Module):
    def __init__(self, hidden=16, vocab=37):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        self.loss = fused_nll.CrossEntropyLoss(label_smoothing=0.1, weight=torch.rand(vocab) + 0.5)

    def forward(self, h, target):
        return self.loss(self.head(torch.relu(self.proj(h))), target)


def _grads(model, h, t):
    model.zero_grad()
    loss = model(h, t)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(eager, compiled):
    (l0, g0), (l1, g1) = eager, compiled
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_fullgraph_matches_eager_without_graph_breaks():
    torch.manual_seed(0)
    model = TinyLM()
    h, t = torch.randn(12, 16), torch.randint(0, 37, (12,))
    t[::4] = -100
    eager = _grads(model, h, t)
    compiled_model = torch.compile(model, fullgraph=True)
    _assert_same(eager, _grads(compiled_model, h, t))
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    explanation = torch._dynamo.explain(model)(h, t)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_legacy_reduction_arguments_compile():
    # torch's deprecated size_average / reduce, inside the compiled function too (the
    # functions and the modules built there), with no graph break, as torch's own
    x, t = torch.randn(6, 5, requires_grad=True), torch.randint(0, 5, (6,))

    def f(x, t):
        return (fused_nll.cross_entropy(x, t, size_average=False)
                + fused_nll.nll_loss(torch.log_softmax(x, 1), t, reduce=False).sum()
                + fused_nll.CrossEntropyLoss(size_average=True, reduce=True)(x, t))

    want = (F.cross_entropy(x, t, reduction="sum")
            + F.nll_loss(torch.log_softmax(x, 1), t, reduction="none").sum()
            + F.cross_entropy(x, t))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, t), want)


def test_dynamic_batch_sizes():
    torch.manual_seed(1)
    model = TinyLM()
    compiled_model = torch.compile(model, fullgraph=True, dynamic=True)
    for n in [3, 8, 17, 64]:
        h, t = torch.randn(n, 16), torch.randint(0, 37, (n,))
        _assert_same(_grads(model, h, t), _grads(compiled_model, h, t))
    assert sum(counters["graph_break"].values()) == 0
    # One graph for every batch size (no recompilation per size).
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_compiled_functional_k_dim_and_nll(reduction):
    torch.manual_seed(2)
    x = torch.randn(2, 7, 3, 4, requires_grad=True)
    t = torch.randint(0, 7, (2, 3, 4))

    def f(x, t):
        a = fused_nll.cross_entropy(x, t, reduction=reduction)
        b = fused_nll.nll_loss(torch.log_softmax(x, 1), t, reduction=reduction)
        return (a + b).sum()

    eager_loss = f(x, t)
    (eager_grad,) = torch.autograd.grad(eager_loss, x)
    compiled_loss = torch.compile(f, fullgraph=True)(x, t)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, x)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_export():
    model = TinyLM().eval()
    h, t = torch.randn(5, 16), torch.randint(0, 37, (5,))
    exported = torch.export.export(model, (h, t))
    torch.testing.assert_close(exported.module()(h, t), model(h, t))
    assert any("fused_nll" in str(n.target) for n in exported.graph.nodes)


def test_autocast_under_compile():
    # The usual mixed-precision step: a bf16 LM head under torch.autocast, the loss in
    # float32 as torch's; compiled fullgraph it matches eager, with no graph break.
    torch.manual_seed(4)
    model = TinyLM()
    h, t = torch.randn(12, 16), torch.randint(0, 37, (12,))

    def step(m):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(h, t)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    assert eager[0].dtype == compiled[0].dtype == torch.float32
    # bf16 matmuls inside: the compiled graph may fuse/round them differently
    torch.testing.assert_close(compiled[0], eager[0], rtol=2e-2, atol=1e-3)
    for a, b in zip(eager[1], compiled[1]):
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-3)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.parametrize("amp", [False, True], ids=["", "autocast"])
def test_compiled_probability_targets(amp):
    # Soft targets with a weight of another dtype (the loss dtype promotes with both, as
    # torch's), also under autocast: fullgraph, same loss and gradient as eager.
    torch.manual_seed(6)
    x = torch.randn(5, 11, dtype=torch.float16, requires_grad=True)
    y = torch.softmax(torch.randn(5, 11), 1).to(torch.float16)
    w = torch.rand(11) + 0.5

    def f(x, y, w):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return fused_nll.cross_entropy(x, y, weight=w, label_smoothing=0.1)

    eager = f(x, y, w)
    (eager_grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True)(x, y, w)
    (compiled_grad,) = torch.autograd.grad(compiled, x)
    assert compiled.dtype == eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_classes_innermost_logits_compile(reduction):
    # Channels-last logits and a (B, V, T) view of LM logits: the public API runs them as
    # the (rows, C) view of their memory; compiled fullgraph, same loss and gradient.
    torch.manual_seed(4)
    cases = [(torch.randn(2, 7, 5, 3).contiguous(memory_format=torch.channels_last),
              torch.randint(0, 7, (2, 5, 3))),
             (torch.randn(2, 6, 40).transpose(1, 2), torch.randint(0, 40, (2, 6)))]
    for x, t in cases:
        def loss_of(x, t):
            return fused_nll.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1).sum()

        results = []
        for fn in (loss_of, torch.compile(loss_of, fullgraph=True)):
            xg = x.detach().clone().requires_grad_(True)
            loss = fn(xg, t)
            loss.backward()
            results.append((loss.detach(), xg.grad))
        _assert_same(*[(l, [g]) for l, g in results])
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])

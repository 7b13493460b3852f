"""inplace_backward=True: the gradient is written over the logits during the
forward pass (no gradient-sized buffer), on every backend runnable here.

Checks: loss and gradient parity with torch in fp64 (the same helper as the
parity suite), that the logits' storage is the gradient handed to the
producing op (no copy), the version-counter bump that turns a later use of
the overwritten logits into autograd's error, and that nothing is written
when no gradient is needed."""
import pytest
import torch
import torch.nn.functional as F

import fused_nll
from conftest import check_parity, dynamo_keeps_user_messages

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]


def _logits(*shape, dtype, device):
    return (torch.randn(*shape, dtype=torch.float64) * 3).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("classes", [3, 1000])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_index_targets(target, dtype, reduction, classes, label_smoothing):
    torch.manual_seed(classes)
    x = _logits(6, classes, dtype=dtype, device=target)
    t = torch.randint(0, classes, (6,), device=target)
    t[::3] = -100
    w = torch.rand(classes, device=target) + 0.1
    check_parity("cross_entropy", x, t, weight=w, reduction=reduction,
                 label_smoothing=label_smoothing, inplace=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_k_dim_nll_and_prob_targets(target, reduction):
    torch.manual_seed(1)
    x = _logits(2, 7, 3, 5, dtype=torch.float32, device=target)
    t = torch.randint(0, 7, (2, 3, 5), device=target)
    t.view(-1)[::4] = -100
    check_parity("cross_entropy", x, t, reduction=reduction, label_smoothing=0.05, inplace=True)
    check_parity("nll_loss", torch.log_softmax(x, 1), t, reduction=reduction, inplace=True)
    # (check_parity's input is a non-leaf copy: nothing else saved it)
    y = torch.softmax(torch.randn(6, 11, device=target), 1)
    check_parity("cross_entropy", _logits(6, 11, dtype=torch.float32, device=target), y,
                 reduction=reduction, label_smoothing=0.1, inplace=True)


def test_extreme_logits_and_all_ignored(target):
    x = _logits(4, 50, dtype=torch.float32, device=target)
    x[0, 3] = 1e4
    x[1] = -1e4
    x[2, :10] = float("-inf")
    t = torch.tensor([3, 0, 20, -100], device=target)
    check_parity("cross_entropy", x, t, inplace=True)
    check_parity("cross_entropy", x, torch.full((4,), -100, device=target), reduction="sum",
                 inplace=True)


def test_logits_storage_is_the_gradient(target):
    """Linear head -> loss: the gradient reaching the head's backward is the
    logits' own storage, and the parameter gradients equal torch's."""
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 40).to(target)
    h = torch.randn(12, 8, device=target, requires_grad=True)
    t = torch.randint(0, 40, (12,), device=target)

    logits = head(h)
    seen = []
    logits.register_hook(lambda g: seen.append(g.data_ptr()))
    version = logits._version
    loss = fused_nll.cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=True)
    assert logits._version > version  # the logits were overwritten
    loss.backward()
    assert seen == [logits.data_ptr()]
    got = (loss.detach(), h.grad.clone(), head.weight.grad.clone())

    h.grad, head.weight.grad, head.bias.grad = None, None, None
    ref = F.cross_entropy(head(h), t, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(got[0], ref.detach())
    torch.testing.assert_close(got[1], h.grad)
    torch.testing.assert_close(got[2], head.weight.grad)


def test_other_use_of_the_logits_is_an_autograd_error(target):
    h = torch.randn(4, 8, device=target, requires_grad=True)
    logits = h @ torch.randn(8, 10, device=target)
    also = logits.pow(2).sum()  # pow saves the logits for its backward
    loss = fused_nll.cross_entropy(logits, torch.randint(0, 10, (4,), device=target),
                                   inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + also).backward()


def test_untouched_without_gradient(target):
    x = _logits(5, 9, dtype=torch.float32, device=target)
    t = torch.randint(0, 9, (5,), device=target)
    before = x.clone()
    fused_nll.cross_entropy(x, t, inplace_backward=True)  # requires_grad=False
    leaf = x.clone().requires_grad_(True)
    with torch.no_grad():
        fused_nll.cross_entropy(leaf * 1, t, inplace_backward=True)
    assert torch.equal(x, before) and torch.equal(leaf.detach(), before)


def test_retain_graph_second_backward(target):
    h = torch.randn(6, 8, device=target, requires_grad=True)
    logits = h @ torch.randn(8, 10, device=target)
    loss = fused_nll.CrossEntropyLoss(inplace_backward=True)(
        logits, torch.randint(0, 10, (6,), device=target))
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    (loss * 3).backward()
    torch.testing.assert_close(h.grad, 4 * first)


def test_logits_changed_between_two_backwards(target):
    # the logits hold the gradient: changed in place after the first backward, the
    # second has nothing to compute from, and says so (naming the logits, not .grad)
    h = torch.randn(6, 8, device=target, requires_grad=True)
    logits = h @ torch.randn(8, 10, device=target)
    loss = fused_nll.cross_entropy(logits, torch.randint(0, 10, (6,), device=target),
                                   inplace_backward=True)
    loss.backward(retain_graph=True)
    with torch.no_grad():
        logits.mul_(1.0)
    with pytest.raises(RuntimeError, match="found the logits modified in place since the first"):
        loss.backward()


def test_compiled_fullgraph_matches_eager():
    """CPU (C++ op): Inductor keeps the mutation of the logits' buffer in place."""
    torch.manual_seed(3)
    head = torch.nn.Linear(8, 40)
    h, t = torch.randn(12, 8), torch.randint(0, 40, (12,))
    t[::5] = -100

    def step(h, t):
        logits = head(h)
        log_probs = logits - logits.logsumexp(1, keepdim=True)  # nothing saves log_probs
        return fused_nll.nll_loss(log_probs, t, inplace_backward=True) \
            + fused_nll.cross_entropy(head(h), t, label_smoothing=0.1, inplace_backward=True)

    def grads(fn):
        head.zero_grad()
        loss = fn(h, t)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in head.parameters()]

    eager = grads(step)
    compiled = grads(torch.compile(step, fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True], ids=["grad-buffer", "inplace"])
def test_double_backward_raises_instead_of_zero(target, inplace):
    # The gradient is a buffer written in the forward pass: differentiating it again
    # must raise, never give a silent 0; nor is it the logits tensor (with its graph).
    h = torch.randn(4, 8, device=target, dtype=torch.float64, requires_grad=True)
    logits = h @ torch.randn(8, 10, device=target, dtype=torch.float64)
    loss = fused_nll.cross_entropy(logits, torch.randint(0, 10, (4,), device=target),
                                   inplace_backward=inplace)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, logits, create_graph=True)
    (g,) = torch.autograd.grad(loss, logits)
    assert g is not logits and not g.requires_grad


def test_second_backward_after_a_zero_upstream_gradient_raises(target):
    h = torch.randn(3, 8, device=target, requires_grad=True)
    logits = h @ torch.randn(8, 10, device=target)
    loss = fused_nll.cross_entropy(logits, torch.randint(0, 10, (3,), device=target),
                                   reduction="none", inplace_backward=True)
    (loss * torch.tensor([1.0, 0.0, 2.0], device=target)).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.sum().backward()


def test_view_of_a_leaf_is_refused_also_when_compiled():
    p = torch.nn.Parameter(torch.randn(40))
    t = torch.randint(0, 10, (4,))
    f = torch.compile(lambda p, t: fused_nll.cross_entropy(p.view(4, 10), t, inplace_backward=True),
                      fullgraph=True)
    before = p.detach().clone()
    # (older Dynamo says only "Observed exception" under fullgraph: README, Known issues)
    with pytest.raises(Exception, match="or a view of one" if dynamo_keeps_user_messages()
                       else "Observed exception"):
        f(p, t)
    assert torch.equal(p.detach(), before)

"""torch.func support: batching rules for the ops, and the autograd the public
functions use inside torch.func transforms.

vmap: each non-mutating op (forward and backward, index and probability targets)
has a batching rule that runs the batch as one call of the same op on the rows of
all samples together (the vmapped dimension is merged into the rows), with
``reduction="none"``; a per-sample mean or sum is then reduced from those rows (in
the accumulation dtype), and a per-sample upstream gradient is spread over them.
So ``vmap`` costs one launch, not a loop over samples. Merging the batch into the
rows is a view when the vmapped dimension sits just outside the rows (e.g. dim 0
of a contiguous (B, N, C) tensor), otherwise a copy; a per-sample weight (a
batched ``weight``) runs one call per sample.

Differentiating transforms (grad, vjp, jacrev, jvp, jacfwd): the autograd that
torch.library generates for custom ops follows the torch.autograd protocol only,
so inside torch.func the public functions go through `FuncLoss` instead, an
autograd.Function with ``setup_context`` (which functorch requires) whose
backward is the backward op, whose jvp contracts the same gradient with the
tangent, and whose vmap rule is generated from the ops' batching rules above.
Second-order transforms (hessian, jacfwd(jacrev)) raise: the backward op has no
derivative of its own.
"""
from __future__ import annotations

import torch

_NONE, _MEAN, _SUM = 0, 1, 2  # reduction codes (docs/ops.md)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _batch_first(t: torch.Tensor | None, dim: int | None, size: int):
    """`t` with the vmapped dimension first (expanded when `t` is not batched)."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _merge(t: torch.Tensor, per_sample_rows: bool) -> torch.Tensor:
    """(B, N, ...) -> (B*N, ...): the samples' rows as one batch of rows. A sample
    of one row ((C,) logits) is already (B, C)."""
    return t.flatten(0, 1) if per_sample_rows else t


def _loop(op, info, in_dims, args, kwargs):
    """One call per sample (a batched weight), stacked. An output that is empty for
    every sample (a forward op's gradient when compute_grad is false) stays unbatched."""
    outs = []
    for b in range(info.batch_size):
        sample = [a.select(d, b) if d is not None else a for a, d in zip(args, in_dims)]
        outs.append(op(*sample, **kwargs))
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    stacked, dims = [], []
    for per_sample in zip(*outs):
        empty = per_sample[0].numel() == 0 and per_sample[0].dim() == 1
        stacked.append(per_sample[0] if empty else torch.stack(per_sample))
        dims.append(None if empty else 0)
    return tuple(stacked), tuple(dims)


def _denominator(reduction: int, prob: bool, target, weight, ignore_index, size: int, rows: int,
                 dtype):
    """Per-sample divisor of the rows' summed loss: 1 for sum; for mean the rows'
    count (probability targets) or the weight of the rows not ignored (class
    indices), as torch's mean (0 for a sample with no row left: nan, like torch)."""
    if reduction == _SUM:
        return None
    if prob:
        return torch.full((size, 1), float(rows), dtype=dtype, device=target.device)
    valid = target != ignore_index
    if weight is None:
        w = valid.to(dtype)
    else:
        safe = torch.where(valid, target, 0).clamp(0, weight.shape[0] - 1)
        w = weight.to(dtype)[safe] * valid
    return w.reshape(size, rows).sum(1, keepdim=True)


def _nonzero(den: torch.Tensor) -> torch.Tensor:
    """The divisor for gradients: a sample with zero total weight (all rows ignored)
    has a zero gradient in torch, not 0/0."""
    return torch.where(den == 0, 1, den)


def _fwd_rule(op, prob: bool):
    """Batching rule of a forward op (index targets, or probability targets)."""

    n_args = 3 if prob else 5  # the op's arguments between weight and loss_dtype

    def rule(info, in_dims, input, target, weight, *args, **kwargs):
        loss_dtype = kwargs.get("loss_dtype", args[n_args] if len(args) > n_args else None)
        args = args[:n_args]
        if in_dims[2] is not None:
            return _loop(op, info, in_dims, (input, target, weight, *args),
                         {"loss_dtype": loss_dtype})
        size = info.batch_size
        x = _batch_first(input, in_dims[0], size)
        t = _batch_first(target, in_dims[1], size)
        red_at = 1 if prob else 2
        reduction, compute_grad = args[red_at], args[-1]
        ignore_index = None if prob else args[0]
        per_sample_rows = x.dim() > 2
        x2, t2 = _merge(x, per_sample_rows), _merge(t, per_sample_rows)
        out_dtype = loss_dtype or (torch.result_type(input, target) if prob else input.dtype)
        acc = _acc(x.dtype)
        run_args = [*args]
        run_args[red_at] = _NONE
        loss, lse, grad = op(x2, t2, weight, *run_args,
                             loss_dtype=out_dtype if reduction == _NONE else acc)
        rows_shape = [size, x.shape[1], *x.shape[3:]] if per_sample_rows else [size]
        lse = lse.reshape(rows_shape)
        grad = grad.reshape(x.shape) if compute_grad else grad
        if reduction == _NONE:
            return (loss.reshape(rows_shape), lse, grad), (0, 0, 0 if compute_grad else None)
        n_rows = loss.numel() // size if size else 0
        den = _denominator(reduction, prob, t2, weight, ignore_index, size, n_rows, acc)
        total = loss.reshape(size, n_rows).sum(1, keepdim=True)
        if den is not None:
            total = total / den
            if compute_grad:  # (a sample with no row left has a zero gradient, as torch)
                den = _nonzero(den).reshape([size] + [1] * (grad.dim() - 1))
                grad = grad / den.to(grad.dtype)
        return ((total.reshape(size).to(out_dtype), lse, grad),
                (0, 0, 0 if compute_grad else None))

    return rule


def _bwd_rule(op, prob: bool):
    """Batching rule of a backward op."""

    def rule(info, in_dims, grad_loss, input, target, weight, lse, *args):
        if in_dims[3] is not None:
            return _loop(op, info, in_dims, (grad_loss, input, target, weight, lse, *args), {})
        size = info.batch_size
        x = _batch_first(input, in_dims[1], size)
        t = _batch_first(target, in_dims[2], size)
        lse = _batch_first(lse, in_dims[4], size)
        g = _batch_first(grad_loss, in_dims[0], size)
        reduction = args[-2] if not prob else args[-1]
        ignore_index = None if prob else args[0]
        per_sample_rows = x.dim() > 2
        x2, t2 = _merge(x, per_sample_rows), _merge(t, per_sample_rows)
        rows2 = [x2.shape[0], *x2.shape[2:]]
        if reduction != _NONE:
            # the per-sample upstream gradient, over each sample's rows (in acc dtype)
            acc = _acc(x.dtype)
            n_rows = (x2.numel() // x2.shape[1] // size) if size and x2.numel() else 0
            g = g.to(acc).reshape(size, 1)
            den = _denominator(reduction, prob, t2, weight, ignore_index, size, n_rows, acc)
            if den is not None:
                g = g / _nonzero(den)
            g = g.expand(size, n_rows)
        run_args = list(args)
        run_args[-2 if not prob else -1] = _NONE
        grad = op(g.reshape(rows2), x2, t2, weight, lse.reshape(rows2), *run_args)
        return grad.reshape(x.shape), 0

    return rule


def register_batching_rules(fwd: str, bwd: str, prob_fwd: str, prob_bwd: str) -> None:
    """Batching rules for a family's four non-mutating ops (by qualified name)."""
    for name, rule in ((fwd, _fwd_rule), (prob_fwd, _fwd_rule), (bwd, _bwd_rule),
                       (prob_bwd, _bwd_rule)):
        ns, op_name = name.split("::")
        op = getattr(getattr(torch.ops, ns), op_name).default
        torch.library.register_vmap(name, rule(op, name in (prob_fwd, prob_bwd)))


def _refuse_second_order(transform: str, tensor: torch.Tensor) -> None:
    """Raises when this backward (transform "grad") or jvp ("jvp") is itself being
    differentiated: a second-order derivative (hessian, jacfwd(jacrev), grad(grad)),
    which the fused kernels cannot give. First order means: the only
    differentiating transform on functorch's stack is the one running this call,
    of that kind, at the level of the tensors it passes (a vjp_fn called after its
    own transform has exited, under another one, fails this). Outside torch.func
    (plain autograd, e.g. after a vmap of the forward only) it is
    create_graph=True, as on the public path."""
    from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

    kind = {"grad": TransformType.Grad, "jvp": TransformType.Jvp}[transform]
    diffs = [i for i in retrieve_all_functorch_interpreters()
             if i.key() in (TransformType.Grad, TransformType.Jvp)]
    if not diffs:
        # a vjp_fn called after its transform exited (jacrev): its tensors are still
        # functorch's (dead) wrappers, and functorch always asks for create_graph
        first_order = (transform == "jvp" or not torch.is_grad_enabled()
                       or torch._C._functorch.is_functorch_wrapped_tensor(tensor))
    else:
        first_order = (len(diffs) == 1 and diffs[0].key() == kind
                       and torch._C._functorch.maybe_get_level(tensor) == diffs[0].level())
    if not first_order:
        raise RuntimeError(
            "fused_nll: second-order derivatives (torch.func.hessian, jacfwd(jacrev(...)), "
            "grad(grad(...)), create_graph=True) through the fused loss are not supported: its "
            "gradient comes from a fused kernel that has no derivative of its own. Use "
            "torch.nn.functional.cross_entropy (or nll_loss) for the loss whose higher-order "
            "derivatives you need.")


class FuncLoss(torch.autograd.Function):
    """The public functions' path inside torch.func transforms (see the module
    docstring). Inputs: (family, prob, loss_dtype, input, target, weight, *args),
    args = the forward op's arguments after `weight`, without compute_grad.
    Returns (loss, lse); lse is not differentiable."""

    generate_vmap_rule = True

    @staticmethod
    def forward(family, prob, loss_dtype, input, target, weight, *args):
        fwd = family.prob_fwd if prob else family.fwd
        loss, lse, _ = fwd(input, target, weight, *args, False, loss_dtype=loss_dtype)
        return loss, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        family, prob, _, input, target, weight, *args = inputs
        ctx.bwd, ctx.args = (family.prob_bwd if prob else family.bwd), args
        ctx.reduction = args[-1] if prob else args[-2]
        ctx.loss_dtype = output[0].dtype
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(input, target, weight, output[1])
        ctx.save_for_forward(input, target, weight, output[1])

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        input, target, weight, lse = ctx.saved_tensors
        _refuse_second_order("grad", input)
        with torch.no_grad():  # first order only (above): nothing to record
            grad = ctx.bwd(grad_loss, input, target, weight, lse, *ctx.args)
        return (None, None, None, grad, None, None) + (None,) * len(ctx.args)

    @staticmethod
    def jvp(ctx, _family, _prob, _loss_dtype, input_t, _target_t, _weight_t, *_args_t):
        input, target, weight, lse = ctx.saved_tensors
        _refuse_second_order("jvp", input)
        # d loss = <gradient of the loss, tangent>, summed over the classes of each
        # row (reduction none) or over everything (mean, sum)
        if ctx.reduction == _NONE:
            upstream = torch.ones_like(lse)
        else:
            upstream = torch.ones((), dtype=lse.dtype, device=lse.device)
        # the gradient at the same (rounded) logits, in the accumulation dtype: a
        # half-precision gradient would round each term of the contraction (a copy
        # of the logits in fp32; jvp is not a training path)
        with torch.no_grad():
            grad = ctx.bwd(upstream, input.to(lse.dtype), target, weight, lse, *ctx.args)
        prod = grad * input_t.to(lse.dtype)
        if ctx.reduction != _NONE:
            tangent = prod.sum()
        else:
            tangent = prod.sum(0 if input.dim() == 1 else 1)
        return tangent.to(ctx.loss_dtype), None

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

Differentiating transforms (grad, vjp, jacrev, jvp, jacfwd, linearize):
- eager, the public functions go through `FuncLoss`, an autograd.Function with
  ``setup_context`` (which functorch requires), applied from Python, so functorch
  records it at every level (plain autograd included); its backward is the backward
  op, its jvp (`loss_jvp`) contracts the same gradient with the tangent, and its vmap
  rule is generated from the ops' batching rules above;
- under torch.compile, where Dynamo cannot trace `FuncLoss`, and for direct op
  calls: the ops' own autograd (_ops.register_autograd), a single-level
  autograd.Function with the same backward and jvp, which records the op at the
  innermost differentiating level only; so there a transform nested in another
  differentiating one, or over tensors that plain autograd records too, raises
  (`refuse_unrecorded_levels`) instead of losing those levels' derivatives.
Both also differentiate the probability-target loss with respect to the targets and
the class weight, as torch does (`prob_target_weight_grads`, torch ops from the saved
lse). The backward op has no derivative of its own, so second-order transforms
(hessian, jacfwd(jacrev), jvp(grad)), seen at the forward (`second_order_ahead`), take
torch's ops instead (functional._second_order_loss); those that cannot be seen there
(create_graph=True) raise (`refuse_second_order`).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.autograd.forward_ad as _fwad

_NONE, _MEAN, _SUM = 0, 1, 2  # reduction codes (docs/ops.md)


def _acc(dtype: torch.dtype) -> torch.dtype:
    from ._ops import acc_dtype  # (lazy: _ops imports this module)

    return acc_dtype(dtype)


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
    """(per-sample divisor of the rows' summed loss, shape (B, 1), or None for sum;
    the rows that count, shape (B, rows), or None when all do). Mean: the rows'
    count (probability targets) or the total weight of the rows not ignored (class
    indices), as torch's mean."""
    if reduction == _SUM:
        return None, None
    if prob:
        return torch.full((size, 1), float(rows), dtype=dtype, device=target.device), None
    valid = (target != ignore_index).reshape(size, rows)
    if weight is None:
        w = valid.to(dtype)
    else:  # (any integer dtype of targets; out-of-range ones are the kernels' to report)
        safe = torch.where(valid, target.reshape(size, rows), 0).long().clamp(0, weight.shape[0] - 1)
        w = weight.to(dtype)[safe] * valid
    return w.sum(1, keepdim=True), valid


def _row_divisor(den: torch.Tensor, valid: torch.Tensor | None, rows: int) -> torch.Tensor:
    """(B, rows) divisor of each row's gradient: its sample's divisor; 1 for an ignored
    row, whose gradient is 0 (torch: 0 even when the sample has no row left, nan for
    the counted rows of a sample whose total weight is 0)."""
    den = den.expand(den.shape[0], rows)
    return den if valid is None else torch.where(valid, den, 1)


def _divide(num: torch.Tensor, div: torch.Tensor) -> torch.Tensor:
    """num / div, nan where div is 0 (as torch's mean over zero total weight)."""
    return torch.where(div == 0, float("nan"), num / div)


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
        den, valid = _denominator(reduction, prob, t2, weight, ignore_index, size, n_rows, acc)
        total = loss.reshape(size, n_rows).sum(1, keepdim=True)
        if den is not None:
            total = _divide(total, den)  # (nan: no row left, or zero weight)
            if compute_grad:  # (rows shape with the class dimension at 2)
                div = _row_divisor(den, valid, n_rows).reshape(rows_shape).unsqueeze(
                    2 if per_sample_rows else 1)
                grad = _divide(grad, div).to(grad.dtype)
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
            n_rows = math.prod(rows2) // size if size else 0
            g = g.to(acc).reshape(size, 1).expand(size, n_rows)
            den, valid = _denominator(reduction, prob, t2, weight, ignore_index, size, n_rows,
                                      acc)
            if den is not None:
                g = _divide(g, _row_divisor(den, valid, n_rows))
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


_SECOND_ORDER = (
    "fused_nll: this derivative through the fused loss (second order: create_graph=True, "
    "or a derivative not visible when the loss was computed; or the derivative of a "
    "vjp function with respect to its cotangent) is not supported: its "
    "gradient comes from a fused kernel that has no derivative of its own. Use "
    "torch.nn.functional.cross_entropy (or nll_loss) for the loss whose higher-order "
    "derivatives you need, or torch.func's second-order transforms around the loss "
    "(torch.func.hessian, jvp(grad(f)), grad(grad(f))), which fused_nll sees at the "
    "forward and computes with torch's ops.")


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under all of `t`'s torch.func wrappers."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


# torch 2.6's generated vmap rule for an autograd.Function cannot run its backward
# when an output's gradient is None (it batches the None: a TypeError from
# _add_batch_dim), and FuncLoss's lse output never has one; torch 2.7 fixed that.
_VMAP_BACKWARD_TAKES_NONE = torch.torch_version.TorchVersion(torch.__version__) >= (2, 7)


def refuse_reverse_mode_through_vmap(*tensors: torch.Tensor | None) -> None:
    """On torch < 2.7, raises a clear error up front for a vmap of the loss that
    reverse mode will differentiate (grad(vmap(f)), jacrev(vmap(f)), or plain autograd
    after vmap(f), e.g. an ensemble's loss.backward()), which would otherwise fail
    inside torch's backward. vmap(grad(f)), jvp and jacfwd work there."""
    if _VMAP_BACKWARD_TAKES_NONE:
        return
    from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

    interpreters = retrieve_all_functorch_interpreters()
    vmaps = [i.level() for i in interpreters if i.key() == TransformType.Vmap]
    if not vmaps:
        return
    recorded = any(_unwrapped(t).requires_grad for t in tensors if t is not None)
    outer_grad = any(i.key() == TransformType.Grad and i.level() < max(vmaps) for i in interpreters)
    if outer_grad or (recorded and torch.is_grad_enabled()):
        raise RuntimeError(
            f"fused_nll: on torch {torch.__version__}, reverse-mode derivatives through a "
            "torch.func.vmap of the loss (grad(vmap(f)), jacrev(vmap(f)), or backward() "
            "after vmap(f)) fail inside torch: its generated vmap backward rule cannot "
            "take the loss's unused second output (fixed in torch 2.7). Upgrade torch, or "
            "put vmap outside the derivative: vmap(grad(f)) (per-sample gradients), jvp "
            "and jacfwd work here.")


def _has_tangent(t: torch.Tensor | None) -> bool:
    """Whether `t` (under its torch.func wrappers) carries a plain forward-mode tangent."""
    return (t is not None and _fwad._current_level >= 0
            and _fwad.unpack_dual(_unwrapped(t)).tangent is not None)


def _differentiating_transforms() -> list:
    """The live differentiating torch.func interpreters (grad and jvp levels),
    outermost first."""
    from torch._functorch.pyfunctorch import TransformType, retrieve_all_functorch_interpreters

    return [i for i in retrieve_all_functorch_interpreters()
            if i.key() in (TransformType.Grad, TransformType.Jvp)]


def second_order_ahead(input: torch.Tensor, others=()) -> bool:
    """Eager, at the forward: whether the loss is about to be differentiated twice, as
    far as can be told there: inside two live differentiating torch.func transforms
    (hessian, jacfwd(jacrev), grad(grad), jvp(grad), vjp(grad): the same rule as
    `refuse_second_order`, which would refuse its backward or jvp), a torch.func
    derivative inside a plain forward-AD level (torch.func.linearize(grad(f))), or
    logits (or, in `others`, probability targets or weight) that carry a plain
    forward-mode tangent while plain autograd records them (forward-over-reverse).
    The public functions then compute the loss with torch's own ops, which have
    derivatives of every order. Not knowable there, so still refused at backward:
    create_graph=True (a MAML inner step, a gradient penalty, torch.autograd.functional's
    hvp) and a plain autograd graph around a torch.func derivative (warned). Not
    under torch.compile (refuse_unrecorded_levels refuses those)."""
    if torch.compiler.is_compiling():
        return False
    forward_ad = _fwad._current_level >= 0
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import TransformType

        diffs = [i.key() for i in _differentiating_transforms()]
        if len(diffs) > 1 or diffs and forward_ad and TransformType.Jvp not in diffs:
            return True
    if not (forward_ad and torch.is_grad_enabled()):
        return False
    tensors = [t for t in (input, *others) if t is not None]
    return (any(_unwrapped(t).requires_grad for t in tensors)
            and any(_has_tangent(t) for t in tensors))


def refuse_second_order(transform: str, tensor: torch.Tensor, others=(),
                        input_grad: bool = True) -> None:
    """Raises when this backward (transform "grad") or jvp ("jvp") is itself being
    differentiated: a second-order derivative (hessian, jacfwd(jacrev), grad(grad)),
    which the fused kernels cannot give. `tensor`: the saved logits; `others`: the
    saved probability targets and weight (their gradients and tangents come from torch
    ops, which carry a forward-mode tangent themselves, but the logits' gradient, when
    `input_grad`, comes from the kernel and would drop theirs).

    - Their wrapper is dead (a vjp_fn called after its vjp exited, as jacrev does):
      first order unless some differentiating transform is still live around it.
    - No differentiating transform live (plain autograd after a vmap of the
      forward, or plain forward AD): a backward with create_graph=True is second
      order, as on the public path.
    - Otherwise the innermost live differentiating transform runs this call; any
      other one around it differentiates it.
    A plain-autograd graph around a torch.func derivative (parameters that require
    grad outside it) cannot get the loss's second-order term either: warned. (The
    gradient of a vjp_fn with respect to its cotangent, first order, raises too:
    its wrapper is dead.)"""
    from torch._functorch.pyfunctorch import TransformType

    functorch = torch._C._functorch
    kind = {"grad": TransformType.Grad, "jvp": TransformType.Jvp}[transform]
    diffs = _differentiating_transforms()
    levels, base = [], tensor  # the levels of its wrappers, outermost first
    while functorch.is_functorch_wrapped_tensor(base):
        levels.append(functorch.maybe_get_level(base))
        base = functorch.get_unwrapped(base)
    dead = -2 in levels  # (inside vmap's generated rule, under a batched wrapper)
    if transform == "grad" and (_has_tangent(base) or input_grad and any(
            _has_tangent(t) for t in others)):
        # a backward whose logits (or, for the logits' gradient, probability targets or
        # weight) carry a plain forward-mode tangent (forward-over-reverse: forward_ad
        # dual tensors then autograd.grad)
        raise RuntimeError(_SECOND_ORDER)
    if (transform == "grad" and _fwad._current_level >= 0 and diffs
            and not any(i.key() == TransformType.Jvp for i in diffs)):
        # a torch.func derivative inside a plain forward-AD level (not torch.func.jvp's,
        # which is a transform of its own, above): torch.func.linearize(grad(f)) traces
        # grad(f) on dual logits with make_fx, where the tangent is invisible here (the
        # saved logits carry none), so the gradient's tangent would silently be 0
        raise RuntimeError(_SECOND_ORDER)
    if dead:
        first_order = not diffs
    elif not diffs:
        if transform == "grad":  # plain autograd: create_graph=True, as the public path
            from ._ops import refuse_double_backward  # (lazy: _ops imports this module)

            refuse_double_backward()
        first_order = True
    else:
        first_order = len(diffs) == 1 and diffs[0].key() == kind
    if not first_order:
        raise RuntimeError(_SECOND_ORDER)
    # a derivative computed here (under no_grad) that plain autograd would otherwise
    # record: torch.func.grad / vjp / jacrev (a grad level, live or dead) or a jvp on
    # tensors that require grad outside the transform
    requires_grad = base.requires_grad or any(
        _unwrapped(t).requires_grad for t in others if t is not None)
    recorded = requires_grad and (transform == "jvp" and torch.is_grad_enabled()
                                  or transform == "grad" and (bool(diffs) or dead))
    if recorded:
        warnings.warn(
            "fused_nll: a torch.func derivative (grad, vjp, jacrev, jvp, ...) through the fused "
            "loss, on tensors that plain autograd records too (e.g. parameters that require "
            "grad, not detached): the derivative it returns has no autograd history through "
            "the loss, so a loss built from it (a gradient penalty) misses that second-order "
            "term. Pass detached parameters to torch.func (its usual idiom), or use "
            "torch.nn.functional.cross_entropy if you differentiate the derivative.",
            stacklevel=3)


def refuse_unrecorded_levels(input: torch.Tensor, target: torch.Tensor | None = None,
                             weight: torch.Tensor | None = None) -> None:
    """For the ops' own autograd (_ops.register_autograd), which records the op at the
    innermost live differentiating torch.func level only: raises when another level
    would need to record it too, i.e. another differentiating transform around that
    one (second order, or a derivative of a primal or aux output), or plain autograd
    (the logits, unwrapped, require grad: e.g. parameters that require grad passed to
    torch.func undetached). Eager, the public functions take `FuncLoss` instead, which
    functorch records at every level."""
    if not torch._C._are_functorch_transforms_active():
        return
    diffs = _differentiating_transforms()
    if not diffs:
        return
    if len(diffs) > 1:
        raise RuntimeError(
            "fused_nll: nested differentiating torch.func transforms through the loss "
            "(second-order derivatives such as hessian or grad(grad(...)), or a derivative of "
            "an inner transform's loss output, e.g. grad of vjp(f, x)[0]) are not supported "
            "under torch.compile (or calling the op itself): there the loss is recorded at "
            "the innermost transform only. Call it eagerly (first-order combinations work "
            "there), or use torch.nn.functional.cross_entropy for higher-order derivatives.")
    if any(_unwrapped(t).requires_grad for t in (input, target, weight) if t is not None):
        raise RuntimeError(
            "fused_nll: under torch.compile (or calling the op itself), a torch.func "
            "transform (grad, vjp, jacrev, jvp, ...) of the loss over tensors that plain "
            "autograd records too (e.g. parameters that require grad, not detached) is not "
            "supported: plain autograd would not see the loss. Pass detached tensors to the "
            "transform (torch.func's usual idiom: {k: v.detach() for k, v in "
            "model.named_parameters()}), or call it eagerly.")


def refuse_target_or_weight_derivative(target: bool, weight: bool, prob: bool) -> None:
    """Raises when a derivative is asked with respect to the class weight with class
    indices (a tangent, or a gradient in backward), which torch does not have either, or
    with respect to probability targets or the weight where the op computed its gradient
    in the forward pass (`compute_grad=True`, a direct op call: the logits' log-sum-exp
    is not kept). The public functions refuse a weight that requires grad with class
    indices up front; this catches the rest (torch.func transforms under torch.compile,
    direct op calls)."""
    if not (target or weight):
        return
    if not prob:
        raise RuntimeError(
            "fused_nll: derivatives with respect to the class weight are not supported with "
            "class-index targets (nor by torch's nll_loss); pass weight.detach() (no "
            "tangent, no requires_grad).")
    raise RuntimeError(
        "fused_nll: derivatives with respect to the probability targets or the class weight "
        "of an op called with compute_grad=True are not supported: that call keeps its "
        "gradient, not the log-sum-exp they need. Call it with compute_grad=False, or use "
        "fused_nll.cross_entropy, which differentiates them.")


class WeightWithoutDerivative(torch.autograd.Function):
    """The class weight as it is (a copy of C values), refusing a derivative with
    respect to it, in backward and jvp: for the public functions' torch-ops path
    (functional._second_order_loss) with class indices, where torch's nll_loss has
    no reverse-mode derivative for the weight and a forward-mode one of 0 (which the
    fused path refuses too, `refuse_target_or_weight_derivative`). Recorded only where
    the weight is being differentiated (functorch decides), so free otherwise."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight):
        return weight.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        refuse_target_or_weight_derivative(False, True, prob=False)

    @staticmethod
    def jvp(ctx, tangent):
        refuse_target_or_weight_derivative(False, True, prob=False)


def _prob_terms(input, target, weight, lse, args):
    """What the derivatives of the probability-target loss with respect to the targets
    and the class weight need (torch's formula, docs/ops.md): (lp, y', w, smoothing,
    reduction, rows). lp = input - lse: log_softmax from the saved log-sum-exp, in its
    accumulation dtype (a float32 copy of half-precision logits, as torch's own
    log_softmax output). y': a function giving (1 - eps) y + eps/C, built only when
    called. w: the weight shaped to broadcast over the classes' dimension, or None.
    rows: the number of rows (a mean's divisor)."""
    label_smoothing, reduction = args
    acc = lse.dtype
    per_class = [input.shape[1]] + [1] * (input.dim() - 2) if input.dim() > 1 else [-1]
    classes = per_class[0] if input.dim() > 1 else input.shape[0]
    lp = input.to(acc) - (lse.unsqueeze(1) if input.dim() > 1 else lse)

    def smoothed_targets():  # (only the weight's terms need them)
        return target.to(acc) * (1.0 - label_smoothing) + label_smoothing / max(classes, 1)

    w = None if weight is None else weight.to(acc).reshape(per_class)
    return lp, smoothed_targets, w, label_smoothing, reduction, lse.numel()


def _upstream_per_row(grad, reduction: int, rows: int, input: torch.Tensor):
    """The loss's upstream gradient (or tangent) as each row sees it, to broadcast over
    the classes: per row for "none", a mean's divided by the row count (torch's
    probability-target mean)."""
    if reduction == _NONE:
        return grad.unsqueeze(1) if input.dim() > 1 else grad
    return grad / rows if reduction == _MEAN and rows else grad


def prob_target_weight_grads(grad_loss, input, target, weight, lse, args, need_target: bool,
                             need_weight: bool):
    """Gradients of the probability-target loss with respect to the targets and the
    class weight (None where not needed), torch's: dL/dy_c = -(1 - eps) w_c lp_c g_r and
    dL/dw_c = -sum_r y'_rc lp_rc g_r (g_r: the row's upstream gradient). Torch ops, in
    the accumulation dtype; only when one of them is asked for (a target or weight that
    requires grad), so the fused path keeps its single pass otherwise. `args`:
    (label_smoothing, reduction)."""
    lp, y, w, smoothing, reduction, rows = _prob_terms(input, target, weight, lse, args)
    g = _upstream_per_row(grad_loss.to(lp.dtype), reduction, rows, input)
    grad_target = grad_weight = None
    if need_weight and weight is not None:
        dims = [d for d in range(lp.dim()) if d != (1 if input.dim() > 1 else 0)]
        terms = y() * lp * g  # (out of place: y may be unbatched under vmap)
        grad_weight = -(terms.sum(dims) if dims else terms)
        grad_weight = grad_weight.to(weight.dtype)
    if need_target:  # (out of place: in place fails under vmap with a batched g)
        coef = g * -(1.0 - smoothing)
        grad_target = (lp * (coef if w is None else w * coef)).to(target.dtype)
    return grad_target, grad_weight


def grads_from_lse(bwd_op, prob: bool, grad_loss, input, target, weight, lse, args,
                   need_input: bool, need_target: bool, need_weight: bool):
    """(logits', targets', weight's gradient), None where not needed, from the saved
    lse: the backward op for the logits, `prob_target_weight_grads` for the others
    (probability targets only; the callers refuse the weight's with class indices).
    Shared by the ops' autograd (_ops) and `FuncLoss`; first order only: no_grad."""
    grad = grad_target = grad_weight = None
    with torch.no_grad():
        if need_input:
            grad = bwd_op(grad_loss, input, target, weight, lse, *args)
        if prob and (need_target or need_weight):
            grad_target, grad_weight = prob_target_weight_grads(
                grad_loss, input, target, weight, lse, args, need_target, need_weight)
    return grad, grad_target, grad_weight


_DIFFERENTIATED_GRADIENT = (
    "fused_nll: a gradient of the fused loss is being differentiated (a second-order "
    "derivative: torch.autograd.grad(..., create_graph=True) inside torch.func.grad, "
    "vjp or jacrev, differentiated by that same transform): that gradient comes from a "
    "fused kernel that has no derivative of its own. Use torch.func's transforms for "
    "both derivatives (torch.func.hessian, grad(grad(f)), jvp(grad(f)): fused_nll sees "
    "those at the forward and computes them with torch's ops), or "
    "torch.nn.functional.cross_entropy for this loss.")


def _under_vmap() -> bool:
    """Whether the innermost live torch.func transform is a vmap (a backward run batched:
    jacrev's, or vmap's generated rule), where DelayedError cannot alias a tensor."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._functorch.pyfunctorch import TransformType, retrieve_current_functorch_interpreter

    return retrieve_current_functorch_interpreter().key() == TransformType.Vmap


def first_order_only(grads, *recorded):
    """`grads` (FuncLoss's backward's, None where not needed) as tensors whose own
    derivative raises, where grad mode is on in that backward and one of `recorded`
    (the saved logits, targets, weight) requires grad: there a gradient from the kernels
    would otherwise be a constant, and a derivative of it silently 0. That is every
    torch.func.grad / vjp / jacrev (torch.func differentiates with create_graph=True),
    among which a user's torch.autograd.grad(..., create_graph=True) inside one
    transform cannot be told apart at the forward or in backward. torch's own
    once_differentiable mechanism (an alias of each gradient behind a DelayedError
    node, recorded at that level): no copy, one small C++ node. Not for a backward run
    batched by vmap, where that node cannot alias: jacrev's final backward (which
    differentiates nothing further), and a user's create_graph backward under a vmap
    inside the transform (that gap remains). (Plain autograd around a torch.func
    derivative does not record it: `refuse_second_order` warns there.)"""
    anchor = next((t for t in recorded if t is not None and t.requires_grad), None)
    present = [g for g in grads if g is not None]
    if not torch.is_grad_enabled() or anchor is None or not present or _under_vmap():
        return grads
    # (a tensor that requires grad as an input makes the node record; requires_grad_()
    # is refused inside torch.func transforms)
    err = torch._C._functions.DelayedError(_DIFFERENTIATED_GRADIENT.encode(), len(present) + 1)
    it = iter(err(*present, anchor)[:-1])
    return tuple(None if g is None else next(it) for g in grads)


def _prob_target_weight_tangent(input, target, weight, lse, args, target_t, weight_t):
    """The loss's tangent from the probability targets' and the weight's tangents (the
    contraction of prob_target_weight_grads with them), per row or reduced, in the
    accumulation dtype; None when neither has a tangent."""
    if target_t is None and weight_t is None:
        return None
    lp, y, w, smoothing, reduction, rows = _prob_terms(input, target, weight, lse, args)
    terms = []
    if target_t is not None:
        dy = target_t.to(lp.dtype) * (1.0 - smoothing)
        terms.append(dy if w is None else dy * w)
    if weight_t is not None:
        terms.append(y() * weight_t.to(lp.dtype).reshape(w.shape))
    per_row = -(sum(terms) * lp).sum(1 if input.dim() > 1 else 0)
    if reduction == _NONE:
        return per_row
    total = per_row.sum()
    return total / rows if reduction == _MEAN and rows else total


def loss_jvp(bwd_op, prob: bool, args, precomputed: bool, loss_dtype, saved, input_t,
             target_t, weight_t):
    """The forward op's jvp (its loss's tangent; _ops._register_op_autograd): the
    gradient of the loss (upstream 1) contracted with the logits' tangent, over the
    classes of each row (reduction none) or over everything (mean, sum). `saved`:
    (input, target, weight, lse), or (grad, target, weight) when the op computed
    its gradient."""
    refuse_second_order("jvp", saved[0], saved[1:3] if prob else saved[2:3])
    if not prob or precomputed:  # (torch has no weight derivative with class indices)
        refuse_target_or_weight_derivative(target_t is not None, weight_t is not None,
                                           prob=prob)
    extra = None
    if prob and not precomputed:
        with torch.no_grad():
            extra = _prob_target_weight_tangent(*saved, args, target_t, weight_t)
    if input_t is None:
        return None if extra is None else extra.to(loss_dtype)
    reduction = args[-1] if prob else args[-2]
    with torch.no_grad():
        if precomputed:
            grad, target, weight = saved
            acc = _acc(grad.dtype)
            grad = grad.to(acc)
        else:
            # the gradient at the same (rounded) logits, in the accumulation dtype: a
            # half-precision gradient would round each term of the contraction (a copy
            # of the logits in fp32; jvp is not a training path)
            input, target, weight, lse = saved
            acc = lse.dtype
            upstream = (torch.ones_like(lse) if reduction == _NONE
                        else torch.ones((), dtype=acc, device=lse.device))
            grad = bwd_op(upstream, input.to(acc), target, weight, lse, *args)
    prod = grad * input_t.to(acc)
    if reduction != _NONE:
        tangent = prod.sum()
    else:
        tangent = prod.sum(0 if prod.dim() == 1 else 1)
    if reduction == _MEAN and not prob:
        # a mean over no row (or zero total weight) is nan, and so is its derivative,
        # as torch's (for probability targets torch's nan is a constant)
        den, _ = _denominator(_MEAN, False, target, weight, args[0], 1, target.numel(), acc)
        tangent = torch.where(den.reshape(()) == 0, float("nan"), tangent)
    if extra is not None:
        tangent = tangent + extra
    return tangent.to(loss_dtype)


def _family(triton: bool):
    """The op family (fused_nll._ops.CPP or the Triton one); a bool crosses
    torch.compile's tracing of an autograd.Function, a namespace object does not."""
    from . import _ops

    return _ops.triton_family() if triton else _ops.CPP


class FuncLoss(torch.autograd.Function):
    """The public functions' path inside torch.func transforms (see the module
    docstring). Inputs: (triton, prob, loss_dtype, input, target, weight, *args),
    args = the forward op's arguments after `weight`, without compute_grad.
    Returns (loss, lse); the public functions drop the lse (its gradient is ignored)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(triton, prob, loss_dtype, input, target, weight, *args):
        family = _family(triton)
        fwd = family.prob_fwd if prob else family.fwd
        loss, lse, _ = fwd(input, target, weight, *args, False, loss_dtype=loss_dtype)
        return loss, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        triton, prob, _, input, target, weight, *args = inputs
        family = _family(triton)
        ctx.bwd, ctx.args, ctx.prob = (family.prob_bwd if prob else family.bwd), args, prob
        # no zeros for the inputs without a tangent (jvp tells a probability target's or
        # the weight's real tangent from none), nor for an unused loss in backward
        ctx.set_materialize_grads(False)
        ctx.loss_dtype = output[0].dtype
        # the same tensors for both: vmap's generated rule keeps one record of them
        saved = (input, target, weight, output[1], output[0])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse):
        input, target, weight, lse, _ = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * (6 + len(ctx.args))
        need_input, need_target, need_weight = ctx.needs_input_grad[3:6]
        refuse_second_order("grad", input, (target, weight) if ctx.prob else (weight,),
                            input_grad=need_input)
        if not ctx.prob:  # (an integer target has no gradient)
            refuse_target_or_weight_derivative(False, need_weight, prob=False)
        grads = grads_from_lse(ctx.bwd, ctx.prob, grad_loss, input, target, weight, lse,
                               ctx.args, need_input, need_target, need_weight)
        grads = first_order_only(grads, input, target, weight)
        return (None, None, None, *grads) + (None,) * len(ctx.args)

    @staticmethod
    def jvp(ctx, _triton, _prob, _loss_dtype, input_t, target_t, weight_t, *_args_t):
        input, target, weight, lse, _ = ctx.saved_tensors
        tangent = loss_jvp(ctx.bwd, ctx.prob, ctx.args, False, ctx.loss_dtype,
                           (input, target, weight, lse), input_t, target_t, weight_t)
        # (zeros for the lse, which is not marked non-differentiable: vmap's generated
        # jvp rule fails on a None tangent, jacfwd(vmap(...)), while plain forward AD
        # wants None for a non-differentiable output; torch 2.13)
        return tangent, torch.zeros_like(lse)

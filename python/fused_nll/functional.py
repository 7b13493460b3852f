"""fused_nll.cross_entropy and fused_nll.nll_loss: drop-ins for F.cross_entropy
and F.nll_loss, computed by one fused op (docs/ops.md)."""
from __future__ import annotations

import functools
import warnings

import torch
import torch.autograd.forward_ad as _fwad

from . import _backend, _debug, _func, _ops, _validate


def _in_torch_func() -> bool:
    """Inside a torch.func transform (vmap, grad, jvp, ...), eager."""
    return not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _forward_ad(*tensors) -> bool:
    """Whether a tensor carries a forward-mode tangent (torch.autograd.forward_ad dual
    tensors, as torch.func.linearize makes), eager: the ops' torch.library autograd has
    no forward derivative, so such calls take _func.FuncLoss, which has one."""
    if torch.compiler.is_compiling() or _fwad._current_level < 0:
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # (torch.func's: _in_torch_func;
    return any(t is not None and not wrapped(t)                # unpack_dual has no vmap rule)
               and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def _checks_on() -> tuple[bool, bool]:
    """(debug, shadow verify), both eager only and outside torch.func transforms
    (they read tensor values)."""
    if torch.compiler.is_compiling() or _in_torch_func():
        return False, False
    return _backend.debug_enabled(), _debug.verify_enabled()


def _host_targets(input: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether to check CPU class indices in Python before dispatch (eager only).

    The C++ CPU kernel checks them itself in its pass over the targets and raises
    torch's IndexError with the position (also for direct op calls and under
    torch.compile), so on a CPU-only build of torch nothing is checked here: the
    Python check would cost five tensor ops, ~25% of the loss at 65536 x 21.
    It stays for CPU tensors on the Triton interpreter (whose kernels, like the
    GPU ones, give a nan row) and on GPU builds of torch or of the extension,
    where an IndexError thrown inside the C++ kernel once crashed the process
    (README, Known issues). Not for targets batched by torch.vmap, nor under forward
    AD (their values cannot be read there)."""
    if input.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if wrapped(target) or wrapped(input) or _forward_ad(input):
        return False  # (nor under forward AD: torch.func.linearize traces with make_fx)
    return (_backend.select(input.device) != "cpp" or torch.version.cuda is not None
            or torch.version.hip is not None or _backend.cuda_cpp_built())


_HALF = (torch.float16, torch.bfloat16)


def _loss_dtype(prob: bool, input, target, weight) -> torch.dtype | None:
    """The loss dtype torch's function returns, when it is not the op's default (then
    None): under torch.autocast (for the input's device type) cross_entropy and
    nll_loss are "fp32" ops, computed on fp32 copies of fp16/bf16 inputs, so their
    loss is float32; the kernels read the half-precision logits as they are and
    accumulate in fp32 anyway, so only the loss's final rounding changes (no copy).
    With probability targets torch's loss also promotes with the weight's dtype."""
    dtypes = [input.dtype]
    if prob:
        dtypes += [target.dtype] + ([weight.dtype] if weight is not None else [])
    # (only CPU and CUDA run here; autocast itself rejects other device types)
    if input.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(input.device.type):
        dtypes = [torch.float32 if d in _HALF else d for d in dtypes]
    out = functools.reduce(torch.promote_types, dtypes)
    # (= torch.result_type(input, target): both floating, same shape; that function
    # does not trace under torch.compile)
    default = torch.promote_types(input.dtype, target.dtype) if prob else input.dtype
    return None if out == default else out


def _classes_innermost(prob: bool, inplace: bool, input: torch.Tensor, target: torch.Tensor):
    """K-dim logits (N, C, d1, ..., dk) whose classes are innermost in memory
    (channels-last (N, C, H, W), or a (B, V, T) view of (B, T, V) LM logits), as the
    (R, C) view of the same memory, R = N*d1*...*dk rows (no copy). The kernels then
    read each row's classes contiguously, and the contiguous (R, C) gradient reaches
    the caller through the inverse view, i.e. in the input's own layout: a
    channels-last leaf's .grad then needs no layout copy by autograd (torch's own CPU
    gradient is contiguous there and pays it), and the (B, T, V) logits under a
    (B, V, T) view get a contiguous gradient rather than a class-strided one.
    Returns the (input, target) to run instead, or None. Index targets stay as they
    are (the ops take R class indices in any shape, and report an out-of-range one at
    its position in that shape); probability targets take the same view when their
    classes are innermost too (otherwise the kernels read both layouts as they are,
    rather than copy the targets)."""
    if input.dim() <= 2 or inplace or input.numel() == 0:
        return None
    rows = input.movedim(1, -1)
    if not rows.is_contiguous():
        return None
    classes = input.shape[1]
    if not prob:
        return rows.reshape(-1, classes), target
    y = target.movedim(1, -1)
    if not y.is_contiguous():
        return None
    return rows.reshape(-1, classes), y.reshape(-1, classes)


def _run(prob: bool, inplace: bool, loss_dtype, input, target, weight, *args) -> torch.Tensor:
    """Calls the forward op of the backend chosen for the input's device.

    loss_dtype: the op's loss_dtype (_loss_dtype). args: the op's arguments after
    `weight`, without `compute_grad`.
    Eager, when a gradient will be needed and the loss is reduced to a scalar,
    the gradient is written in the same pass over the logits (FusedLoss): read
    the logits once, write the gradient once. Otherwise backward recomputes it
    from the saved log-sum-exp (the op's own autograd): for reduction="none",
    and under torch.compile, where Inductor copies a saved tensor before
    backward may scale it in place (it cannot prove no second backward reads
    it), so the precomputed gradient would cost 4 passes over N x C elements
    against 3 for the recompute (2048 x 32000 fp32 on CPU: 208 vs 137 ms).
    `inplace` (inplace_backward=True, checked by _validate.inplace_backward)
    always writes the gradient in the forward pass, over the logits, for every
    reduction: that is its point (no gradient-sized buffer).
    """
    if _in_torch_func() or _forward_ad(input, target, weight):
        # (inplace is refused in torch.func: _validate.inplace_backward; the backend by
        # device only: a batched tensor has no strides to read)
        triton = _backend.select(input.device) == "triton"
        _func.refuse_reverse_mode_through_vmap(input, target, weight)
        return _func.FuncLoss.apply(triton, prob, loss_dtype, input, target, weight, *args)[0]
    reduction = args[-1] if prob else args[-2]
    view = _classes_innermost(prob, inplace, input, target)
    if view is not None:
        loss = _run(prob, inplace, loss_dtype, *view, weight, *args)
        return loss.reshape(_ops.rows_shape(input)) if reduction == 0 else loss
    triton = _backend.select(input.device, input) == "triton"
    # probability targets or a weight that require grad: their gradients need the
    # logits and the lse in backward, which only the op's own autograd keeps
    others_need_grad = (target.requires_grad or weight is not None and weight.requires_grad)
    precompute = (reduction != 0 and input.requires_grad and torch.is_grad_enabled()
                  and not torch.compiler.is_compiling() and not others_need_grad)
    if inplace or precompute:
        return _ops.FusedLoss.apply(triton, prob, inplace, loss_dtype, input, target, weight,
                                    *args)
    family = _ops.triton_family() if triton else _ops.CPP
    if _ops.eager_direct(input, target, weight) and not (
            torch.is_grad_enabled() and (input.requires_grad or others_need_grad)):
        family = family.direct  # no autograd to record: straight to the kernels
    fwd = family.prob_fwd if prob else family.fwd
    return fwd(input, target, weight, *args, False, loss_dtype=loss_dtype)[0]


def _second_order_loss(prob: bool, log_probs: bool, loss_dtype, input, target, weight,
                       ignore_index: int, reduction: str, label_smoothing: float):
    """The loss computed with torch's own ops, for a call that will be differentiated
    twice (`_func.second_order_ahead`: hessian, jvp(grad(f)), ...), where the fused
    kernels cannot serve: their gradient has no derivative of its own. torch's
    function on the logits in the accumulation dtype (fp32, fp64 for fp64), as the
    kernels accumulate, with the result in fused_nll's (and torch's) loss dtype; class
    indices per row (reduction="none"), then summed, and a mean divided by torch's
    divisor here (one code path for every backend): so the loss and its derivatives of
    every order are torch's, the log-probabilities are materialised as torch does (an
    fp32 copy for fp16/bf16 logits). A derivative
    with respect to the weight with class indices raises, as on the fused path. A class
    index out of range gives a nan row (loss and derivatives) and the other rows as if
    it were ignored, as the Triton and CUDA kernels do, never a device-side assert; on
    the C++ CPU kernels' backend torch raises its error (IndexError; RuntimeError
    under vmap), as those kernels raise."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    out = loss_dtype or (torch.promote_types(input.dtype, target.dtype) if prob else input.dtype)
    fn = torch.nn.functional.nll_loss if log_probs else torch.nn.functional.cross_entropy
    kw = {} if log_probs else {"label_smoothing": label_smoothing}
    input = input.to(acc)
    if prob:
        w = None if weight is None else weight.to(acc)
        return fn(input, target.to(acc), w, reduction=reduction, **kw).to(out)
    w = None if weight is None else _func.WeightWithoutDerivative.apply(weight.to(acc))
    target = target.long()
    counted = target != ignore_index
    if _backend.select(input.device) != "cpp":
        # an out-of-range row: class 0 of logits times nan (a product: a where would give
        # it 0 derivatives), not counted in a mean's divisor
        classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        bad = ((target < 0) | (target >= classes)) & counted
        target, counted = torch.where(bad, 0, target), counted & ~bad
        input = input * torch.where(bad.unsqueeze(1) if input.dim() > 1 else bad,
                                    float("nan"), 1.0).to(acc)
    loss = fn(input, target, w, ignore_index=ignore_index, reduction="none", **kw)
    if reduction == "none":
        return loss.to(out)
    if reduction == "mean":  # (torch's divisor: the weights of the counted rows)
        den = (counted.to(acc) if w is None
               else torch.where(counted, w.detach()[target * counted], 0.0))
        return (loss.sum() / den.sum()).to(out)
    return loss.sum().to(out)


def _legacy_reduction(size_average, reduce, reduction: str, stacklevel: int = 3) -> str:
    """torch's deprecated size_average / reduce arguments: torch's mapping
    (torch.nn._reduction.legacy_get_string) and warning, written out so that Dynamo
    traces it (it took torch's function for an op returning a str, a graph break),
    and warning eagerly only (warnings.warn breaks the graph too). stacklevel: the
    user's call, as seen from here."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    legacy = "mean" if size_average and reduce else "sum" if reduce else "none"
    if not torch.compiler.is_compiling():
        warnings.warn("size_average and reduce args will be deprecated, please use "
                      f"reduction='{legacy}' instead.", stacklevel=stacklevel)
    return legacy


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Cross-entropy between logits and targets; equals ``F.cross_entropy`` with
    the same arguments, i.e. ``F.nll_loss(F.log_softmax(input, 1), target, ...)``,
    without materialising the log-probabilities.

    Args:
        input: logits, shape ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``;
            fp32, fp64, bf16 or fp16; any strides.
        target: class indices of shape ``()``, ``(N,)`` or ``(N, d1, ..., dk)``
            (any integer dtype), or class probabilities of the input's shape
            (floating).
        weight: optional per-class weights, shape ``(C,)``, any floating dtype.
        ignore_index: class index whose rows are skipped (index targets only;
            any integer, also a valid class).
        size_average, reduce: torch's deprecated arguments (they set reduction).
        reduction: ``"none"`` (shape of the rows), ``"mean"`` or ``"sum"`` (0-d).
        label_smoothing: in ``[0, 1]``, torch's formula.
        inplace_backward: when a gradient will be needed, write it into
            ``input``'s storage during the forward pass instead of a new
            ``(N, C)`` buffer: zero extra memory, but ``input`` holds the
            gradient, not the logits, from then on (docs/inplace_backward.md).
            ``input`` must be contiguous and not a leaf (e.g. the output of the
            LM head); read anything you need from the logits before this call.
            No effect when no gradient is needed.

    Returns:
        The loss, in torch's dtype: the input's (probability targets: promoted with
        the target's and the weight's), float32 for fp16/bf16 under
        ``torch.autocast``. Accumulated in fp32 (fp64 for fp64).
    """
    _validate.check_input(input, "cross_entropy", target)
    reduction = _legacy_reduction(size_average, reduce, reduction)
    red = _validate.reduction_code(reduction)
    ignore_index = _validate.check_ignore_index(ignore_index, "cross_entropy")
    kind = _validate.target_kind(input, target, "cross_entropy")
    _validate.check_same_device(input, target, "target", "cross_entropy")
    ls = _validate.check_label_smoothing(label_smoothing)
    w = _validate.weight(weight, input, "cross_entropy", prob=kind == "prob")
    inplace = _validate.inplace_backward(inplace_backward, input, "cross_entropy")
    debug, verify = _checks_on()
    ref_input = input.detach().clone() if verify and inplace else input
    if kind == "prob":
        if ignore_index >= 0:
            raise RuntimeError(
                f"ignore_index is not supported for floating point target: fused_nll.cross_entropy "
                f"got probability targets with ignore_index={ignore_index}. Drop ignore_index "
                "(or pass class indices), or zero the rows' probabilities instead."
            )
        named = [n for n, t in (("target", target), ("weight", weight))
                 if t is not None and t.requires_grad]
        if inplace and torch.is_grad_enabled() and named:
            what = " and ".join(named)
            raise RuntimeError(
                f"fused_nll.cross_entropy: inplace_backward=True with a {what} that require"
                f"{'' if len(named) > 1 else 's'} grad: their gradient needs the logits, which "
                "the in-place pass overwrites with their own gradient. Drop inplace_backward, "
                f"or pass {' and '.join(n + '.detach()' for n in named)}."
            )
        loss_dtype = _loss_dtype(True, input, target, weight)
        if _func.second_order_ahead(input, (target, weight)):
            loss = _second_order_loss(True, False, loss_dtype, input, target, weight, -100,
                                      reduction, ls)
        else:
            loss = _run(True, inplace, loss_dtype, input, target, w, ls, red)
    else:
        target = _validate.single_index(input, target)
        if debug or _host_targets(input, target):
            _debug.check_targets(input, target, ignore_index, "cross_entropy")
        loss_dtype = _loss_dtype(False, input, target, weight)
        if _func.second_order_ahead(input):
            loss = _second_order_loss(False, False, loss_dtype, input, target, weight,
                                      ignore_index, reduction, ls)
        else:
            loss = _run(False, inplace, loss_dtype, input, _validate.index_target(target), w,
                        ignore_index, ls, red, False)
    if verify:
        _debug.shadow_verify("cross_entropy", loss, ref_input, target, weight, ignore_index,
                             reduction, ls)
    return loss


def nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    *,
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Negative log-likelihood of log-probabilities; equals ``F.nll_loss``.

    Args:
        input: log-probabilities (e.g. ``F.log_softmax(logits, 1)``), shape
            ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``. For raw logits use
            :func:`cross_entropy`, which is faster and exact.
        target: class indices of shape ``()``, ``(N,)`` or ``(N, d1, ..., dk)``.
        weight, size_average, ignore_index, reduce, reduction, inplace_backward: as
            :func:`cross_entropy`.
    """
    _validate.check_input(input, "nll_loss", target)
    reduction = _legacy_reduction(size_average, reduce, reduction)
    red = _validate.reduction_code(reduction)
    ignore_index = _validate.check_ignore_index(ignore_index, "nll_loss")
    _validate.target_kind(input, target, "nll_loss")
    target = _validate.single_index(input, target)
    _validate.check_same_device(input, target, "target", "nll_loss")
    w = _validate.weight(weight, input, "nll_loss")
    inplace = _validate.inplace_backward(inplace_backward, input, "nll_loss")
    debug, verify = _checks_on()
    ref_input = input.detach().clone() if verify and inplace else input
    if debug or _host_targets(input, target):
        _debug.check_targets(input, target, ignore_index, "nll_loss")
    if debug:
        _debug.check_log_probs(input, target, ignore_index)
    loss_dtype = _loss_dtype(False, input, target, weight)
    if _func.second_order_ahead(input):
        loss = _second_order_loss(False, True, loss_dtype, input, target, weight,
                                  ignore_index, reduction, 0.0)
    else:
        loss = _run(False, inplace, loss_dtype, input, _validate.index_target(target), w,
                    ignore_index, 0.0, red, True)
    if verify:
        _debug.shadow_verify("nll_loss", loss, ref_input, target, weight, ignore_index, reduction)
    return loss

"""Fake kernels and autograd for the fused_nll ops (schemas: csrc/schemas.h, docs/ops.md).

Autograd: when the forward op was asked for the gradient (`compute_grad`), only
that gradient is saved and backward scales it by the upstream gradient (in
place, through `FusedLoss`, on the public API's path). Otherwise backward
recomputes the gradient from the saved log-sum-exp.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

import torch
import torch.autograd.forward_ad as _fwad
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction


def build_info():
    """What setup.py recorded when it built fused_nll._C (fused_nll/_build_info.py), or
    None for a build from before it did."""
    try:
        return importlib.import_module(f"{__package__}._build_info")
    except ImportError:
        return None


def other_torch_build() -> str | None:
    """The torch version fused_nll._C was built against, when it is not this torch's."""
    info = build_info()
    return None if info is None or info.TORCH_VERSION == torch.__version__ else info.TORCH_VERSION


def library_path() -> str | None:
    """The compiled op library (fused_nll._C: schemas, C++ CPU and CUDA kernels), or None
    when it is not built. A plain shared library, so a C++ program can dlopen it too."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    return None if spec is None else spec.origin


def _load_failure(exc: Exception | None) -> str:
    """What to tell a user whose compiled extension does not load."""
    info, other = build_info(), other_torch_build()
    if exc is None:
        what, why = "was not found", "it is not built"
    else:
        what = f"failed to load ({exc})"
        if info is None:
            why = "it may not be built"
        elif other is not None:
            why = f"it was built against torch {other}, and this is torch {torch.__version__}"
        else:
            why = f"it was built against this torch ({info.TORCH_VERSION})"
    return (f"fused_nll's compiled extension (fused_nll._C) {what}: {why}. "
            "Rebuild it against the installed torch, from fused_nll's source directory: "
            "pip install --no-build-isolation --no-deps --force-reinstall .")


def _load_library() -> None:
    """Loads the op library once (its static registrations define the ops)."""
    path = library_path()
    if path is None:
        raise ImportError(_load_failure(None))
    try:
        torch.ops.load_library(path)  # a no-op when this path is loaded already
    except OSError as exc:
        raise ImportError(_load_failure(exc)) from exc


_load_library()
ops = torch.ops.fused_nll


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 input, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_shape(input: torch.Tensor) -> list:
    """Shape of the per-row outputs: () for (C,), (N,) for (N, C), (N, d1..dk) for K-dim."""
    return [] if input.dim() == 1 else [input.shape[0], *input.shape[2:]]


# ---------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only), for torch.compile / export / opcheck.
# ---------------------------------------------------------------------------


def _fwd_outputs(input, out_dtype, reduction, compute_grad):
    rows = rows_shape(input)
    loss = input.new_empty(rows if reduction == 0 else [], dtype=out_dtype)
    lse = input.new_empty(rows, dtype=acc_dtype(input.dtype))
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty([0])
    return loss, lse, grad


@torch.library.register_fake("fused_nll::cross_entropy_fwd")
def _(input, target, weight, ignore_index, label_smoothing, reduction, log_probs, compute_grad,
      loss_dtype=None):
    return _fwd_outputs(input, loss_dtype or input.dtype, reduction, compute_grad)


@torch.library.register_fake("fused_nll::cross_entropy_prob_fwd")
def _(input, target, weight, label_smoothing, reduction, compute_grad, loss_dtype=None):
    return _fwd_outputs(input, loss_dtype or torch.result_type(input, target), reduction,
                        compute_grad)


@torch.library.register_fake("fused_nll::cross_entropy_bwd")
def _(grad_loss, input, target, weight, lse, ignore_index, label_smoothing, reduction, log_probs):
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_nll::cross_entropy_prob_bwd")
def _(grad_loss, input, target, weight, lse, label_smoothing, reduction):
    return input.new_empty(input.shape)


@torch.library.register_fake("fused_nll::cross_entropy_fwd_inplace")
def _(input, target, weight, ignore_index, label_smoothing, reduction, log_probs,
      loss_dtype=None):
    return _fwd_outputs(input, loss_dtype or input.dtype, reduction, False)[:2]


@torch.library.register_fake("fused_nll::cross_entropy_prob_fwd_inplace")
def _(input, target, weight, label_smoothing, reduction, loss_dtype=None):
    return _fwd_outputs(input, loss_dtype or torch.result_type(input, target), reduction,
                        False)[:2]


@torch.library.register_fake("fused_nll::scale_grad_")
def _(grad_input, grad_loss):
    return None


# The in-place ops overwrite their first argument: bump its version counter (as
# torch's own in-place ops do), so that autograd raises instead of silently
# using the overwritten logits if anything else saved them for backward. The
# C++ schema alone does not do this; torch.library.custom_op/triton_op does it
# the same way for the Triton family.
_IMPL = torch.library.Library("fused_nll", "IMPL")


def _bump_input_version(name: str) -> None:
    op = getattr(ops, name).default

    def kernel(keyset, input, *args):
        torch.autograd.graph.increment_version(input)
        return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, input, *args)

    _IMPL.impl(name, kernel, "ADInplaceOrView", with_keyset=True)


_bump_input_version("cross_entropy_fwd_inplace")
_bump_input_version("cross_entropy_prob_fwd_inplace")
_bump_input_version("scale_grad_")  # FusedLoss calls it below ADInplaceOrView: no bump there


# ---------------------------------------------------------------------------
# Autograd of the ops themselves, shared by the C++ and the Triton family.
# ---------------------------------------------------------------------------


def _times_upstream(grad, grad_loss):
    """grad * grad_loss, grad_loss 0-d or per row (broadcast over classes)."""
    return grad * (grad_loss if grad_loss.dim() == 0 else grad_loss.unsqueeze(1))


def refuse_double_backward():
    """Raises under create_graph=True (grad mode on inside backward). The
    gradient comes from a fused kernel (written in the forward pass, or
    recomputed from the saved log-sum-exp by a backward op that has no
    derivative itself), so every second-order term through the loss would be
    silently 0 or an obscure autograd error: gradient penalties, MAML,
    Hessian-vector products need torch's own cross_entropy (or torch.func's
    transforms, which the public functions see at the forward:
    _func.second_order_ahead). (Compiled, AOTAutograd traces backward with grad mode
    on; it refuses a double backward through a compiled graph itself.)"""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "fused_nll: double backward (create_graph=True) through the fused loss is "
            "not supported: its gradient comes from a fused kernel that has no derivative "
            "of its own. Use torch.nn.functional.cross_entropy (or nll_loss) for the loss "
            "whose higher-order gradients you need, or torch.func: its second-order "
            "transforms (torch.func.hessian; jvp(grad(f)) for a Hessian-vector product; "
            "grad(grad(f))) are seen when the loss is computed, which fused_nll then "
            "computes with torch's ops. (torch.autograd.functional.jvp, hvp, vhp and "
            "hessian take a double backward too; for a first-order Jacobian-vector "
            "product use torch.func.jvp, which fused_nll supports.)")


# The keys of the autograd kernels below: the devices fused_nll has kernels for (and
# meta), each named, so that they take precedence over the "Autograd" kernel that
# torch.library.triton_op registers for the Triton family.
_AUTOGRAD_KEYS = ("AutogradCPU", "AutogradCUDA", "AutogradMeta")


def register_autograd(fwd_name, bwd, prob_fwd_name, prob_bwd):
    """Autograd for a family's two forward ops (by name), with the backward ops
    they call. A gradient the forward op computed (compute_grad=True) is one of
    its outputs, which the caller may hold, so it is scaled out of place here;
    the public API avoids that copy with `FusedLoss` below.

    Why not torch.library.register_autograd: the autograd.Function it generates
    has no ``setup_context``, which torch.func requires, so every torch.func transform
    that differentiates (grad, vjp, jacrev, jvp) through the op fails, eagerly and
    under torch.compile (pytorch/pytorch#170834, #179652; open in torch 2.13), and it
    has no jvp. The kernel here applies a single-level autograd.Function instead, as
    functorch does for the autograd nodes of a transform's own level
    (torch._functorch.autograd_function): plain autograd sees the same node, and
    the innermost differentiating torch.func level records the op. That is the
    public functions' path under torch.compile, where Dynamo cannot trace their eager
    torch.func path (`_func.FuncLoss`, recorded at every level); a transform that
    needs more than that level raises (`_func.refuse_unrecorded_levels`)."""
    # n_args: the op's arguments between weight and compute_grad
    _register_op_autograd(fwd_name, bwd, n_args=4)  # ignore_index, smoothing, reduction, log_probs
    _register_op_autograd(prob_fwd_name, prob_bwd, n_args=2)  # label_smoothing, reduction


def _register_op_autograd(name: str, bwd_op, n_args: int) -> None:
    """The autograd kernel of one forward op: backward recomputes the gradient from
    the saved lse with `bwd_op` (or scales the one the op computed), jvp contracts
    that gradient with the logits' tangent (`_func.loss_jvp`), and both raise when
    they are themselves differentiated (`_func.refuse_second_order`)."""
    op = getattr(ops, name.split("::")[1]).default
    prob = n_args == 2

    class OpAutograd(_SingleLevelFunction):
        @staticmethod
        def forward(ctx, input, target, weight, *rest):  # rest: args, compute_grad, loss_dtype
            _func.refuse_unrecorded_levels(input, target, weight)
            with torch._C._AutoDispatchBelowAutograd():
                loss, lse, grad = op(input, target, weight, *rest)
            ctx.args, ctx.precomputed, ctx.loss_dtype = rest[:n_args], rest[n_args], loss.dtype
            ctx.mark_non_differentiable(lse, grad)
            # no zeros for an unused loss gradient, nor for the inputs without a tangent
            ctx.set_materialize_grads(False)
            if ctx.precomputed:  # (target, weight: for refuse_second_order)
                ctx.save_for_backward(grad, target, weight)
                ctx.save_for_forward(grad, target, weight)
            else:
                ctx.save_for_backward(input, target, weight, lse)
                ctx.save_for_forward(input, target, weight, lse)
            return loss, lse, grad

        @staticmethod
        def backward(ctx, grad_loss, _lse, _grad):
            none = (None,) * (n_args + 4)  # target, weight, args, compute_grad, loss_dtype
            if grad_loss is None:
                return (None,) + none
            need_input, need_target, need_weight = ctx.needs_input_grad[:3]
            if not prob or ctx.precomputed:
                _func.refuse_target_or_weight_derivative(need_target, need_weight, prob)
            saved = ctx.saved_tensors
            others = saved[1:3]  # (target, weight) on both paths
            _func.refuse_second_order("grad", saved[0], others if prob else others[1:],
                                      input_grad=need_input)
            if ctx.precomputed:  # (the targets' and weight's refused above)
                with torch.no_grad():  # first order only: nothing to record
                    grad = _times_upstream(saved[0], grad_loss).to(saved[0].dtype)
                return (grad,) + none
            grads = _func.grads_from_lse(bwd_op, prob, grad_loss, *saved, ctx.args,
                                         need_input, need_target, need_weight)
            return grads + none[2:]

        @staticmethod
        def jvp(ctx, input_t, target_t, weight_t, *_rest_t):
            tangent = _func.loss_jvp(bwd_op, prob, ctx.args, ctx.precomputed, ctx.loss_dtype,
                                     ctx.saved_for_forward, input_t, target_t, weight_t)
            return tangent, None, None

    OpAutograd.__name__ = OpAutograd.__qualname__ = f"{op._opname}_autograd"

    def kernel(*args):
        # a gradient to record, or possibly a forward-mode tangent (torch.func's
        # transforms, torch.autograd.forward_ad), which requires_grad does not show
        if (torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad
                                            for a in args)
                or torch._C._are_functorch_transforms_active() or _fwad._current_level >= 0):
            with enable_single_level_autograd_function():
                return OpAutograd.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    for key in _AUTOGRAD_KEYS:
        _IMPL.impl(name, kernel, key)


class FusedLoss(torch.autograd.Function):
    """The public API's path when the gradient is written in the forward pass:
    a mean/sum loss that will need a gradient, or any reduction with
    ``inplace_backward=True``. The forward op writes the gradient (for an
    upstream gradient of 1) in the same pass over the logits, into a private
    buffer or, in place, over the logits themselves; backward scales it in
    place (nothing to do for the usual 1.0, decided on the device; per row for
    reduction="none") and hands that very buffer on, with no copy.

    A later backward through the same graph (retain_graph=True, gradcheck)
    must not touch the tensor the first one handed out: it returns a new one,
    rescaled by new/first upstream gradient (one extra rounding; an error if the
    first upstream gradient was 0 somewhere). The second backward also keeps a
    private copy of the first gradient for any further one, since the handed-out
    buffer (a leaf's .grad) is then accumulated into in place. A change to that
    buffer before the second backward (x.grad.zero_(), ...) leaves nothing to
    compute it from: a clear error (`_first_gradient`). Double backward raises,
    as on the log-sum-exp path (`refuse_double_backward`).
    """

    @staticmethod
    def forward(ctx, triton: bool, prob: bool, inplace: bool, loss_dtype, input, target, weight,
                *args):
        ctx.family = triton_family() if triton else CPP
        family = ctx.family.direct if eager_direct(input, target, weight) else ctx.family
        if inplace:
            fwd = family.prob_fwd_inplace if prob else family.fwd_inplace
            loss, _ = fwd(input, target, weight, *args, loss_dtype=loss_dtype)
            grad = input  # now holds the gradient (its version counter was bumped)
        else:
            fwd = family.prob_fwd if prob else family.fwd
            loss, _, grad = fwd(input, target, weight, *args, True, loss_dtype=loss_dtype)
        ctx.first_grad_loss, ctx.n_args, ctx.kept, ctx.inplace = None, len(args), None, inplace
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward()
        none = (None,) * (2 + ctx.n_args)  # target, weight, *args
        if ctx.first_grad_loss is None:
            # detach: in place, the saved tensor is the caller's logits tensor itself (with
            # their grad_fn); the gradient handed on is its storage, not that tensor
            (grad,) = (t.detach() for t in ctx.saved_tensors)
            ctx.first_grad_loss = grad_loss.detach().clone()
            if torch.compiler.is_compiling():
                # Inductor keeps it in place (a reinplaced custom op)
                ctx.family.scale(grad, grad_loss)
            elif eager_direct(grad, grad_loss):
                ctx.family.direct.scale(grad, grad_loss)  # (no version bump either)
            else:
                # Below ADInplaceOrView the in-place scale leaves the version
                # counter alone, so a later backward can still unpack the saved
                # tensor, and no other reference is kept, so autograd can hand
                # this very buffer to .grad instead of copying it.
                with torch._C._AutoDispatchBelowADInplaceOrView():
                    ctx.family.scale(grad, grad_loss)
            return (None, None, None, None, grad) + none
        # A second backward (retain_graph): the only copy was scaled by the first
        # upstream gradient; rescale by new/first. Where the first was 0 the gradient
        # is gone: say so rather than return nan (a host read, on this rare path only).
        grad = _first_gradient(ctx)
        if not torch.compiler.is_compiling() and bool((ctx.first_grad_loss == 0).any()):
            raise RuntimeError(
                "fused_nll: a second backward through this loss (retain_graph=True) after a "
                "first one whose upstream gradient was 0 (for some row) is not supported: "
                "the first backward scaled the only copy of the gradient, which fused_nll "
                "writes during the forward pass. Compute the loss again for the second "
                "backward, or use one backward with the summed upstream gradients.")
        rescaled = _times_upstream(grad, grad_loss / ctx.first_grad_loss).to(grad.dtype)
        return (None, None, None, None, rescaled) + none


def _first_gradient(ctx) -> torch.Tensor:
    """FusedLoss's gradient as the first backward left it, for a later backward: the
    saved buffer the first backward handed out, copied on the second backward (the
    engine then adds this backward's gradient into that buffer, when it is a leaf's
    .grad), and that copy afterwards."""
    if ctx.kept is None:
        try:
            (grad,) = (t.detach() for t in ctx.saved_tensors)
        except RuntimeError as exc:
            if "modified by an inplace operation" not in str(exc):
                raise
            if ctx.inplace:
                raise RuntimeError(
                    "fused_nll: a second backward through this loss (retain_graph=True) found "
                    "the logits modified in place since the first. With inplace_backward=True "
                    "they hold the gradient, which this backward rescales; an in-place change "
                    "to them (another in-place loss over the same logits, logits.mul_(...)) "
                    "leaves nothing to compute it from. Compute the loss again for the second "
                    "backward, or drop inplace_backward."
                ) from exc
            raise RuntimeError(
                "fused_nll: a second backward through this loss (retain_graph=True) found "
                "the gradient of the first one modified in place. fused_nll writes the "
                "gradient during the forward pass and hands that buffer to the first "
                "backward without a copy (for a leaf input it becomes input.grad), so an "
                "in-place change to it before another backward (input.grad.zero_(), "
                "optimizer.zero_grad(set_to_none=False), clip_grad_norm_, or autograd adding "
                "another gradient into it) leaves nothing to compute this one from. Set the "
                "gradients to None between the backwards (zero_grad(), whose default is "
                "set_to_none=True), or compute the loss again for the second backward."
            ) from exc
        ctx.kept = grad.clone()
    return ctx.kept


_TRITON_FAMILY: list = []


def triton_family():
    """The Triton op family (_triton_ops.TRITON), imported on first use."""
    if not _TRITON_FAMILY:
        from ._triton_ops import TRITON

        _TRITON_FAMILY.append(TRITON)
    return _TRITON_FAMILY[0]


# ---------------------------------------------------------------------------
# Eager calls without the dispatcher's Python layers.
# ---------------------------------------------------------------------------

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_direct(*tensors) -> bool:
    """Whether the public functions may call a family's `direct` kernels instead of its
    ops: eager (not compiling, exporting or tracing, torch.jit.trace included), outside
    torch.func transforms and forward AD, with no Python dispatch or function mode active
    (FakeTensorMode, FlopCounterMode, ...), no profiler (which records the ops by name),
    and plain tensors only (no subclass). There the op would only reach the same kernel
    through Python layers: the autograd kernel above, and for a Triton op torch.library's
    custom-op wrappers (about 50 us a call on a 2-core CPU). The callers decide autograd
    themselves (FusedLoss, or no gradient needed)."""
    return (not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active()
            and _fwad._current_level < 0
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._autograd._profiler_enabled()
            and torch._C._get_tracing_state() is None  # (torch.jit.trace records ops)
            and all(t is None or type(t) in _PLAIN for t in tensors))


def _below(op, guard):
    """The C++ op called under a dispatch guard: straight to its kernel."""
    def call(*args, **kwargs):
        with guard():
            return op(*args, **kwargs)
    call.__name__ = call.__qualname__ = f"{op._opname}_direct"
    return call


def _cpp_op_family():
    names = dict(fwd="cross_entropy_fwd", bwd="cross_entropy_bwd",
                 prob_fwd="cross_entropy_prob_fwd", prob_bwd="cross_entropy_prob_bwd",
                 fwd_inplace="cross_entropy_fwd_inplace",
                 prob_fwd_inplace="cross_entropy_prob_fwd_inplace", scale="scale_grad_")
    # below the autograd keys; the in-place forwards' version bump (ADInplaceOrView)
    # still runs, while scale_grad_, whose caller (FusedLoss.backward) must not bump the
    # saved gradient's version, goes below ADInplaceOrView as well
    direct = {k: _below(getattr(ops, n).default, torch._C._AutoDispatchBelowAutograd)
              for k, n in names.items()}
    direct["scale"] = _below(ops.scale_grad_.default,
                             torch._C._AutoDispatchBelowADInplaceOrView)
    return SimpleNamespace(**{k: getattr(ops, n) for k, n in names.items()},
                           direct=SimpleNamespace(**direct))


CPP = _cpp_op_family()
register_autograd("fused_nll::cross_entropy_fwd", CPP.bwd, "fused_nll::cross_entropy_prob_fwd", CPP.prob_bwd)


# Batching rules (torch.vmap) of the four non-mutating ops: fused_nll._func.
from . import _func  # noqa: E402

_func.register_batching_rules("fused_nll::cross_entropy_fwd", "fused_nll::cross_entropy_bwd",
                              "fused_nll::cross_entropy_prob_fwd",
                              "fused_nll::cross_entropy_prob_bwd")

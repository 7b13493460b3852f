"""Argument checks that run before any kernel: metadata only (dtype, shape,
device), so they cost microseconds, never synchronise, and trace cleanly under
torch.compile. Each message names the argument, what was received, what was
expected and how to fix it (docs/errors.md lists them all).

Exception classes follow torch's for the same case, so existing `except`
clauses keep working.
"""
from __future__ import annotations

import operator

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

# Integer target dtypes the kernels read directly; other integer dtypes are
# converted to int64 (a copy of the targets only, never of the logits).
_KERNEL_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class NotFloatingInputError(NotImplementedError):
    """Integer/bool input. NotImplementedError (what torch raises) is a RuntimeError."""


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def reduction_code(reduction: str) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{reduction} is not a valid value for reduction: expected one of "
            "'none', 'mean', 'sum'."
        )
    return REDUCTIONS[reduction]


def check_input(input, fn: str, target=None) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"fused_nll.{fn}: input must be a torch.Tensor, got {type(input).__name__}.")
    if input.dim() == 0:
        raise ValueError(
            f"Expected 1 or more dimensions (got 0): fused_nll.{fn} input is a 0-d tensor; "
            "it must have shape (C,), (N, C) or (N, C, d1, ..., dk)."
        )
    if not input.is_floating_point():
        what = "logits" if fn == "cross_entropy" else "log-probabilities"
        if (isinstance(target, torch.Tensor) and target.is_floating_point()
                and target.dim() == input.dim() + 1 and target.shape[:1] == input.shape[:1]):
            raise NotFloatingInputError(
                f"fused_nll.{fn}: input must be floating point ({what}), got dtype "
                f"{input.dtype}, and the target is floating point ({target.dtype}): the "
                f"arguments look swapped. Fix: fused_nll.{fn}(input, target), the {what} first."
            )
        raise NotFloatingInputError(
            f"fused_nll.{fn}: input must be floating point ({what}), got dtype {input.dtype}. "
            "Convert it, e.g. input.float()."
        )


def check_same_device(input: torch.Tensor, other: torch.Tensor | None, name: str, fn: str) -> None:
    if other is not None and other.device != input.device:
        raise RuntimeError(
            f"fused_nll.{fn}: {name} is on {other.device} but input is on {input.device}; "
            f"move it with {name}.to(input.device)."
        )


def check_ignore_index(ignore_index, fn: str) -> int:
    """An int as torch takes it: a Python or NumPy integer, or a 0-d integer tensor; not a
    float or a bool (torch raises TypeError for those; int() would truncate 1.9 to 1)."""
    if type(ignore_index) is int:
        return ignore_index
    try:
        # (the usual wrong types refused before operator.index, which torch 2.6's Dynamo
        # cannot trace for them: an internal error instead of this message)
        if ignore_index is None or isinstance(ignore_index, (bool, float, complex, str, bytes)):
            raise TypeError
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(
            f"fused_nll.{fn}: argument 'ignore_index' must be int, not "
            f"{type(ignore_index).__name__} ({ignore_index!r}): it is a class index, e.g. "
            "ignore_index=-100 (the default) or the padding label."
        ) from None


def check_label_smoothing(label_smoothing: float) -> float:
    if label_smoothing is None or isinstance(label_smoothing, (str, bytes)):
        raise TypeError(
            f"fused_nll.cross_entropy: argument 'label_smoothing' must be float, not "
            f"{type(label_smoothing).__name__} ({label_smoothing!r}), e.g. label_smoothing=0.1."
        )
    ls = float(label_smoothing)
    if not 0.0 <= ls <= 1.0:
        raise RuntimeError(
            f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}. "
            "(torch silently treats negative values as 0; fused_nll refuses them.)"
        )
    return ls


def class_index_shape(input: torch.Tensor) -> list:
    return [] if input.dim() == 1 else [input.shape[0], *input.shape[2:]]


def target_kind(input: torch.Tensor, target, fn: str) -> str:
    """'index' for class indices, 'prob' for probability targets (cross_entropy
    only); raises a clear error for every other target."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"fused_nll.{fn}: target must be a torch.Tensor, got {type(target).__name__}.")
    index_shape = class_index_shape(input)
    same_as_input = list(target.shape) == list(input.shape)
    argmax = f"target.argmax(dim={0 if input.dim() == 1 else 1})"  # the class dimension
    if target.dtype == torch.bool:
        raise RuntimeError(
            f"fused_nll.{fn}: target has dtype torch.bool, which is a mask, not class indices. "
            f"Pass int64 class indices of shape {index_shape} (e.g. target.long() if it "
            "really holds 0/1 labels of a 2-class problem)."
        )
    if target.is_complex():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got "
            f"{target.dtype}: fused_nll.{fn} takes class indices (an integer dtype) or, for "
            "cross_entropy, real class probabilities. Fix: target.real if the imaginary "
            "part is 0."
        )
    if target.is_floating_point():
        if same_as_input and fn == "cross_entropy":
            return "prob"
        if same_as_input:
            raise RuntimeError(
                f"fused_nll.nll_loss: target of shape {_shape(target)} and dtype {target.dtype} "
                "looks like one-hot or probability targets, but nll_loss expects class indices "
                f"of shape {index_shape}. Fix: {argmax} for class indices, or "
                "fused_nll.cross_entropy(logits, target), which accepts probabilities."
            )
        if list(target.shape) == index_shape or (input.dim() == 1 and list(target.shape) == [1]):
            raise RuntimeError(
                f"fused_nll.{fn}: target holds class indices but has dtype {target.dtype}; "
                "expected an integer dtype (int64). Fix: target.long()."
            )
        _check_index_shape(input, target, fn)  # the shape differs, so this raises
    # Integer targets.
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if input.dim() == 1 and list(target.shape) == [1] and (classes > 1 or fn == "nll_loss"):
        return "index"  # one sample's class index (torch takes shape [1] as well as [])
    if same_as_input and classes == 1 and list(target.shape) != index_shape:
        raise RuntimeError(
            f"fused_nll.{fn}: input {_shape(input)} has a single class (C = 1) and the integer "
            f"target {_shape(target)} has its shape: this looks like 0/1 labels for one logit "
            "per sample. Cross-entropy over one class is always 0 (the log-softmax of one "
            "value is 0), so nothing would be learned. For binary labels use "
            + ("torch.nn.functional.binary_cross_entropy_with_logits(input, target.float()) "
               "(nn.BCEWithLogitsLoss)" if fn == "cross_entropy" else
               "binary_cross_entropy_with_logits on the logits (nn.BCEWithLogitsLoss) rather "
               "than log-probabilities")
            + ", or give the model two output classes and pass "
            f"class indices of shape {index_shape}."
        )
    if same_as_input and input.dim() >= 1 and list(target.shape) != index_shape:
        alt = (
            "target.float() to use them as probability targets"
            if fn == "cross_entropy"
            else "fused_nll.cross_entropy(logits, target.float()) for probability targets"
        )
        raise RuntimeError(
            f"fused_nll.{fn}: integer target of shape {_shape(target)} has the input's shape, "
            f"so it looks like one-hot labels; expected class indices of shape {index_shape}. "
            f"Fix: {argmax} for class indices, or {alt}."
        )
    _check_index_shape(input, target, fn)
    return "index"


def _check_index_shape(input: torch.Tensor, target: torch.Tensor, fn: str) -> None:
    index_shape = class_index_shape(input)
    if list(target.shape) == index_shape:
        return
    long = ".long()" if target.is_floating_point() else ""
    if input.dim() == 1:
        # (a [1] index target never gets here: target_kind takes or refuses it first)
        if target.dim() == 1 and not target.is_floating_point():
            raise ValueError(
                f"For 1D input, 1D target must have size 1, but got target size: "
                f"{target.shape[0]}. fused_nll.{fn}: for an input of shape {_shape(input)} (one "
                "sample of C classes) the target is one class index, of shape () or [1]. Fix: "
                "add a batch dimension to the input (input.unsqueeze(0)) for several samples."
            )
        raise RuntimeError(
            f"fused_nll.{fn}: for an input of shape {_shape(input)} (one sample of C classes) "
            f"the target is one class index (an integer of shape () or [1]), got shape "
            f"{_shape(target)} and dtype {target.dtype}. Fix: add a batch dimension to the "
            "input (input.unsqueeze(0)) for several samples."
        )
    if (target.dim() == input.dim() and target.shape[1] == 1 and target.shape[0] == input.shape[0]
            and target.shape[2:] == input.shape[2:]):
        raise RuntimeError(
            f"fused_nll.{fn}: target of shape {_shape(target)} has a dimension of size 1 where "
            f"the input has its classes (dim 1, e.g. a mask with a channel dimension); expected "
            f"class indices of shape {index_shape}. Fix: target.squeeze(1){long}."
        )
    if target.dim() == 0 or target.shape[0] != input.shape[0]:
        raise ValueError(
            f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
            f"({target.shape[0] if target.dim() else 0}): fused_nll.{fn} got input "
            f"{_shape(input)} and target {_shape(target)}; the first dimension of both is the "
            "batch" + (" (a 0-d target is the class index of a (C,) input)." if target.dim() == 0
                       else ".")
        )
    if input.dim() == 3 and target.shape == input.shape[:2]:
        raise RuntimeError(
            f"fused_nll.{fn}: size mismatch (got input: {_shape(input)}, target: "
            f"{_shape(target)}). A 3-D input is read as (N, C, d1), classes in dim 1, so the "
            f"target would be {index_shape}; this target matches the input's first two "
            "dimensions, so its classes are probably last ((batch, time, vocab) logits). Fix: "
            f"fused_nll.{fn}(input.flatten(0, 1), target.flatten()) (a view of contiguous "
            "logits, no copy), or input.transpose(1, 2) for the (N, C, d1) layout."
        )
    raise RuntimeError(
        f"fused_nll.{fn}: size mismatch (got input: {_shape(input)}, target: {_shape(target)}); "
        f"for input (N, C, d1, ..., dk) the target must be (N, d1, ..., dk) = {index_shape}."
    )


def single_index(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A (C,) input's class index as the kernels take it: 0-d (torch also takes shape
    [1], and returns a 0-d loss for every reduction)."""
    return target.reshape(()) if input.dim() == 1 and target.dim() == 1 else target


def index_target(target: torch.Tensor) -> torch.Tensor:
    """Integer targets as the kernels read them (no copy for the usual dtypes)."""
    if target.dtype in _KERNEL_INT_DTYPES:
        return target
    return target.long()  # uint16/uint32/uint64: copies the targets only


def weight(weight, input: torch.Tensor, fn: str, prob: bool = False):
    """The class weights as the kernels read them: 1-D, contiguous, in the
    accumulation dtype (a C-element cast when the dtype differs, differentiable). prob:
    the targets are probabilities (torch differentiates with respect to weight there,
    and so does fused_nll; with class indices neither does)."""
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"fused_nll.{fn}: weight must be a torch.Tensor or None, got {type(weight).__name__}.")
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise RuntimeError(
            f"weight tensor should be defined either for all {classes} classes or no classes "
            f"but got weight tensor of shape: {_shape(weight)}. fused_nll.{fn} expects a 1-D "
            f"weight of shape [{classes}] (one value per class)."
        )
    if not weight.is_floating_point():
        raise RuntimeError(
            f"fused_nll.{fn}: weight must be floating point, got dtype {weight.dtype}. "
            "Fix: weight.float()."
        )
    check_same_device(input, weight, "weight", fn)
    if weight.requires_grad and torch.is_grad_enabled() and not prob:
        raise RuntimeError(
            f"fused_nll.{fn} is not differentiable with respect to argument 'weight' with "
            "class-index targets (nor is torch's nll_loss_forward), but the weight passed "
            "requires grad. Fix: pass weight.detach() (class weights are learned only with "
            "cross_entropy's probability targets, where both differentiate them)."
        )
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    return weight.to(acc).contiguous()


# Producers whose backward reads their own output: overwriting it in place is
# the classic nll_loss(log_softmax(x)) case, caught here with a clear message
# (autograd's version check would catch any producer, but only at backward).
_SAVE_THEIR_OUTPUT = {"LogSoftmaxBackward0", "SoftmaxBackward0"}


def inplace_backward(flag, input: torch.Tensor, fn: str) -> bool:
    """Whether the gradient will be written over `input` (inplace_backward=True
    and a gradient will be needed); raises when that is unsafe."""
    if not isinstance(flag, bool):
        raise TypeError(
            f"fused_nll.{fn}: inplace_backward must be True or False, got "
            f"{type(flag).__name__} {flag!r}."
        )
    if not (flag and input.requires_grad and torch.is_grad_enabled()):
        return False  # nothing to write: the input is left alone
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            f"fused_nll.{fn}: inplace_backward=True is not supported inside torch.func "
            "transforms (grad, vjp, vmap, ...): there the gradient comes from the backward op, "
            "not from the forward pass, so there is nothing to write in place. Drop "
            "inplace_backward inside torch.func."
        )
    base = input._base  # Dynamo traces it (fullgraph), so also checked when compiled
    if input.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        raise RuntimeError(
            f"fused_nll.{fn}: inplace_backward=True writes the gradient over input, but input "
            f"(shape {_shape(input)}) is a leaf tensor that requires grad (or a view of one), so "
            "its .grad would be its own storage and its values would be lost. Use it on logits "
            "computed by "
            "the model (e.g. the LM head's output), or drop inplace_backward."
        )
    producer = None if torch.compiler.is_compiling() else input.grad_fn
    if producer is not None and type(producer).__name__ in _SAVE_THEIR_OUTPUT:
        raise RuntimeError(
            f"fused_nll.{fn}: inplace_backward=True would overwrite input, the output of "
            f"{type(producer).__name__[:-len('Backward0')].lower()}, whose backward needs it "
            "(autograd would fail at backward). Pass the logits instead: "
            "fused_nll.cross_entropy(logits, target, inplace_backward=True), or drop "
            "inplace_backward."
        )
    if not input.is_contiguous():
        raise ValueError(
            f"fused_nll.{fn}: inplace_backward=True needs a contiguous input, got shape "
            f"{_shape(input)} with strides {list(input.stride())}. Drop inplace_backward "
            "(non-contiguous logits are read in place without a copy), or make the "
            "producing op write contiguous logits."
        )
    return True

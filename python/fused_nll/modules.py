"""nn.Module twins of torch.nn.CrossEntropyLoss and torch.nn.NLLLoss: subclasses of
torch's modules (so ``isinstance(loss_fn, torch.nn.CrossEntropyLoss)`` holds, and the
attributes, the ``weight`` buffer and the state_dict are torch's), with a fused forward."""
from __future__ import annotations

import torch

from . import functional


class _Named:
    """A printed model says which loss it uses, and whether it overwrites the logits:
    fused_nll.CrossEntropyLoss(inplace_backward=True)."""

    def _get_name(self) -> str:
        if type(self).__module__.startswith("fused_nll"):
            return f"fused_nll.{type(self).__name__}"
        return super()._get_name()  # a user's subclass keeps its own name

    def extra_repr(self) -> str:
        return "inplace_backward=True" if self.inplace_backward else ""


class CrossEntropyLoss(_Named, torch.nn.CrossEntropyLoss):
    """Same constructor and call as ``torch.nn.CrossEntropyLoss`` (a subclass of it),
    plus the keyword ``inplace_backward``; see :func:`fused_nll.cross_entropy`."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, inplace_backward=False):
        # torch's deprecated size_average / reduce mapped here, so that the warning
        # points at the user's constructor call (stacklevel), not inside torch
        reduction = functional._legacy_reduction(size_average, reduce, reduction, stacklevel=3)
        super().__init__(weight, None, ignore_index, None, reduction, label_smoothing)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.cross_entropy(input, target, weight=self.weight,
                                        ignore_index=self.ignore_index, reduction=self.reduction,
                                        label_smoothing=self.label_smoothing,
                                        inplace_backward=self.inplace_backward)


class NLLLoss(_Named, torch.nn.NLLLoss):
    """Same constructor and call as ``torch.nn.NLLLoss`` (a subclass of it; input:
    log-probabilities), plus the keyword ``inplace_backward``; see
    :func:`fused_nll.nll_loss`."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", *, inplace_backward=False):
        reduction = functional._legacy_reduction(size_average, reduce, reduction, stacklevel=3)
        super().__init__(weight, None, ignore_index, None, reduction)
        self.inplace_backward = inplace_backward

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return functional.nll_loss(input, target, weight=self.weight,
                                   ignore_index=self.ignore_index, reduction=self.reduction,
                                   inplace_backward=self.inplace_backward)

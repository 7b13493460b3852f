"""Checks that read tensor values, and so synchronise with the GPU: enabled by
fused_nll.set_debug(True) / FUSED_NLL_DEBUG=1 (debug checks) or
FUSED_NLL_VERIFY=1 (shadow mode). Eager only: under torch.compile they are
skipped, since a data-dependent check cannot be traced without a graph break."""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from ._reference import compare


class NotLogProbabilitiesWarning(UserWarning):
    """nll_loss received rows that are clearly not log-probabilities."""


def verify_enabled() -> bool:
    return os.environ.get("FUSED_NLL_VERIFY", "0") == "1"


def check_targets(input: torch.Tensor, target: torch.Tensor, ignore_index: int, fn: str) -> None:
    """IndexError naming the first out-of-range class index and its position
    (on GPU the kernels otherwise give a nan row instead of a device assert)."""
    classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    t = target.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= classes))
    if bool(bad.any()):  # debug mode: the sync is the point
        pos = tuple(int(i) for i in bad.nonzero()[0].tolist())
        value = int(t[pos].item()) if pos else int(t.item())
        raise IndexError(
            f"Target {value} is out of bounds. fused_nll.{fn}: target{list(pos)} = {value}, "
            f"but class indices must be in [0, {classes - 1}] (or equal ignore_index={ignore_index}); "
            f"{int(bad.sum().item())} target(s) are out of range."
        )


def check_log_probs(input: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    """Warns when the non-ignored rows given to nll_loss are not log-probabilities:
    log-probabilities have logsumexp 0 over the classes (up to the rounding of
    the dtype); raw logits almost never do."""
    x = input.detach().float()
    if x.dim() == 1:
        x, target = x.unsqueeze(0), target.reshape(1)
    lse = torch.logsumexp(x, dim=1)  # (N, d1..dk)
    keep = target != ignore_index
    if not bool(keep.any()):
        return
    worst = lse[keep].abs().max()
    # bf16/fp16 log-probs round each entry by ~2^-8·|lp|: their logsumexp can
    # drift by a few hundredths for large vocabularies.
    tol = 0.25 if input.dtype in (torch.bfloat16, torch.float16) else 0.05
    if bool(worst > tol) or not bool(torch.isfinite(worst)):
        warnings.warn(
            f"fused_nll.nll_loss: the input does not look like log-probabilities: the logsumexp "
            f"of a row over the classes is {lse[keep][lse[keep].abs().argmax()].item():.4g}, expected 0. "
            "nll_loss expects log_softmax(logits); for raw logits use "
            "fused_nll.cross_entropy(logits, target), which applies log_softmax in the same pass.",
            NotLogProbabilitiesWarning,
            stacklevel=3,
        )


def shadow_verify(fn: str, loss: torch.Tensor, input, target, weight, ignore_index, reduction,
                  label_smoothing=0.0) -> None:
    """FUSED_NLL_VERIFY=1: compare with torch in fp64 and raise on mismatch."""
    x = input.detach().double()
    w = None if weight is None else weight.detach().double()
    t = target.detach().double() if target.is_floating_point() else target.detach().long()
    if fn == "nll_loss":
        ref = F.nll_loss(x, t, weight=w, ignore_index=ignore_index, reduction=reduction)
    else:
        ref = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                              label_smoothing=label_smoothing)
    ok, _, _, detail = compare(loss, ref, input.dtype)
    if not ok:
        raise RuntimeError(
            f"FUSED_NLL_VERIFY: fused_nll.{fn} differs from torch: {detail}. Case: input "
            f"{list(input.shape)} {input.dtype} on {input.device}, target {list(target.shape)} "
            f"{target.dtype}, weight={'yes' if weight is not None else 'no'}, "
            f"ignore_index={ignore_index}, reduction={reduction!r}, label_smoothing={label_smoothing}. "
            "Please report it with this message."
        )

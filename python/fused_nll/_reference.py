"""The fp64 torch reference and the per-dtype tolerances, in one place (used by
the tests and by `python -m fused_nll verify`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# (rtol, atol) per input dtype. The reference is torch in fp64 on the same
# (already rounded) inputs, so the error is our accumulation plus one rounding
# of the result to the dtype: 2^-8 relative for bf16, 2^-11 for fp16.
# atol is relative to the largest reference magnitude (see `close`).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 4e-3),
    torch.float16: (2e-3, 5e-4),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return TOLERANCES[dtype]


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |out - ref| over finite reference entries (nan/inf must match exactly)."""
    out, ref = out.double(), ref.double()
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (out[finite] - ref[finite]).abs().max().item()


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
          scale_floor: float = 0.0) -> tuple[bool, str]:
    """(ok, detail): out equals ref within dtype's tolerance; non-finite entries equal.

    atol applies relative to max(|ref|, scale_floor): pass the magnitude of the
    terms that cancel (e.g. the upstream gradient per row) when ref may be ~0.
    """
    rtol, atol = tolerance(dtype)
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return False, f"shape {list(out.shape)} != reference {list(ref.shape)}"
    finite = torch.isfinite(ref)
    same_nonfinite = torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(
        out[torch.isinf(ref)], ref[torch.isinf(ref)]
    )
    if not same_nonfinite:
        return False, "nan/inf entries differ from the reference"
    if not finite.any():
        return True, "all non-finite, equal"
    scale = ref[finite].abs().max().clamp_min(max(scale_floor, 1e-30))
    err = (out[finite] - ref[finite]).abs()
    bound = atol * scale + rtol * ref[finite].abs()
    worst = (err / bound).max().item()
    return worst <= 1.0, f"max err {err.max().item():.3g} ({worst:.2f} of tolerance)"


def reference(fn: str, input, target, weight=None, ignore_index=-100, reduction="mean",
              label_smoothing=0.0, grad_output=None):
    """torch's loss (and the input gradient when grad_output is given), in fp64."""
    x = input.detach().double().requires_grad_(grad_output is not None)
    w = None if weight is None else weight.detach().double()
    if target.is_floating_point():
        t = target.detach().double()
    else:
        t = target.long()
    if fn == "nll_loss":
        loss = F.nll_loss(x, t, weight=w, ignore_index=ignore_index, reduction=reduction)
    else:
        loss = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
    if grad_output is None:
        return loss.detach(), None
    (grad,) = torch.autograd.grad(loss, x, grad_output.double())
    return loss.detach(), grad

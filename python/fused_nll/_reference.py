"""The fp64 torch reference and the per-dtype tolerances, in one place (used by
the tests, `python -m fused_nll verify` and the FUSED_NLL_VERIFY shadow mode).
Its comparisons read values on the host (.cpu(), .item()) on purpose: it is
never on the op path, which has no host synchronisation."""
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


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            scale_floor: float = 0.0) -> tuple[bool, float, float, str]:
    """(ok, max error, max error as a fraction of the tolerance, detail).

    out must equal ref within dtype's tolerance, with the same nan/inf entries.
    atol applies relative to max(|ref|, scale_floor): pass the magnitude of the
    terms that cancel (e.g. the upstream gradient per row) when ref may be ~0.
    """
    rtol, atol = tolerance(dtype)
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return False, float("inf"), float("inf"), f"shape {list(out.shape)} != reference {list(ref.shape)}"
    finite = torch.isfinite(ref)
    same_nonfinite = torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.equal(
        out[torch.isinf(ref)], ref[torch.isinf(ref)]
    )
    if not same_nonfinite:
        return False, float("inf"), float("inf"), "nan/inf entries differ from the reference"
    if not finite.any():
        return True, 0.0, 0.0, "all non-finite, equal"
    scale = ref[finite].abs().max().clamp_min(max(scale_floor, 1e-30))
    err = (out[finite] - ref[finite]).abs()
    bound = atol * scale + rtol * ref[finite].abs()
    ratio = (err / bound).max().item()
    max_err = err.max().item()
    return ratio <= 1.0, max_err, ratio, f"max err {max_err:.3g} ({ratio:.2f} of tolerance)"


def close(out, ref, dtype, scale_floor: float = 0.0) -> tuple[bool, str]:
    """(ok, detail) of `compare`."""
    ok, _, _, detail = compare(out, ref, dtype, scale_floor)
    return ok, detail


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

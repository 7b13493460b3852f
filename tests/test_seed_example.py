"""The three cases of the seed example: the right way, raw logits into
nll_loss, and one-hot targets."""
import pytest
import torch
import torch.nn.functional as F

import fused_nll
from fused_nll._debug import NotLogProbabilitiesWarning

torch.manual_seed(0)
LOGITS = torch.randn(8, 10) * 2
TARGET = torch.randint(0, 10, (8,))


def test_log_softmax_then_nll_loss_is_correct():
    lp = torch.log_softmax(LOGITS, dim=1)
    torch.testing.assert_close(fused_nll.nll_loss(lp, TARGET), F.nll_loss(lp, TARGET))
    torch.testing.assert_close(fused_nll.nll_loss(lp, TARGET), fused_nll.cross_entropy(LOGITS, TARGET))


def test_raw_logits_into_nll_loss():
    # Without debug: torch's (meaningless) value, bit for bit the same formula.
    torch.testing.assert_close(fused_nll.nll_loss(LOGITS, TARGET), F.nll_loss(LOGITS, TARGET))
    # With debug: a warning that names the fix.
    fused_nll.set_debug(True)
    try:
        with pytest.warns(NotLogProbabilitiesWarning, match=r"fused_nll\.cross_entropy\(logits, target\)"):
            fused_nll.nll_loss(LOGITS, TARGET)
    finally:
        fused_nll.set_debug(False)


def test_one_hot_targets():
    onehot = F.one_hot(TARGET, 10).float()
    with pytest.raises(RuntimeError, match=r"one-hot.*target\.argmax\(dim=1\)"):
        fused_nll.nll_loss(torch.log_softmax(LOGITS, 1), onehot)
    # cross_entropy takes them as probability targets: equal to index targets.
    torch.testing.assert_close(fused_nll.cross_entropy(LOGITS, onehot), fused_nll.cross_entropy(LOGITS, TARGET))
    torch.testing.assert_close(fused_nll.cross_entropy(LOGITS, onehot), F.cross_entropy(LOGITS, TARGET))

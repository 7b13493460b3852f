"""fused_nll: a fused log_softmax + NLL (cross-entropy) for PyTorch.

    import fused_nll
    loss = fused_nll.cross_entropy(logits, target)   # == F.cross_entropy(logits, target)

One custom op family (torch.ops.fused_nll.*) with C++ CPU, Triton and CUDA C++
kernels, autograd, fake kernels for torch.compile/export, and argument checks
that explain the usual NLLLoss mistakes.
"""
from . import _ops  # noqa: F401  (loads the compiled op library, registers fake/autograd)
from ._backend import set_debug, use_backend
from ._debug import NotLogProbabilitiesWarning
from ._ops import library_path
from .functional import cross_entropy, nll_loss
from .modules import CrossEntropyLoss, NLLLoss

__version__ = "0.1.0"
__all__ = ["cross_entropy", "nll_loss", "CrossEntropyLoss", "NLLLoss", "use_backend", "set_debug",
           "NotLogProbabilitiesWarning", "library_path"]

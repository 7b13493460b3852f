"""Every Triton kernel compiles with the real compiler, for sm_90 and sm_80, without a
GPU (triton.compile to PTX). Triton's interpreter, which CI uses to run the kernels,
accepts code the compiler rejects, so this is the check that a kernel will build on
a GPU at all (with this machine's Triton; the lent GPU has another version)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("the interpreter replaces the kernels; compile them in a normal process",
                allow_module_level=True)
triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_nll.triton_kernels import cross_entropy as ce  # noqa: E402

# Pointer and scalar types by argument name (bf16 logits, int64 targets).
POINTERS = {"x_ptr": "*bf16", "g_ptr": "*bf16", "y_ptr": "*bf16", "t_ptr": "*i64",
            "cnt_ptr": "*i32"}  # any other *_ptr: fp32
SCALARS = {"eps_hi": "fp32", "eps_lo": "fp32", "ignore_index": "i64"}  # others: i32

KERNELS = [  # (kernel, constexprs, num_warps)
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, COMPUTE_GRAD=True,
                             MEAN=True, BLOCK=8192), 8),
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=False, SMOOTH=True, LOG_PROBS=True, COMPUTE_GRAD=True,
                             MEAN=False, BLOCK=1024), 4),
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=True, COMPUTE_GRAD=True,
                             MEAN=True, BLOCK=8192), 8),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, MEAN=True, PARTS=16, RECORDS=16, PHASE=0,
                               ONE_BLOCK=True, BLOCK=8192), 8),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, MEAN=True, PARTS=8, RECORDS=8, PHASE=0,
                               ONE_BLOCK=False, BLOCK=4096), 4),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=False, SMOOTH=False, MEAN=False, PARTS=3, RECORDS=4, PHASE=1,
                               ONE_BLOCK=True, BLOCK=8192), 8),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=False, SMOOTH=False, MEAN=False, PARTS=3, RECORDS=4, PHASE=2,
                               ONE_BLOCK=False, BLOCK=8192), 8),
    (ce._ce_bwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, MEAN=True,
                             BLOCK=8192), 8),
    (ce._ce_prob_fwd_kernel, dict(HAS_WEIGHT=True, COMPUTE_GRAD=True, MEAN=True, BLOCK=4096), 8),
    (ce._ce_prob_bwd_kernel, dict(HAS_WEIGHT=False, MEAN=False, BLOCK=4096), 8),
    (ce._scale_grad_kernel, dict(BLOCK=4096), 8),
    (ce._scale_grad_rows_kernel, dict(BLOCK=8192), 8),
]


def _signature(kernel, constexprs):
    missing = [n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr and n not in constexprs]
    assert not missing, f"give every constexpr of {kernel.__name__} a value: {missing}"
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTERS.get(name, "*fp32")
        else:
            sig[name] = SCALARS.get(name, "i32")
    return sig


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("case", KERNELS, ids=lambda c: f"{c[0].__name__}-{'-'.join(f'{k}{v}' for k, v in c[1].items() if k in ('PHASE', 'ONE_BLOCK', 'LOG_PROBS', 'SMOOTH'))}")
def test_kernel_compiles(case, arch):
    kernel, constexprs, num_warps = case
    src = ASTSource(fn=kernel, signature=_signature(kernel, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx and kernel.__name__ in ptx
    if kernel is ce._ce_fwd_kernel and constexprs["COMPUTE_GRAD"]:
        # in place, x_t is read before any thread writes the gradient: a barrier even
        # where no reduction provides one (nll_loss on log-probs without smoothing)
        assert "bar.sync" in ptx
    if kernel is ce._ce_split_kernel and constexprs["PHASE"] == 0:
        # the in-launch exchange: release add, acquire spin, volatile reads of the records
        assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release" in ptx
        assert ".acquire" in ptx and "ld.volatile.global" in ptx

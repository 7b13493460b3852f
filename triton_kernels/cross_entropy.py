"""Triton kernels for fused log_softmax + NLL (cross-entropy).

The contract (shapes, math, edge cases) is docs/ops.md; the symbols below follow it:
row r, classes c < C, weight w_c, smoothing eps, lse_r, p_c = exp(x_c - lse_r).

Design
------
* One program per row. The input is viewed as (N, C, S) (S = d1*...*dk, 1 for 1-D/2-D
  input); row r = n*S + s starts at n*stride_n + s*stride_s and walks the classes with
  stride_c, so any strides work without copying the logits.
* Except for short rows (at most _TILE_MAX_CLASSES classes) and class-strided layouts
  (contiguous (N, C, H, W): a row's classes H*W elements apart): there a program takes
  a tile of many rows (the tile kernels, below), loaded along whichever axis is
  contiguous. Rows of LM logits (long, unit class stride) keep one program per row.
* Sweep 1 reads the row once in blocks of BLOCK classes and keeps an online
  log-sum-exp: a running scalar max m and per-lane partial sums of exp(x - m), rescaled
  when m grows. Only the max is reduced across the block inside the loop; the sums are
  reduced once at the end.
* Sweep 2 (only when a gradient is wanted) walks the row again, in REVERSE block
  order, and writes the gradient. The blocks read last in sweep 1 are read first, so
  the re-read is served by L2 as far as the cache allows.
* Losses and lse are written per row in the accumulation dtype (fp32, fp64 for fp64
  input); the launcher reduces the per-row losses with torch.sum (deterministic).
* For reduction="mean" the gradient scale 1/W needs W = sum_r k_r*w_{t_r} before the
  gradient sweep, so the launcher computes W with a few torch ops over the targets
  (no host sync) and the kernel loads it from device memory.
* BLOCK and num_warps come from a small table keyed by the vocabulary size and element
  size (powers of two, capped), and C is a runtime argument: there is no
  recompilation per vocabulary size.

Every launch goes through ``torch.library.wrap_triton`` so the launchers can be the
bodies of ``torch.library.triton_op``s (python/fused_nll/_triton_ops.py). They use only
torch ops and kernel launches, branch only on shapes, dtypes and flags, and never read
a tensor value on the host.
"""

import functools
import math
import os
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch._library.triton import is_wrap_triton_enabled as _wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake as _is_fake
from torch.library import wrap_triton as _torch_wrap_triton
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "cross_entropy_fwd",
    "cross_entropy_bwd",
    "cross_entropy_prob_fwd",
    "cross_entropy_prob_bwd",
    "cross_entropy_fwd_inplace",
    "cross_entropy_prob_fwd_inplace",
    "scale_grad_",
]

# torch's Reduction enum, as used by the op schemas.
REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2


def wrap_triton(kernel):
    """torch.library.wrap_triton, except where torch's wrapper would only launch the
    kernel as it is: with wrap_triton off (an op's eager body, the public functions'
    direct calls: the wrapper's two objects and checks per launch saved), and for a
    kernel under Triton's interpreter (TRITON_INTERPRET=1 makes @triton.jit return an
    InterpretedFunction), which torch 2.13 launches as it is and torch 2.6 to 2.11
    refuse."""
    if isinstance(kernel, InterpretedFunction) or not _wrap_triton_enabled():
        return kernel
    return _torch_wrap_triton(kernel)


# ---------------------------------------------------------------------------------------
# Launch configuration.
#
# BLOCK = next power of two >= C, at least _MIN_BLOCK and at most _MAX_BLOCK[element
# size]; num_warps gives every thread ~_ELEMS_PER_THREAD elements per block, between 4
# and 32 warps. Large vocabularies therefore run BLOCK 8192 with 8 warps: on an H200
# (benchmarks/triton_sweep.py, 2026-11-26, 8192x128256 bf16) that read at 0.60 ms
# forward against 0.90 ms for BLOCK 16384 with 32 warps (several rows per SM keep
# more loads in flight). Kernels that keep more per-lane state (label smoothing,
# probability targets) use half the block and elements per thread so as not to
# spill. These module-level values are the only tuning knobs.
# ---------------------------------------------------------------------------------------
_MIN_BLOCK = 128
_MAX_BLOCK = {1: 8192, 2: 8192, 4: 8192, 8: 4096}
_ELEMS_PER_THREAD = 32
_SCALE_BLOCK = 4096  # elements per step of the flat scale_grad_ kernel
_SCALE_MAX_PROGRAMS = 4096  # grid cap of that kernel (it loops over the tensor)
_FINISH_BLOCK = 4096  # row losses per step of _finish_loss_kernel (8 warps)
_FINISH_MAX_ROWS = 32768  # up to this many rows the mean/sum is one program's loop
_TOTAL_WEIGHT_BLOCK = 1024  # targets per step of _total_weight_kernel
_TOTAL_WEIGHT_SPAN = 65536  # rows per program (at least)
_TOTAL_WEIGHT_MAX_PROGRAMS = 1024  # so at most 1024 partial sums


# Persistent grid for the index forward kernel: None launches one program per
# row; k launches k programs per SM, each looping over rows. A knob for
# benchmarks/triton_sweep.py (fewer rows in flight may let the gradient sweep
# re-read its row from L2 instead of HBM); on the H100 (2026-11-27) 8 per SM lost to
# the default forward (0.78 vs 0.725 ms at 8192 x 128256 bf16), see _GRAD_LAUNCH.
_PROGRAMS_PER_SM = None

# Software prefetch in sweep 1 of the index forward kernel (logits): block k+1's loads
# are issued before block k's reductions, and a row's first block before its target is
# read. Off: on the H100 (2026-11-27) about even with the default (0.736 vs 0.725 ms
# forward at 8192 x 128256 bf16; benchmarks/triton_sweep.py). Costs 16 registers per
# thread for bf16 (ptxas, sm_90: tests/test_triton_compile.py) and, for an ignored row,
# one block read for nothing.
_PREFETCH = False

# The index row kernels' fp32 exps (sweep 1, the gradient, the backward) as one
# ex2.approx.ftz.f32 each (_exp_ftz) instead of tl.exp, whose ex2.approx.f32 ptxas wraps
# in a denormal-safe sequence of four more instructions (sm_90); results below 2^-126
# become 0 (a gradient entry p_c < 1.2e-38, or a term of a sum that holds the row max's
# exp(0) = 1). Compiled code only (the interpreter runs tl.exp). In the loop of the
# bf16 forward at 128256 classes: 372 instructions per 8192-class block without, 267
# with it and _PER_VECTOR_MAX (tests/test_triton_compile.py); not yet timed on a GPU.
_FTZ_EXP = True

# Sweep 1 of the index row kernel (rows longer than one block) with its running max kept
# per 16-byte vector of classes, i.e. per thread (_online_lse_groups), instead of per
# block: no reduction across warps (two barriers) in the loop over blocks (with
# _FTZ_EXP: 267 instructions per 8192-class block against 273; sm_90, bf16,
# tests/test_triton_compile.py). Why it may matter: at the H200's 4.3 TB/s an SM must
# take ~18 G bf16 elements a second, and the per-block-max loop needed ~11.6
# instructions an element before _FTZ_EXP, near the SM's issue rate; the forward reads at
# 82% of the floor there, 96% on the H100 (3.0 TB/s). Off: slower on the H100
# (2026-11-27, session 14: 0.745 ms forward at 8192 x 128256 bf16 against 0.700, with
# _FTZ_EXP on both; h100_2026-11-27-s14_triton_sweep.txt).
_PER_VECTOR_MAX = False

# The forward with gradient (row kernel, class indices) may want another launch shape
# than the forward alone: the forward wants many loads in flight, the gradient sweep
# wants its row still in L2 when it re-reads it. A dict overrides some of the forward's
# knobs for that launch only, for rows of at least _GRAD_LAUNCH_MIN_CLASSES classes:
# "max_block" (every element size), "elems_per_thread", "programs_per_sm", "prefetch",
# and "evict_first_store" (the gradient's stores marked first to leave L2, so that they
# do not push out logits that other rows have yet to re-read). None: the forward's knobs.
# The default, 4 persistent programs per SM of 8192-class blocks with 16 warps, software
# prefetch and evict-first gradient stores: "grad: prefetch 4/SM 8k" was the best of
# benchmarks/triton_sweep.py's sets on the H200 (2026-11-27, bf16, forward+backward):
# 1.568 ms against 1.625 with the forward's knobs at 8192 x 128256, 1.597 against 1.669
# at 4096 x 256000 (h200_2026-11-27_triton_sweep.txt), where evict-first stores alone
# also gained (1.587 / 1.649). On the H100 (2026-11-27, session 14) the two together were
# the best set at both long rows: 1.783 against 1.857 ms at 8192 x 128256, 1.964 against
# 1.994 at 4096 x 256000 (h100_2026-11-27-s14_triton_sweep.txt). At 8192 x 32000 the
# sweeps' timings vary by 2x for one and the same forward (host-bound): no choice is
# made there. Rows shorter than 16384 classes (not timed with it; 4 programs per SM of a
# small block would leave most of an SM idle) keep the forward's knobs.
_GRAD_LAUNCH = {"max_block": 8192, "elems_per_thread": 16, "programs_per_sm": 4,
                "prefetch": True, "evict_first_store": True}
_GRAD_LAUNCH_MIN_CLASSES = 16384


# Split rows (forward with gradient, index targets, logits not log-probs): each row is
# cut into _SPLIT_PARTS column chunks (an int, or "auto": chunks of one block,
# ceil(C / _SPLIT_MAX_BLOCK) of them), one work item per chunk, so that a chunk is read
# once and kept in registers (one block) or re-read from L2 while it is still there. None:
# off. Used only for rows of at least _SPLIT_MIN_CLASSES classes. On CUDA the parts of a
# row exchange their partial sums inside one launch (_SPLIT_PROGRAMS_PER_SM programs per
# SM take items from a ticket counter and wait on a per-row counter). Measured on the
# H100 and H200 (2026-11-27) in its first form, where a program waited for a row right
# after publishing its part: correct but slower at every setting (2.1 to 3.7 ms
# forward+backward at 8192 x 128256 bf16 against 1.6-2.0); one-block chunks are now
# pipelined (a program publishes its next item before it waits for the previous one's
# row: _ce_split_kernel): correct on the H100 (2026-11-27, session 14) but still slower,
# 2.24 ms at best against 1.86 (h100_2026-11-27-s14_triton_sweep.txt; holding the
# previous chunk in registers 2.36-2.80, fewer programs per SM): each item is a chain
# of dependent round trips (ticket, load, publish, wait, sums) with 8-16 KB in flight
# per program, too little per SM; a program would need several items in flight. Elsewhere (Triton's interpreter runs programs
# one after the other) or with _SPLIT_FUSED = False the same kernel runs as two launches
# (sweep 1 + partial sums; combine + gradient sweep).
_SPLIT_PARTS = None
_SPLIT_MIN_CLASSES = 16384
_SPLIT_PROGRAMS_PER_SM = 4
_SPLIT_MAX_BLOCK = 8192
_SPLIT_ELEMS_PER_THREAD = 16  # 8192 x 16 warps: 64 registers (ptxas, sm_90, bf16)
_SPLIT_NUM_WARPS = None  # None: BLOCK / (32 * _SPLIT_ELEMS_PER_THREAD), 4 to 32
# One-block chunks, one launch: True holds a program's previous chunk in registers until
# its row is complete (read once), False reads it again from L2 (fewer registers: see
# _ce_split_kernel). False was faster on the H100 (2026-11-27: 2.32 against 2.80 ms at
# 8192 x 128256 bf16, 4096-class chunks, 4 programs per SM).
_SPLIT_HOLD = False
# FUSED_NLL_SPLIT_ONE_LAUNCH=0 forces the two launches (benchmarks/gpu_check.sh sets it
# for its sweep and bench when the one-launch GPU test did not pass: a part spinning
# forever would stall them).
_SPLIT_FUSED = os.environ.get("FUSED_NLL_SPLIT_ONE_LAUNCH", "1") != "0"


# Tile kernels (_ce_tile_fwd_kernel and friends) for the layouts one program per row
# serves badly: rows of at most _TILE_MAX_CLASSES classes, and rows whose classes are
# strided (contiguous (N, C, H, W), where a row's classes sit H*W elements apart). A
# program takes [BLOCK_C, BLOCK_S] tiles: BLOCK_S rows ("pixels") and BLOCK_C classes,
# with 4 warps. Sizes from ptxas (sm_90, triton 3.9): class-strided tiles of 4096
# elements (32 per thread) use about 128 registers, 4 programs and 16k elements in flight
# per SM; unit-stride short rows cannot use vector loads (a row of 21 classes is not
# 16-byte aligned) and each element's 64-bit address costs registers, so their tiles are
# 512 elements (56 registers, 9 programs and 144 rows per SM; a program per row keeps
# 16 rows of an SM busy; 1024-element tiles spill with triton 3.6). _TILE = False sends
# everything to the row kernels (tests). Compiled and checked here with triton 3.9 and
# 3.6 (tests/test_triton_compile.py). On the H100 (2026-11-27) 16 x 21 x 512 x 512 bf16
# took 0.479 ms forward against 4.578 ms with the row kernels, but that is only 12% of
# the bandwidth floor: the tile size is the next sweep (benchmarks/triton_sweep.py).
_TILE = True
_TILE_MAX_CLASSES = 256
_TILE_ELEMS = 4096  # class-strided rows
_TILE_ELEMS_UNIT = 512  # short rows of unit class stride
_TILE_STRIDED_PIXELS = 64  # class-strided rows longer than _TILE_MAX_CLASSES: 128 B of bf16


def _on_tensor_device(name: str, position: int):
    """Runs a launcher with the current CUDA device set to that of its tensor argument
    ``name`` (at ``position`` when passed positionally). Triton launches on the current
    device and its current stream: logits on cuda:1 while cuda:0 is current (model or
    pipeline parallelism without torch.cuda.set_device) would fail ("Pointer argument
    cannot be accessed from Triton") or run on another device's stream. torch's own ops
    and the CUDA C++ kernels (a CUDAGuard) follow the tensor's device; so do these.
    When the devices agree (one GPU per process, CPU tensors on the interpreter) it costs
    one comparison. Not for fake tensors (being traced: they launch nothing, and their
    device need not exist here; with CUDA not initialised no real CUDA tensor exists)."""
    def wrap(launcher):
        @functools.wraps(launcher)
        def run(*args, **kwargs):
            tensor = args[position] if len(args) > position else kwargs[name]
            device = tensor.device
            if (device.type == "cuda" and torch.cuda.is_initialized()
                    and device.index != torch.cuda.current_device() and not _is_fake(tensor)):
                with torch.cuda.device(device):
                    return launcher(*args, **kwargs)
            return launcher(*args, **kwargs)
        return run
    return wrap


def _cdiv(a, b):
    """ceil(a / b) for ints or SymInts. triton.cdiv is a constexpr_function in recent
    Triton, whose call from host code costs a few microseconds; the launchers call this
    on every launch."""
    return (a + b - 1) // b


def _next_pow2(n):
    """The smallest power of two >= n (1 for n <= 1): host code's triton.next_power_of_2,
    without its call overhead for plain ints."""
    if isinstance(n, int):
        return 1 if n <= 1 else 1 << (n - 1).bit_length()
    return triton.next_power_of_2(n)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    """The device's SM count (cached: the launchers ask on every call)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _ftz(acc: torch.dtype, device: torch.device) -> bool:
    """Whether the row kernels take their fp32 exps as single ex2.approx.ftz
    instructions (_exp_ftz): _FTZ_EXP, compiled code (the interpreter has no inline PTX)."""
    return _FTZ_EXP and acc == torch.float32 and device.type == "cuda"


def _programs(rows: int, device: torch.device, per_sm: int | None = None) -> int:
    """Grid of the index row kernel: one program per row, or ``per_sm`` (default
    _PROGRAMS_PER_SM) programs per SM looping over the rows."""
    per_sm = _PROGRAMS_PER_SM if per_sm is None else per_sm
    if per_sm is None or device.type != "cuda":
        return rows
    return max(1, min(rows, per_sm * _sms(device)))


def _row_config(num_classes: int, element_size: int, heavy: bool = False,
                max_block: int | None = None, per_thread: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for a row kernel over ``num_classes`` classes; ``heavy``
    halves the block for kernels with more per-lane state. ``max_block`` and
    ``per_thread`` override _MAX_BLOCK and _ELEMS_PER_THREAD (_GRAD_LAUNCH)."""
    max_block = (max_block or _MAX_BLOCK.get(element_size, 4096)) // (2 if heavy else 1)
    per_thread = (per_thread or _ELEMS_PER_THREAD) // (2 if heavy else 1)
    block = min(max(_next_pow2(max(num_classes, 1)), _MIN_BLOCK), max_block)
    num_warps = min(32, max(4, block // (32 * per_thread)))
    return block, num_warps


# ---------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_offsets(S, stride_n, stride_s, C):
    """This program's row r and the element offsets of (r, class 0) in x and in the grad."""
    return _offsets_of_row(tl.program_id(0).to(tl.int64), S, stride_n, stride_s, C)


@triton.jit
def _offsets_of_row(row, S, stride_n, stride_s, C):
    """Row r and the element offsets of (r, class 0) in x and in the grad.

    int64 throughout: row*stride and n*C*S pass 2^31 for e.g. 16k tokens x 128k vocab,
    and Triton passes strides that fit in 32 bits as int32.
    """
    row = tl.full([], 0, tl.int64) + row  # also a loop index (a Python int in the interpreter)
    n = row // S
    s = row - n * S
    x_off = n * stride_n + s * stride_s
    g_off = n * C * S + s  # grad is contiguous (N, C, S); its class stride is S
    return row, x_off, g_off


@triton.jit
def _index_target(t_ptr, row, C, ignore_index):
    """Target of the row (any int dtype) and its status: active (a class in [0, C), not
    ignored) and ignored. A row that is neither has an out-of-range target (nan row)."""
    t = tl.load(t_ptr + row).to(tl.int64)
    ignored = t == ignore_index
    active = (t >= 0) & (t < C) & (t != ignore_index)
    return t, active, ignored


@triton.jit
def _load_block(x_row, stride_c, start, n_cols, BLOCK: tl.constexpr):
    """Classes [start, start + BLOCK) of a row, -inf past n_cols, in the logits' dtype.
    evict_last: sweep 1 reads the block and the gradient sweep reads it again."""
    cols = start + tl.arange(0, BLOCK)
    return tl.load(x_row + cols.to(tl.int64) * stride_c, mask=cols < n_cols,
                   other=float("-inf"), eviction_policy="evict_last")


@triton.jit
def _load_groups(x_row, stride_c, start, n_cols, BLOCK: tl.constexpr, GROUP: tl.constexpr):
    """_load_block as a [BLOCK // GROUP, GROUP] tile whose rows are GROUP adjacent classes
    (one 16-byte vector): the compiler gives each such vector to one thread, so a
    reduction along axis 1 stays in that thread's registers."""
    cols = start + tl.arange(0, BLOCK // GROUP)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    return tl.load(x_row + cols.to(tl.int64) * stride_c, mask=cols < n_cols,
                   other=float("-inf"), eviction_policy="evict_last")


@triton.jit
def _exp_ftz(x, FTZ: tl.constexpr):
    """exp(x) for x <= 0 (fp32); FTZ (compiled code only: the interpreter has no inline
    PTX): one ex2.approx.ftz.f32, results below 2^-126 flushed to 0, where tl.exp's
    ex2.approx.f32 becomes five instructions (ptxas, sm_90: a denormal-safe sequence
    around the MUFU). A term below 2^-126 changes nothing in a sum that holds the max's
    exp(0) = 1, and a gradient entry p_c below 2^-126 becomes 0."""
    if FTZ:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f",
                                         [x * 1.4426950408889634], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _online_lse_groups(x_row, stride_c, w_ptr, n_cols, x_first, ACC: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, PREFETCH: tl.constexpr,
                       BLOCK: tl.constexpr, GROUP: tl.constexpr, FTZ: tl.constexpr):
    """_online_lse with a running max per vector of GROUP adjacent classes (16
    bytes: one thread's load) instead of one per block (_PER_VECTOR_MAX). The block's
    max needs a reduction across the program's warps, two barriers per block, which
    ptxas (sm_90) puts in the loop; a vector's max is a few instructions in one
    thread's registers, and its rescaling one exp per vector. The vectors' sums are
    combined once, at the end of the row. Same (m, log_se, wxs, wsum); x_first is a
    _load_groups tile."""
    NEG_INF: tl.constexpr = float("-inf")
    V: tl.constexpr = BLOCK // GROUP
    m = tl.full([V], NEG_INF, ACC)  # running max per vector
    se = tl.zeros([V, GROUP], ACC)  # sum exp(x - m_ref) per lane
    wxs = tl.zeros([V, GROUP], ACC)  # sum w*(x - m_ref) per lane
    wsum = tl.zeros([V, GROUP], ACC)  # sum w per lane
    if PREFETCH:
        x_next = x_first
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, V)[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = cols < n_cols
        if PREFETCH:
            x = x_next.to(ACC)
            x_next = _load_groups(x_row, stride_c, start + BLOCK, n_cols, BLOCK, GROUP)
        else:
            x = _load_groups(x_row, stride_c, start, n_cols, BLOCK, GROUP).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        # exp(m - m_ref) is 0 while m is -inf (the sums are still 0), <= 1 otherwise
        se = se * _exp_ftz(m - m_ref, FTZ)[:, None] + _exp_ftz(x - m_ref[:, None], FTZ)
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = mask.to(ACC)
            m_ref_old = tl.where(m == NEG_INF, 0.0, m)
            wxs = (wxs - (m_ref - m_ref_old)[:, None] * wsum
                   + tl.where(mask, w * (x - m_ref[:, None]), 0.0))
            wsum += w
        m = m_new
    # to the row's max: every vector's terms scaled by exp(m_v - m_row) <= 1 (0 for a
    # vector of only -inf, whose sums are 0), and the smoothing sums re-referenced as
    # in the loop (each term stays <= 0)
    m_row = tl.max(m, 0)
    m_row = tl.where(m_row == NEG_INF, 0.0, m_row)
    se_row = tl.sum(tl.sum(se, 1) * tl.exp(m - m_row), 0)
    m_ref = tl.where(m == NEG_INF, 0.0, m)
    wsum_v = tl.sum(wsum, 1)
    wxs_row = tl.sum(tl.sum(wxs, 1) - (m_row - m_ref) * wsum_v, 0)
    return m_row, tl.log(se_row), wxs_row, tl.sum(wsum_v, 0)


@triton.jit
def _online_lse(x_row, stride_c, w_ptr, n_cols, x_first, ACC: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, PREFETCH: tl.constexpr,
                BLOCK: tl.constexpr, FTZ: tl.constexpr):
    """Sweep 1 of an index-target row: the first ``n_cols`` classes (C, or 0 to skip).

    PREFETCH: each block's loads are issued one iteration ahead, before the previous
    block's max reduction (Triton pipelines only loads that feed a dot), so a program
    has a block in flight while it computes; ``x_first`` is the row's first block,
    loaded by the caller (_load_block) before it waits for the row's target.
    Otherwise ``x_first`` is unused (None).

    Returns (m, log_se, wxs, wsum) with lse = m + log_se, se = sum_c exp(x_c - m),
    and, when SMOOTH, wxs = sum_c w_c*(x_c - m) <= 0 and wsum = sum_c w_c, so that the
    smoothing term sum_c w_c*(lse - x_c) = wsum*log_se - wxs adds two non-negative
    numbers (no cancellation for logits near +-1e4). m is 0 for a row of only -inf
    (then the sums stay 0 instead of computing -inf - -inf). FTZ: the exps by _exp_ftz.
    """
    NEG_INF: tl.constexpr = float("-inf")
    m = tl.full([], NEG_INF, ACC)  # running max
    se = tl.zeros([BLOCK], ACC)  # per-lane sum exp(x - m_ref)
    wxs = tl.zeros([BLOCK], ACC)  # per-lane sum w*(x - m_ref)
    wsum = tl.zeros([BLOCK], ACC)  # per-lane sum w
    if PREFETCH:
        x_next = x_first
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        if PREFETCH:
            x = x_next.to(ACC)
            x_next = _load_block(x_row, stride_c, start + BLOCK, n_cols, BLOCK)
        else:
            x = _load_block(x_row, stride_c, start, n_cols, BLOCK).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        # exp(m - m_ref) is 0 while m is -inf (the sums are still 0), <= 1 otherwise
        se = se * _exp_ftz(m - m_ref, FTZ) + _exp_ftz(x - m_ref, FTZ)
        if SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = mask.to(ACC)
            # re-reference sum w*(x - m) from the old max to the new one; every term
            # stays <= 0, so nothing cancels
            m_ref_old = tl.where(m == NEG_INF, 0.0, m)
            wxs = wxs - (m_ref - m_ref_old) * wsum + tl.where(mask, w * (x - m_ref), 0.0)
            wsum += w
        m = m_new
    m = tl.where(m == NEG_INF, 0.0, m)
    return m, tl.log(tl.sum(se, 0)), tl.sum(wxs, 0), tl.sum(wsum, 0)


@triton.jit
def _block_stats(x, cols, w_ptr, n_cols, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 SMOOTH: tl.constexpr, FTZ: tl.constexpr):
    """(m, se, wxs, wsum) of one block ``x`` (-inf past n_cols), already loaded: its max
    (0 if all -inf), sum_c exp(x_c - m), and with SMOOTH sum_c w_c*(x_c - m), sum_c w_c."""
    m = tl.max(x, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    se = tl.sum(_exp_ftz(x - m, FTZ), 0)
    wxs = tl.zeros([], ACC)
    wsum = tl.zeros([], ACC)
    if SMOOTH:
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
        else:
            w = mask.to(ACC)
        wxs = tl.sum(tl.where(mask, w * (x - m), 0.0), 0)
        wsum = tl.sum(w, 0)
    return m, se, wxs, wsum


@triton.jit
def _block_lse(x, cols, w_ptr, n_cols, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               SMOOTH: tl.constexpr):
    """_online_lse of a row that is one block ``x`` (-inf past n_cols), already loaded:
    the same (m, log_se, wxs, wsum) as that loop's single step."""
    m, se, wxs, wsum = _block_stats(x, cols, w_ptr, n_cols, ACC, HAS_WEIGHT, SMOOTH, False)
    return m, tl.log(se), wxs, wsum


@triton.jit
def _index_loss(x_t, w_t, m, log_se, wsum, wxs, eps, C, SMOOTH: tl.constexpr):
    """An index-target row's loss from sweep 1's statistics (_online_lse; per pixel in the
    tile kernels): (1-eps)*w_t*(lse - x_t) plus eps/C*(wsum*log_se - wxs) with smoothing.
    lse - x_t is taken as (m - x_t) + log_se, without rounding lse first (its ulp is 1e-3
    at 1e4 in fp32); the smoothing term adds two non-negative numbers."""
    loss = (1.0 - eps) * w_t * ((m - x_t) + log_se)
    if SMOOTH:
        loss += eps / C * (wsum * log_se - wxs)
    return loss


@triton.jit
def _index_grad_coefs(s, eps, w_t, C, wsum_ptr, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      SMOOTH: tl.constexpr, LOG_PROBS: tl.constexpr):
    """(a, b, e) of _index_grad_sweep for a row with scale s (k_r/W or k_r, times
    grad_loss in backward); wsum_ptr holds sum_c w_c."""
    b = s * (1.0 - eps) * w_t
    e = s * eps / C
    a = b
    if SMOOTH:
        if not LOG_PROBS:
            if HAS_WEIGHT:
                a = b + e * tl.load(wsum_ptr).to(ACC)
            else:
                a = b + e * C
    return a, b, e


@triton.jit
def _index_grad_sweep(x_row, stride_c, g_row, stride_gc, w_ptr, C, n_cols, t, m, log_se,
                      active, ignored, a, b, e, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                      SMOOTH: tl.constexpr, LOG_PROBS: tl.constexpr, BLOCK: tl.constexpr,
                      EVICT_FIRST_STORE: tl.constexpr, FTZ: tl.constexpr):
    """Sweep 2 of an index-target row: g_c = a*p_c - b*[c == t] - e*w_c.

    That is docs/ops.md's gradient with a = s*((1-eps)*w_t + eps/C*wsum),
    b = s*(1-eps)*w_t, e = s*eps/C (log_probs: no p term), and
    p_c = exp((x_c - m) - log_se). With m + log_se = lse, subtracting m first keeps p
    accurate for logits near +-1e4, where an fp32 lse has an ulp of 1e-3 (the backward
    kernel has only the saved lse and passes m = lse, log_se = 0). Ignored rows get
    exactly 0 and rows with an out-of-range target nan, without reading x: n_cols
    (C for an active row, else 0) bounds the loads. EVICT_FIRST_STORE marks the gradient's
    lines first to go from L2 (_GRAD_LAUNCH "evict_first_store"), so that they do not push
    out logits other rows have yet to re-read. FTZ: p_c by _exp_ftz (_FTZ_EXP).
    """
    n_blocks = tl.cdiv(C, BLOCK)
    for i in range(0, n_blocks):
        # reverse order: the row's tail, read last by sweep 1, is the likeliest in L2
        start = (n_blocks - 1 - i) * BLOCK
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        cols64 = cols.to(tl.int64)
        x = tl.zeros([BLOCK], ACC)
        if not LOG_PROBS:
            x = tl.load(x_row + cols64 * stride_c, mask=cols < n_cols, other=0.0,
                        eviction_policy="evict_first").to(ACC)
        g = _index_grad_block(x, cols, w_ptr, n_cols, t, m, log_se, active, ignored, a, b, e,
                              ACC, HAS_WEIGHT, SMOOTH, LOG_PROBS, FTZ)
        _store_grad(g_row + cols64 * stride_gc, g, mask, EVICT_FIRST_STORE)


@triton.jit
def _store_grad(ptrs, g, mask, EVICT_FIRST: tl.constexpr):
    """Stores a gradient block in the pointers' dtype; EVICT_FIRST marks its lines first
    to leave L2 (see _index_grad_sweep)."""
    if EVICT_FIRST:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask, eviction_policy="evict_first")
    else:
        tl.store(ptrs, g.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _index_grad_block(x, cols, w_ptr, n_cols, t, m, log_se, active, ignored, a, b, e,
                      ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                      LOG_PROBS: tl.constexpr, FTZ: tl.constexpr):
    """The gradient of one block of classes `cols` with logits x (unused with LOG_PROBS):
    g_c = a*p_c - b*[c == t] - e*w_c, exactly 0 for ignored rows, nan for invalid ones."""
    g = tl.where(cols == t, -b, 0.0)
    if not LOG_PROBS:
        g += a * _exp_ftz((x - m) - log_se, FTZ)
    if SMOOTH:
        if HAS_WEIGHT:
            g -= e * tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(ACC)
        else:
            g -= e
    return tl.where(active, g, tl.where(ignored, 0.0, float("nan")))


@triton.jit
def _prob_grad_sweep(x_row, stride_c, y_row, stride_yc, g_row, stride_gc, w_ptr, C, m, log_se,
                     wysum, s, keep, smooth_add, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Sweep 2 of a probability-target row: g_c = s*(p_c*sum_j w_j*y'_j - w_c*y'_c),
    with y'_c = keep*y_c + smooth_add (keep = 1-eps, smooth_add = eps/C) and
    p_c = exp((x_c - m) - log_se) as in _index_grad_sweep."""
    n_blocks = tl.cdiv(C, BLOCK)
    for i in range(0, n_blocks):
        start = (n_blocks - 1 - i) * BLOCK  # reverse order, see _index_grad_sweep
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        cols64 = cols.to(tl.int64)
        x = tl.load(x_row + cols64 * stride_c, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(ACC)
        y = tl.load(y_row + cols64 * stride_yc, mask=mask, other=0.0,
                    eviction_policy="evict_first").to(ACC)
        wy = keep * y + smooth_add
        if HAS_WEIGHT:
            wy = wy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
        g = s * (tl.exp((x - m) - log_se) * wysum - wy)
        tl.store(g_row + cols64 * stride_gc, g.to(g_row.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _ce_fwd_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                   R, C, S, stride_n, stride_c, stride_s, ignore_index, eps_hi, eps_lo,
                   HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, LOG_PROBS: tl.constexpr,
                   COMPUTE_GRAD: tl.constexpr, MEAN: tl.constexpr, PREFETCH: tl.constexpr,
                   BLOCK: tl.constexpr, GRAD_EVICT_FIRST: tl.constexpr,
                   ONE_BLOCK: tl.constexpr, GROUP: tl.constexpr, FTZ: tl.constexpr):
    """Index targets: per-row loss and lse, and (COMPUTE_GRAD) the gradient for
    grad_loss = 1. den_ptr: W (read when MEAN and COMPUTE_GRAD); wsum_ptr: sum_c w_c
    (read when HAS_WEIGHT, SMOOTH, COMPUTE_GRAD and not LOG_PROBS).

    Rows r = program_id, program_id + num_programs, ...: one row per program with
    the default grid of R programs; a smaller (persistent) grid bounds the rows in
    flight, e.g. so that the gradient sweep re-reads each row from L2 (see
    _PROGRAMS_PER_SM).

    ONE_BLOCK (C <= BLOCK, with COMPUTE_GRAD and logits): the row is one block, kept in
    registers from sweep 1 to the gradient, so the logits are read once (no second
    sweep through L2). GROUP > 0 (not with ONE_BLOCK): sweep 1 keeps its running max per
    vector of GROUP classes (_online_lse_groups, _PER_VECTOR_MAX). FTZ (fp32
    accumulation, compiled code): the exps of the sweeps as single ex2.approx.ftz
    instructions (_exp_ftz, _FTZ_EXP)."""
    for row in range(tl.program_id(0), R, tl.num_programs(0)):
        _ce_fwd_row(row, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                    C, S, stride_n, stride_c, stride_s, ignore_index, eps_hi, eps_lo,
                    HAS_WEIGHT, SMOOTH, LOG_PROBS, COMPUTE_GRAD, MEAN, PREFETCH, BLOCK,
                    GRAD_EVICT_FIRST, ONE_BLOCK, GROUP, FTZ)


@triton.jit
def _ce_fwd_row(row, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                C, S, stride_n, stride_c, stride_s, ignore_index, eps_hi, eps_lo,
                HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, LOG_PROBS: tl.constexpr,
                COMPUTE_GRAD: tl.constexpr, MEAN: tl.constexpr, PREFETCH: tl.constexpr,
                BLOCK: tl.constexpr, GRAD_EVICT_FIRST: tl.constexpr, ONE_BLOCK: tl.constexpr,
                GROUP: tl.constexpr, FTZ: tl.constexpr):
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    IN_REGISTERS: tl.constexpr = ONE_BLOCK and (COMPUTE_GRAD and not LOG_PROBS)  # (triton 3.2: no chains)
    GROUPED: tl.constexpr = (GROUP > 0) and (not IN_REGISTERS)
    row, x_off, g_off = _offsets_of_row(row, S, stride_n, stride_s, C)
    x_row = x_ptr + x_off
    if PREFETCH:  # (logits only) issued before anything waits for the row's target; an
        # ignored row reads this block for nothing
        if GROUPED:
            x_first = _load_groups(x_row, stride_c, 0, C, BLOCK, GROUP)
        else:
            x_first = _load_block(x_row, stride_c, 0, C, BLOCK)
    else:
        x_first = None
    t, active, ignored = _index_target(t_ptr, row, C, ignore_index)
    t_safe = tl.where(active, t, 0)
    n_cols = tl.where(active, C, 0)  # skip the reads of ignored / invalid rows
    # Triton passes Python floats as fp32: eps = hi + lo recovers ~48 bits for fp64
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo

    x_t = tl.load(x_row + t_safe * stride_c, mask=active, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t_safe, mask=active, other=0.0).to(ACC)
    else:
        w_t = tl.full([], 1.0, ACC)

    if LOG_PROBS:
        # nll_loss on log-probabilities: lp = x, lse = 0
        lse = tl.zeros([], ACC)
        m = lse
        log_se = lse
        loss = (1.0 - eps) * w_t * (-x_t)
        if SMOOTH:
            wx = tl.zeros([BLOCK], ACC)
            for start in range(0, n_cols, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n_cols
                x = tl.load(x_row + cols.to(tl.int64) * stride_c, mask=mask,
                            other=0.0).to(ACC)
                if HAS_WEIGHT:
                    x *= tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
                wx += tl.where(mask, x, 0.0)
            loss += eps / C * (-tl.sum(wx, 0))
    elif IN_REGISTERS:
        cols = tl.arange(0, BLOCK)
        # kept in the logits' dtype (half the registers for bf16), converted at each use
        if PREFETCH:
            x_reg = tl.where(cols < n_cols, x_first, float("-inf"))
        else:
            x_reg = _load_block(x_row, stride_c, 0, n_cols, BLOCK)
        m, log_se, wxs, wsum_row = _block_lse(x_reg.to(ACC), cols, w_ptr, n_cols, ACC,
                                              HAS_WEIGHT, SMOOTH)
        lse = m + log_se
        loss = _index_loss(x_t, w_t, m, log_se, wsum_row, wxs, eps, C, SMOOTH)
    else:
        if GROUPED:
            m, log_se, wxs, wsum_row = _online_lse_groups(x_row, stride_c, w_ptr, n_cols,
                                                          x_first, ACC, HAS_WEIGHT, SMOOTH,
                                                          PREFETCH, BLOCK, GROUP, FTZ)
        else:
            m, log_se, wxs, wsum_row = _online_lse(x_row, stride_c, w_ptr, n_cols, x_first,
                                                   ACC, HAS_WEIGHT, SMOOTH, PREFETCH, BLOCK, FTZ)
        lse = m + log_se
        loss = _index_loss(x_t, w_t, m, log_se, wsum_row, wxs, eps, C, SMOOTH)

    loss = tl.where(active, loss, tl.where(ignored, 0.0, float("nan")))
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))

    if COMPUTE_GRAD:
        if MEAN:
            s = 1.0 / tl.load(den_ptr).to(ACC)
        else:
            s = tl.full([], 1.0, ACC)
        a, b, e = _index_grad_coefs(s, eps, w_t, C, wsum_ptr, ACC, HAS_WEIGHT, SMOOTH,
                                    LOG_PROBS)
        # The gradient may be written over x (in-place forward): every thread has read
        # x_t (above) before any thread writes. The reductions of sweep 1 already order
        # that, but LOG_PROBS without smoothing has no sweep 1 (one bar.sync per row).
        tl.debug_barrier()
        if IN_REGISTERS:
            g = _index_grad_block(x_reg.to(ACC), cols, w_ptr, n_cols, t, m, log_se, active,
                                  ignored, a, b, e, ACC, HAS_WEIGHT, SMOOTH, LOG_PROBS, FTZ)
            _store_grad(g_ptr + g_off + cols.to(tl.int64) * S, g, cols < C, GRAD_EVICT_FIRST)
        else:
            _index_grad_sweep(x_row, stride_c, g_ptr + g_off, S, w_ptr, C, n_cols, t, m,
                              log_se, active, ignored, a, b, e, ACC, HAS_WEIGHT, SMOOTH,
                              LOG_PROBS, BLOCK, GRAD_EVICT_FIRST, FTZ)


@triton.jit
def _ce_split_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                     part_ptr, xt_ptr, cnt_ptr, R, C, S, stride_n, stride_c, stride_s,
                     ignore_index, eps_hi, eps_lo, chunk,
                     HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, MEAN: tl.constexpr,
                     PARTS: tl.constexpr, RECORDS: tl.constexpr, PHASE: tl.constexpr,
                     ONE_BLOCK: tl.constexpr, BLOCK: tl.constexpr, FTZ: tl.constexpr,
                     HOLD: tl.constexpr):
    """_ce_fwd_kernel with COMPUTE_GRAD (index targets, not LOG_PROBS), each row cut
    into PARTS chunks of `chunk` classes (a multiple of BLOCK); work item k is chunk
    k % PARTS of row k // PARTS. Each item publishes its chunk's partial sums
    (_split_publish), then, once the row's PARTS records are in, combines them and
    writes its chunk's gradient (_split_finish; _split_part for chunks of several blocks).

    PHASE 0: one launch; a program takes work items in increasing order from a ticket
    counter (cnt_ptr[R]) and waits for a row's other parts on a per-row counter.
    With ONE_BLOCK (chunk == BLOCK) it is pipelined: a program publishes item k (its
    chunk loaded into registers) before it finishes its previous item k'. HOLD
    (_SPLIT_HOLD): k' is still in registers, so the logits are read once; otherwise the
    chunk of k' is read again after k is published (from L2, an item later): fewer
    registers (triton 3.6, sm_90, bf16, 4096-class chunks of 8 warps: 64 instead of 79),
    so more programs per SM. The wait for the row of k' is usually over at once (the
    row's other parts were published about an item earlier). Deadlock-free for any grid
    with more than PARTS / 2 programs resident: a program waits only on a row whose tickets are all handed out, whose
    items are then all published (a ticket's publish never waits), or on the newest
    row, in which each waiting program holds two tickets, so with more than PARTS / 2
    waiting programs that row is complete. The launcher requires PARTS <= SMs / 2 with
    at least one program per SM (a margin for kernels on other streams). Without
    ONE_BLOCK a program publishes an item and waits for its row at once (_split_part).
    PHASE 1 / 2: publish / finish as two launches with a static split of the items
    (Triton's interpreter runs programs one after another).
    """
    total = R * PARTS
    if ONE_BLOCK:
        if PHASE == 0:
            k = tl.atomic_add(cnt_ptr + R, 1, sem="relaxed", scope="gpu")
            x_prev = _split_load(k, total, x_ptr, C, S, stride_n, stride_c, stride_s, chunk,
                                 PARTS, BLOCK)
            _split_publish(k, total, x_prev, x_ptr, t_ptr, w_ptr, part_ptr, xt_ptr, cnt_ptr,
                           C, S, stride_n, stride_c, stride_s, ignore_index, chunk,
                           HAS_WEIGHT, SMOOTH, PARTS, True, BLOCK, FTZ)
            prev = k
            while prev < total:
                k = tl.atomic_add(cnt_ptr + R, 1, sem="relaxed", scope="gpu")
                x_cur = _split_load(k, total, x_ptr, C, S, stride_n, stride_c, stride_s,
                                    chunk, PARTS, BLOCK)
                # publish k before waiting for the row of k' (deadlock freedom, above)
                _split_publish(k, total, x_cur, x_ptr, t_ptr, w_ptr, part_ptr, xt_ptr,
                               cnt_ptr, C, S, stride_n, stride_c, stride_s, ignore_index,
                               chunk, HAS_WEIGHT, SMOOTH, PARTS, True, BLOCK, FTZ)
                if not HOLD:  # the previous chunk again, from L2 (fewer registers)
                    x_prev = _split_load(prev, total, x_ptr, C, S, stride_n, stride_c,
                                         stride_s, chunk, PARTS, BLOCK)
                _split_finish(prev, x_prev, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr,
                              den_ptr, wsum_ptr, part_ptr, xt_ptr, cnt_ptr, C, S, stride_n,
                              stride_s, ignore_index, eps_hi, eps_lo, chunk, HAS_WEIGHT,
                              SMOOTH, MEAN, PARTS, RECORDS, True, BLOCK, FTZ)
                x_prev = x_cur
                prev = k
        else:
            for k in range(tl.program_id(0), total, tl.num_programs(0)):
                x = _split_load(k, total, x_ptr, C, S, stride_n, stride_c, stride_s, chunk,
                                PARTS, BLOCK)
                if PHASE == 1:
                    _split_publish(k, total, x, x_ptr, t_ptr, w_ptr, part_ptr, xt_ptr,
                                   cnt_ptr, C, S, stride_n, stride_c, stride_s, ignore_index,
                                   chunk, HAS_WEIGHT, SMOOTH, PARTS, False, BLOCK, FTZ)
                else:
                    _split_finish(k, x, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr,
                                  den_ptr, wsum_ptr, part_ptr, xt_ptr, cnt_ptr, C, S, stride_n,
                                  stride_s, ignore_index, eps_hi, eps_lo, chunk, HAS_WEIGHT,
                                  SMOOTH, MEAN, PARTS, RECORDS, False, BLOCK, FTZ)
    elif PHASE == 0:
        k = tl.atomic_add(cnt_ptr + R, 1, sem="relaxed", scope="gpu")
        while k < total:
            _split_part(k // PARTS, k % PARTS, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr,
                        den_ptr, wsum_ptr, part_ptr, xt_ptr, cnt_ptr, C, S, stride_n,
                        stride_c, stride_s, ignore_index, eps_hi, eps_lo, chunk, HAS_WEIGHT,
                        SMOOTH, MEAN, PARTS, RECORDS, PHASE, BLOCK)
            k = tl.atomic_add(cnt_ptr + R, 1, sem="relaxed", scope="gpu")
    else:
        for k in range(tl.program_id(0), total, tl.num_programs(0)):
            _split_part(k // PARTS, k % PARTS, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr,
                        den_ptr, wsum_ptr, part_ptr, xt_ptr, cnt_ptr, C, S, stride_n,
                        stride_c, stride_s, ignore_index, eps_hi, eps_lo, chunk, HAS_WEIGHT,
                        SMOOTH, MEAN, PARTS, RECORDS, PHASE, BLOCK)


@triton.jit
def _split_item(k, total, C, S, stride_n, stride_s, chunk, PARTS: tl.constexpr):
    """Work item k of a split row: (row, part, x_off, g_off, c0, n) with the offsets of
    _offsets_of_row, the chunk's first class c0 and its number of classes n (0 for
    k >= total, an item past the last)."""
    k = tl.full([], 0, tl.int64) + k  # (a Python int in the interpreter's loops)
    part = k % PARTS
    row, x_off, g_off = _offsets_of_row(k // PARTS, S, stride_n, stride_s, C)
    c0 = part * chunk
    n = tl.where(k < total, tl.maximum(tl.minimum(c0 + chunk, C) - c0, 0), 0)
    return row, part, x_off, g_off, c0, n


@triton.jit
def _split_load(k, total, x_ptr, C, S, stride_n, stride_c, stride_s, chunk,
                PARTS: tl.constexpr, BLOCK: tl.constexpr):
    """Item k's chunk (one block, -inf past its classes), in the logits' dtype. Loaded
    whatever the row's target, so that the loads need not wait for it: an ignored row's
    chunk is read for nothing."""
    row, part, x_off, g_off, c0, n = _split_item(k, total, C, S, stride_n, stride_s, chunk,
                                                 PARTS)
    cols = tl.arange(0, BLOCK)
    return tl.load(x_ptr + x_off + (c0 + cols.to(tl.int64)) * stride_c, mask=cols < n,
                   other=float("-inf"))


@triton.jit
def _split_publish(k, total, x, x_ptr, t_ptr, w_ptr, part_ptr, xt_ptr, cnt_ptr, C, S,
                   stride_n, stride_c, stride_s, ignore_index, chunk, HAS_WEIGHT: tl.constexpr,
                   SMOOTH: tl.constexpr, PARTS: tl.constexpr, RELEASE: tl.constexpr,
                   BLOCK: tl.constexpr, FTZ: tl.constexpr):
    """Item k (< total) publishes (m, se, wxs, wsum) of its chunk x (_block_stats) in
    part_ptr[row, part, 0:4]: se == 0 for an empty or all -inf chunk, which then takes no
    part in the row's max; part 0 also the target logit in xt_ptr[row]. RELEASE: then
    counts the item in cnt_ptr[row] with release semantics. Nothing for k >= total."""
    if k < total:
        ACC: tl.constexpr = part_ptr.dtype.element_ty
        row, part, x_off, g_off, c0, n = _split_item(k, total, C, S, stride_n, stride_s,
                                                     chunk, PARTS)
        t, active, ignored = _index_target(t_ptr, row, C, ignore_index)
        n_cols = tl.where(active, n, 0)
        cols = tl.arange(0, BLOCK)
        xa = tl.where(cols < n_cols, x.to(ACC), float("-inf"))
        m, se, wxs, wsum = _block_stats(xa, cols, w_ptr + c0, n_cols, ACC, HAS_WEIGHT, SMOOTH,
                                        FTZ)
        _split_record(row, part, m, se, wxs, wsum, x_ptr + x_off, stride_c, t, active,
                      part_ptr, xt_ptr, cnt_ptr, PARTS, RELEASE)


@triton.jit
def _split_record(row, part, m, se, wxs, wsum, x_row, stride_c, t, active, part_ptr, xt_ptr,
                  cnt_ptr, PARTS: tl.constexpr, RELEASE: tl.constexpr):
    """Stores a chunk's (m, se, wxs, wsum) in part_ptr[row, part, 0:4] and, for part 0,
    the target logit in xt_ptr[row]; RELEASE: then counts the item in cnt_ptr[row] with
    release semantics."""
    record = part_ptr + (row * PARTS + part) * 4
    tl.store(record, m)
    tl.store(record + 1, se)
    tl.store(record + 2, wxs)
    tl.store(record + 3, wsum)
    if part == 0:
        x_t = tl.load(x_row + tl.where(active, t, 0) * stride_c, mask=active, other=0.0)
        tl.store(xt_ptr + row, x_t.to(xt_ptr.dtype.element_ty))
    if RELEASE:
        # every thread's record stores before the release (debug_barrier = bar.sync)
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr + row, 1, sem="release", scope="gpu")


@triton.jit
def _split_wait(cnt_ptr, row, PARTS: tl.constexpr):
    """Spins until the row's PARTS items are counted (acquire: their records visible)."""
    arrived = tl.atomic_add(cnt_ptr + row, 0, sem="acquire", scope="gpu")
    while arrived < PARTS:
        arrived = tl.atomic_add(cnt_ptr + row, 0, sem="acquire", scope="gpu")


@triton.jit
def _split_finish(k, x, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                  part_ptr, xt_ptr, cnt_ptr, C, S, stride_n, stride_s, ignore_index, eps_hi,
                  eps_lo, chunk, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                  MEAN: tl.constexpr, PARTS: tl.constexpr, RECORDS: tl.constexpr,
                  WAIT: tl.constexpr, BLOCK: tl.constexpr, FTZ: tl.constexpr):
    """Item k (< total) with its chunk x still in registers: (WAIT, an active row) waits
    until the row's PARTS items are published, combines their records, writes the loss
    and lse (part 0) and the chunk's gradient. An ignored or invalid row needs no other
    part (loss 0 / nan, gradient 0 / nan), so it does not wait."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row, part, x_off, g_off, c0, n = _split_item(k, k + 1, C, S, stride_n, stride_s, chunk,
                                                 PARTS)
    t, active, ignored = _index_target(t_ptr, row, C, ignore_index)
    n_cols = tl.where(active, n, 0)
    if WAIT:
        if active:
            _split_wait(cnt_ptr, row, PARTS)
    m_row, log_se, a, b, e = _split_row(row, part, t, active, ignored, w_ptr, loss_ptr,
                                        lse_ptr, den_ptr, wsum_ptr, part_ptr, xt_ptr, C,
                                        eps_hi, eps_lo, HAS_WEIGHT, SMOOTH, MEAN, PARTS,
                                        RECORDS, ACC)
    cols = tl.arange(0, BLOCK)
    xa = tl.where(cols < n_cols, x.to(ACC), float("-inf"))
    g = _index_grad_block(xa, cols, w_ptr + c0, n_cols, t - c0, m_row, log_se, active, ignored,
                          a, b, e, ACC, HAS_WEIGHT, SMOOTH, False, FTZ)
    tl.store(g_ptr + g_off + (c0 + cols.to(tl.int64)) * S, g.to(g_ptr.dtype.element_ty),
             mask=cols < n)


@triton.jit
def _split_row(row, part, t, active, ignored, w_ptr, loss_ptr, lse_ptr, den_ptr, wsum_ptr,
               part_ptr, xt_ptr, C, eps_hi, eps_lo, HAS_WEIGHT: tl.constexpr,
               SMOOTH: tl.constexpr, MEAN: tl.constexpr, PARTS: tl.constexpr,
               RECORDS: tl.constexpr, ACC: tl.constexpr):
    """Combines the row's PARTS records in part order (one vector load per field,
    reductions of the same compiled layout in every part: identical bits everywhere);
    part 0 writes the row's loss and lse. Returns (m, log_se) about which the gradient
    is taken and its coefficients (a, b, e) (_index_grad_coefs)."""
    NEG_INF: tl.constexpr = float("-inf")
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    ks = tl.arange(0, RECORDS)  # RECORDS = next power of two >= PARTS
    field = part_ptr + row * PARTS * 4 + ks * 4
    m_k = tl.load(field, mask=ks < PARTS, other=0.0, volatile=True)
    se_k = tl.load(field + 1, mask=ks < PARTS, other=0.0, volatile=True)
    m_row = tl.max(tl.where(se_k == 0.0, NEG_INF, m_k), 0)
    m_row = tl.where(m_row == NEG_INF, 0.0, m_row)
    se_row = tl.sum(tl.where(se_k == 0.0, 0.0, se_k * tl.exp(m_k - m_row)), 0)
    wxs_row = tl.zeros([], ACC)
    wsum_row = tl.zeros([], ACC)
    if SMOOTH:
        wxs_k = tl.load(field + 2, mask=ks < PARTS, other=0.0, volatile=True)
        wsum_k = tl.load(field + 3, mask=ks < PARTS, other=0.0, volatile=True)
        # chunk sums are taken about the chunk's own max m_k
        wxs_row = tl.sum(wxs_k + wsum_k * (m_k - m_row), 0)
        wsum_row = tl.sum(wsum_k, 0)
    log_se = tl.log(se_row)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + tl.where(active, t, 0), mask=active, other=0.0).to(ACC)
    else:
        w_t = tl.full([], 1.0, ACC)
    if part == 0:
        x_t = tl.load(xt_ptr + row, volatile=True)
        loss = _index_loss(x_t, w_t, m_row, log_se, wsum_row, wxs_row, eps, C, SMOOTH)
        tl.store(loss_ptr + row, tl.where(active, loss, tl.where(ignored, 0.0, float("nan"))))
        tl.store(lse_ptr + row, tl.where(active, m_row + log_se, 0.0))
    if MEAN:
        s = 1.0 / tl.load(den_ptr).to(ACC)
    else:
        s = tl.full([], 1.0, ACC)
    a, b, e = _index_grad_coefs(s, eps, w_t, C, wsum_ptr, ACC, HAS_WEIGHT, SMOOTH, False)
    return m_row, log_se, a, b, e


@triton.jit
def _split_part(row, part, x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                part_ptr, xt_ptr, cnt_ptr, C, S, stride_n, stride_c, stride_s, ignore_index,
                eps_hi, eps_lo, chunk, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                MEAN: tl.constexpr, PARTS: tl.constexpr, RECORDS: tl.constexpr,
                PHASE: tl.constexpr, BLOCK: tl.constexpr):
    """One chunk of several blocks of one row: the records of _split_publish by an
    online sweep, then (after the row's other parts, in PHASE 0) _split_row and a
    gradient sweep over the chunk. In place (g_ptr == x_ptr) is safe: x_t is read
    before the part is counted, and a part writes only its own chunk, after every part
    has read its own."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row, x_off, g_off = _offsets_of_row(row, S, stride_n, stride_s, C)
    t, active, ignored = _index_target(t_ptr, row, C, ignore_index)
    c0 = (part * chunk).to(tl.int64)
    n = tl.maximum(tl.minimum(c0 + chunk, C) - c0, 0)  # classes of this chunk
    n_cols = tl.where(active, n, 0)  # skip the reads of ignored / invalid rows
    x_chunk = x_ptr + x_off + c0 * stride_c
    if PHASE != 2:
        m, log_se, wxs, wsum = _online_lse(x_chunk, stride_c, w_ptr + c0, n_cols, None,
                                           ACC, HAS_WEIGHT, SMOOTH, False, BLOCK, False)
        _split_record(row, part, m, tl.exp(log_se), wxs, wsum, x_ptr + x_off, stride_c, t,
                      active, part_ptr, xt_ptr, cnt_ptr, PARTS, PHASE == 0)
    if PHASE == 0:
        _split_wait(cnt_ptr, row, PARTS)
    if PHASE != 1:
        m_row, log_se, a, b, e = _split_row(row, part, t, active, ignored, w_ptr, loss_ptr,
                                            lse_ptr, den_ptr, wsum_ptr, part_ptr, xt_ptr, C,
                                            eps_hi, eps_lo, HAS_WEIGHT, SMOOTH, MEAN, PARTS,
                                            RECORDS, ACC)
        _index_grad_sweep(x_chunk, stride_c, g_ptr + g_off + c0 * S, S, w_ptr + c0, n,
                          n_cols, t - c0, m_row, log_se, active, ignored, a, b, e, ACC,
                          HAS_WEIGHT, SMOOTH, False, BLOCK, False, False)


@triton.jit
def _ce_bwd_kernel(gl_ptr, stride_gl, x_ptr, t_ptr, w_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                   C, S, stride_n, stride_c, stride_s, ignore_index, eps_hi, eps_lo,
                   HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, LOG_PROBS: tl.constexpr,
                   MEAN: tl.constexpr, BLOCK: tl.constexpr, FTZ: tl.constexpr):
    """Index targets: gradient times grad_loss (gl_ptr[row*stride_gl]; stride 0 for a
    0-d grad_loss), p recomputed from the saved lse. One sweep. FTZ: see _exp_ftz."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row, x_off, g_off = _row_offsets(S, stride_n, stride_s, C)
    t, active, ignored = _index_target(t_ptr, row, C, ignore_index)
    t_safe = tl.where(active, t, 0)
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo

    s = tl.load(gl_ptr + row * stride_gl).to(ACC)
    if MEAN:
        s = s / tl.load(den_ptr).to(ACC)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t_safe, mask=active, other=0.0).to(ACC)
    else:
        w_t = tl.full([], 1.0, ACC)
    if LOG_PROBS:
        lse = tl.zeros([], ACC)
    else:
        lse = tl.load(lse_ptr + row).to(ACC)
    a, b, e = _index_grad_coefs(s, eps, w_t, C, wsum_ptr, ACC, HAS_WEIGHT, SMOOTH, LOG_PROBS)
    _index_grad_sweep(x_ptr + x_off, stride_c, g_ptr + g_off, S, w_ptr, C,
                      tl.where(active, C, 0), t, lse, tl.zeros([], ACC), active, ignored,
                      a, b, e, ACC, HAS_WEIGHT, SMOOTH, LOG_PROBS, BLOCK, False, FTZ)


@triton.jit
def _ce_prob_fwd_kernel(x_ptr, y_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr,
                        R, C, S, stride_n, stride_c, stride_s,
                        stride_yn, stride_yc, stride_ys, eps_hi, eps_lo,
                        HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                        MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """Probability targets: per-row loss -sum_c w_c*y'_c*lp_c, lse, and (COMPUTE_GRAD)
    the gradient for grad_loss = 1 (scale 1/R for mean)."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    NEG_INF: tl.constexpr = float("-inf")
    row, x_off, g_off = _row_offsets(S, stride_n, stride_s, C)
    y_off = (row // S) * stride_yn + (row % S) * stride_ys
    x_row = x_ptr + x_off
    y_row = y_ptr + y_off
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    keep = 1.0 - eps
    smooth_add = eps / C

    # Sweep 1: online lse as in _online_lse, plus wyx = sum w*y'*(x - m) (re-referenced
    # when m grows) and wysum = sum w*y'; loss = wysum*log_se - wyx.
    m = tl.full([], NEG_INF, ACC)
    se = tl.zeros([BLOCK], ACC)
    wyx = tl.zeros([BLOCK], ACC)
    wys = tl.zeros([BLOCK], ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        cols64 = cols.to(tl.int64)
        x = tl.load(x_row + cols64 * stride_c, mask=mask, other=NEG_INF,
                    eviction_policy="evict_last").to(ACC)
        y = tl.load(y_row + cols64 * stride_yc, mask=mask, other=0.0,
                    eviction_policy="evict_last").to(ACC)
        wy = tl.where(mask, keep * y + smooth_add, 0.0)
        if HAS_WEIGHT:
            wy = wy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        m_ref_old = tl.where(m == NEG_INF, 0.0, m)
        se = se * tl.exp(m - m_ref) + tl.exp(x - m_ref)
        wyx = wyx - (m_ref - m_ref_old) * wys + tl.where(mask, wy * (x - m_ref), 0.0)
        wys += wy
        m = m_new
    m = tl.where(m == NEG_INF, 0.0, m)
    log_se = tl.log(tl.sum(se, 0))
    lse = m + log_se
    wysum = tl.sum(wys, 0)
    tl.store(loss_ptr + row, wysum * log_se - tl.sum(wyx, 0))
    tl.store(lse_ptr + row, lse)

    if COMPUTE_GRAD:
        if MEAN:
            s = tl.full([], 1.0, ACC) / R  # R may arrive as constexpr 1
        else:
            s = tl.full([], 1.0, ACC)
        _prob_grad_sweep(x_row, stride_c, y_row, stride_yc, g_ptr + g_off, S, w_ptr, C, m,
                         log_se, wysum, s, keep, smooth_add, ACC, HAS_WEIGHT, BLOCK)


@triton.jit
def _ce_prob_bwd_kernel(gl_ptr, stride_gl, x_ptr, y_ptr, w_ptr, lse_ptr, g_ptr,
                        R, C, S, stride_n, stride_c, stride_s,
                        stride_yn, stride_yc, stride_ys, eps_hi, eps_lo,
                        HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """Probability targets: gradient times grad_loss from the saved lse. Sweep 1 sums
    w*y' over the targets only; sweep 2 reads x and y and writes the gradient."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    row, x_off, g_off = _row_offsets(S, stride_n, stride_s, C)
    y_row = y_ptr + (row // S) * stride_yn + (row % S) * stride_ys
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    keep = 1.0 - eps
    smooth_add = eps / C

    wys = tl.zeros([BLOCK], ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        y = tl.load(y_row + cols.to(tl.int64) * stride_yc, mask=mask, other=0.0,
                    eviction_policy="evict_last").to(ACC)
        wy = tl.where(mask, keep * y + smooth_add, 0.0)
        if HAS_WEIGHT:
            wy = wy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(ACC)
        wys += wy

    s = tl.load(gl_ptr + row * stride_gl).to(ACC)
    if MEAN:
        s = s / R
    lse = tl.load(lse_ptr + row).to(ACC)
    _prob_grad_sweep(x_ptr + x_off, stride_c, y_row, stride_yc, g_ptr + g_off, S, w_ptr, C,
                     lse, tl.zeros([], ACC), tl.sum(wys, 0), s, keep, smooth_add, ACC,
                     HAS_WEIGHT, BLOCK)


@triton.jit
def _finish_loss_kernel(loss_ptr, den_ptr, out_ptr, R, den_value, t_ptr, w_ptr, C,
                        ignore_index, MEAN: tl.constexpr, DEN_TENSOR: tl.constexpr,
                        DEN_TARGETS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        BLOCK: tl.constexpr, T_BLOCK: tl.constexpr):
    """out = the sum of the R row losses (acc dtype), over den for the mean (den_ptr[0],
    or den_value, or with DEN_TARGETS the weight of the rows' targets, summed here as
    _total_weight_kernel does, so that a forward without gradient needs no launch for
    it; nan when it is 0, as torch), cast to out's dtype; one program."""
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, R, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(loss_ptr + offs, mask=offs < R, other=0.0)
    total = tl.sum(acc, 0)
    if MEAN:
        if DEN_TARGETS:
            den = _weight_of_rows(t_ptr, w_ptr, 0, R, C, ignore_index, ACC, HAS_WEIGHT,
                                  T_BLOCK).to(ACC)
        elif DEN_TENSOR:
            den = tl.load(den_ptr).to(ACC)
        else:
            den = tl.zeros([], ACC) + den_value
        total = tl.where(den == 0, float("nan"), total / den)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit
def _weight_of_rows(t_ptr, w_ptr, start, stop, C, ignore_index, OUT_TY: tl.constexpr,
                    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """The weight of the counted rows (not ignored, class in range) among rows
    [start, stop) of the flat targets: the sum of w[t_r] in OUT_TY, or their count
    (summed in int64, exact) without weights. One read of the targets; the two kernels
    that need W sum it this way, so it has the same bits in both."""
    if HAS_WEIGHT:
        total = tl.zeros([], OUT_TY)
    else:
        total = tl.zeros([], tl.int64)
    for first in range(start, stop, BLOCK):
        offs = first + tl.arange(0, BLOCK)
        mask = offs < stop
        t = tl.load(t_ptr + offs, mask=mask, other=ignore_index).to(tl.int64)
        counted = mask & (t != ignore_index) & (t >= 0) & (t < C)
        if HAS_WEIGHT:
            w = tl.load(w_ptr + t, mask=counted, other=0.0).to(OUT_TY)
            total += tl.sum(w, 0)
        else:
            total += tl.sum(counted.to(tl.int32), 0).to(tl.int64)
    return total


@triton.jit
def _total_weight_kernel(t_ptr, w_ptr, out_ptr, R, C, ignore_index, span,
                         HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """out[pid] = _weight_of_rows over rows [pid*span, (pid+1)*span), stored in out's
    dtype (a count stays exact in an int64 out)."""
    start = tl.program_id(0).to(tl.int64) * span
    stop = tl.minimum(start + span, R)
    total = _weight_of_rows(t_ptr, w_ptr, start, stop, C, ignore_index,
                            out_ptr.dtype.element_ty, HAS_WEIGHT, BLOCK)
    tl.store(out_ptr + tl.program_id(0), total.to(out_ptr.dtype.element_ty))


@triton.jit
def _scale_grad_kernel(g_ptr, gl_ptr, numel, BLOCK: tl.constexpr):
    """g *= gl[0] over a contiguous g; a grid-stride loop over a capped grid.
    With gl[0] == 1 every program returns after one scalar load: no traffic on g."""
    gl = tl.load(gl_ptr)
    if gl != 1:
        if g_ptr.dtype.element_ty == tl.float64:
            f = gl.to(tl.float64)
        else:
            f = gl.to(tl.float32)
        # int64: numel passes 2^31 for 16k x 128k gradients
        pid = tl.program_id(0).to(tl.int64)
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(pid * BLOCK, numel, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            g = tl.load(g_ptr + offs, mask=mask)
            tl.store(g_ptr + offs, (g.to(f.dtype) * f).to(g.dtype), mask=mask)


@triton.jit
def _scale_grad_rows_kernel(g_ptr, gl_ptr, stride_gl, C, S, BLOCK: tl.constexpr):
    """g[n, :, s] *= gl[r] for the contiguous (N, C, S) gradient, one program per row."""
    row, _, g_off = _row_offsets(S, 0, 0, C)
    gl = tl.load(gl_ptr + row * stride_gl)
    if g_ptr.dtype.element_ty == tl.float64:
        f = gl.to(tl.float64)
    else:
        f = gl.to(tl.float32)
    g_row = g_ptr + g_off
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        ptrs = g_row + cols.to(tl.int64) * S
        g = tl.load(ptrs, mask=mask)
        tl.store(ptrs, (g.to(f.dtype) * f).to(g.dtype), mask=mask)


# ---------------------------------------------------------------------------------------
# Tile kernels: short rows, and rows whose classes are strided
#
# One program per row is the wrong shape for two common layouts:
# * (N, C, H, W) contiguous (segmentation): a row's classes sit S = H*W elements apart,
#   so a program per pixel gathers C scattered elements while its neighbours' elements,
#   one element further on, are read by other programs;
# * short rows (e.g. 21 classes, or channels-last logits seen as (N*H*W, C)): a program
#   per row leaves most of its >= 128 lanes idle.
# Here a program takes BLOCK_S rows ("pixels") r = n*S + s of one n, s consecutive, and
# walks their classes in [BLOCK_C, BLOCK_S] tiles. The tile's address is
# c*stride_c + s*stride_s: Triton's JIT turns a stride equal to 1 into a constant, so the
# compiler knows which axis is contiguous and coalesces (and vectorises) along it: the
# pixels for (N, C, H, W), the classes for short unit-stride rows. 2-D input (S = 1) is
# passed as (1, C, N): its rows are the pixels. The math is the row kernels', per pixel.
# ---------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(S, n_sblocks, BLOCK_S: tl.constexpr):
    """This program's pixels: n and BLOCK_S consecutive s (int64), and the mask s < S."""
    pid = tl.program_id(0).to(tl.int64)
    n = pid // n_sblocks
    s = (pid - n * n_sblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    return n, s, s < S


@triton.jit
def _tile_pixels(t_ptr, C, S, n_sblocks, stride_n, stride_s, g_stride_n, g_stride_s,
                 ignore_index, BLOCK_S: tl.constexpr):
    """This program's pixels (_tile_coords): their rows r = n*S + s, x and grad offsets,
    the mask s < S, and their targets as _index_target's (t, active, ignored); pixels
    past S are neither active nor ignored."""
    n, s, s_ok = _tile_coords(S, n_sblocks, BLOCK_S)
    rows = n * S + s
    t = tl.load(t_ptr + rows, mask=s_ok, other=0).to(tl.int64)
    ignored = s_ok & (t == ignore_index)
    active = s_ok & (t >= 0) & (t < C) & (t != ignore_index)
    return rows, n * stride_n + s * stride_s, n * g_stride_n + s * g_stride_s, s_ok, t, \
        active, ignored


@triton.jit
def _tile_load(ptr, offs, c, stride_c, mask, other):
    """The [BLOCK_C, BLOCK_S] tile at classes c of the pixels at offsets offs."""
    return tl.load(ptr + offs[None, :] + c.to(tl.int64)[:, None] * stride_c, mask=mask,
                   other=other)


@triton.jit
def _tile_grad_sweep(x_ptr, x_off, stride_c, g_ptr, g_off, g_stride_c, w_ptr, C, t, m, log_se,
                     active, ignored, s_ok, a, b, e, x_kept, ACC: tl.constexpr,
                     HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr, LOG_PROBS: tl.constexpr,
                     ONE_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """_index_grad_sweep for the tile's pixels (a, b, m, log_se per pixel):
    g_c = a*p_c - b*[c == t] - e*w_c; ONE_BLOCK: the logits are x_kept (C <= BLOCK_C)."""
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        g = tl.where(c[:, None] == t[None, :], -b[None, :], 0.0)
        if not LOG_PROBS:
            if ONE_BLOCK:
                x = x_kept
            else:
                x = _tile_load(x_ptr, x_off, c, stride_c, c_ok[:, None] & s_ok[None, :],
                               0.0).to(ACC)
            g += a[None, :] * tl.exp((x - m[None, :]) - log_se[None, :])
        if SMOOTH:
            if HAS_WEIGHT:
                g -= e * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)[:, None]
            else:
                g -= e
        g = tl.where(active[None, :], g, tl.where(ignored[None, :], 0.0, float("nan")))
        tl.store(g_ptr + g_off[None, :] + c.to(tl.int64)[:, None] * g_stride_c,
                 g.to(g_ptr.dtype.element_ty), mask=c_ok[:, None] & s_ok[None, :])


@triton.jit
def _ce_tile_fwd_kernel(x_ptr, t_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, den_ptr, wsum_ptr,
                        C, S, n_sblocks, stride_n, stride_c, stride_s,
                        g_stride_n, g_stride_c, g_stride_s, ignore_index, eps_hi, eps_lo,
                        HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                        LOG_PROBS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                        MEAN: tl.constexpr, ONE_BLOCK: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """_ce_fwd_kernel for a tile of pixels. ONE_BLOCK (C <= BLOCK_C): the tile read in
    sweep 1 stays in registers for the gradient, so the logits are read once."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    NEG_INF: tl.constexpr = float("-inf")
    rows, x_off, g_off, s_ok, t, active, ignored = _tile_pixels(
        t_ptr, C, S, n_sblocks, stride_n, stride_s, g_stride_n, g_stride_s, ignore_index,
        BLOCK_S)
    t_safe = tl.where(active, t, 0)
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    # x_t: with the pixel's classes in one block (logits, no smoothing) it is picked from
    # that block after sweep 1 (registers: no gather of one element per pixel, no second
    # dependent load after the target's); otherwise loaded here. (With smoothing the
    # extra live values spill 16 bytes with triton 3.6, tests/test_triton_compile.py.)
    X_T_FROM_TILE: tl.constexpr = ONE_BLOCK and (not LOG_PROBS and not SMOOTH)  # (triton 3.2: no chains)
    if X_T_FROM_TILE:
        x_t = tl.zeros([BLOCK_S], ACC)
    else:
        x_t = tl.load(x_ptr + x_off + t_safe * stride_c, mask=active, other=0.0).to(ACC)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t_safe, mask=active, other=0.0).to(ACC)
    else:
        w_t = tl.full([BLOCK_S], 1.0, ACC)
    x_kept = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    if LOG_PROBS:
        m = tl.zeros([BLOCK_S], ACC)
        log_se = m
        lse = m
        loss = (1.0 - eps) * w_t * (-x_t)
        if SMOOTH:
            wx = tl.zeros([BLOCK_S], ACC)
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                mask = (c < C)[:, None] & s_ok[None, :]
                x = _tile_load(x_ptr, x_off, c, stride_c, mask, 0.0).to(ACC)
                if HAS_WEIGHT:
                    x *= tl.load(w_ptr + c, mask=c < C, other=0.0).to(ACC)[:, None]
                wx += tl.sum(tl.where(mask, x, 0.0), 0)
            loss += eps / C * (-wx)
    else:
        # sweep 1: _online_lse per pixel; the smoothing sums as there (wsum is the same
        # for every pixel: the classes seen so far)
        m = tl.full([BLOCK_S], NEG_INF, ACC)
        se = tl.zeros([BLOCK_S], ACC)
        wxs = tl.zeros([BLOCK_S], ACC)
        wsum = tl.zeros([], ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            mask = c_ok[:, None] & s_ok[None, :]
            x = _tile_load(x_ptr, x_off, c, stride_c, mask, NEG_INF).to(ACC)
            if ONE_BLOCK:
                x_kept = x
            m_new = tl.maximum(m, tl.max(x, 0))
            m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
            se = se * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[None, :]), 0)
            if SMOOTH:
                if HAS_WEIGHT:
                    w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)
                else:
                    w = c_ok.to(ACC)
                m_ref_old = tl.where(m == NEG_INF, 0.0, m)
                wxs = wxs - (m_ref - m_ref_old) * wsum + tl.sum(
                    tl.where(mask, w[:, None] * (x - m_ref[None, :]), 0.0), 0)
                wsum += tl.sum(w, 0)
            m = m_new
        m = tl.where(m == NEG_INF, 0.0, m)
        log_se = tl.log(se)
        lse = m + log_se
        if X_T_FROM_TILE:  # exact: the one matching class, plus zeros
            is_t = tl.arange(0, BLOCK_C)[:, None] == t_safe[None, :]
            x_t = tl.where(active, tl.sum(tl.where(is_t, x_kept, 0.0), 0), 0.0)
        loss = _index_loss(x_t, w_t, m, log_se, wsum, wxs, eps, C, SMOOTH)
    loss = tl.where(active, loss, tl.where(ignored, 0.0, float("nan")))
    tl.store(loss_ptr + rows, loss, mask=s_ok)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=s_ok)

    if COMPUTE_GRAD:
        if MEAN:
            scale = 1.0 / tl.load(den_ptr).to(ACC)
        else:
            scale = tl.full([], 1.0, ACC)
        a, b, e = _index_grad_coefs(scale, eps, w_t, C, wsum_ptr, ACC, HAS_WEIGHT, SMOOTH,
                                    LOG_PROBS)
        # in place: every thread has read x_t (another thread's element) before any writes
        tl.debug_barrier()
        _tile_grad_sweep(x_ptr, x_off, stride_c, g_ptr, g_off, g_stride_c, w_ptr, C, t, m,
                         log_se, active, ignored, s_ok, a, b, e, x_kept, ACC, HAS_WEIGHT,
                         SMOOTH, LOG_PROBS, ONE_BLOCK, BLOCK_C, BLOCK_S)


@triton.jit
def _ce_tile_bwd_kernel(gl_ptr, stride_gl, x_ptr, t_ptr, w_ptr, lse_ptr, g_ptr, den_ptr,
                        wsum_ptr, C, S, n_sblocks, stride_n, stride_c, stride_s,
                        g_stride_n, g_stride_c, g_stride_s, ignore_index, eps_hi, eps_lo,
                        HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
                        LOG_PROBS: tl.constexpr, MEAN: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """_ce_bwd_kernel for a tile of pixels: the gradient times grad_loss from the saved lse."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    rows, x_off, g_off, s_ok, t, active, ignored = _tile_pixels(
        t_ptr, C, S, n_sblocks, stride_n, stride_s, g_stride_n, g_stride_s, ignore_index,
        BLOCK_S)
    t_safe = tl.where(active, t, 0)
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    scale = tl.load(gl_ptr + rows * stride_gl, mask=s_ok, other=0.0).to(ACC)
    if MEAN:
        scale = scale / tl.load(den_ptr).to(ACC)
    if HAS_WEIGHT:
        w_t = tl.load(w_ptr + t_safe, mask=active, other=0.0).to(ACC)
    else:
        w_t = tl.full([BLOCK_S], 1.0, ACC)
    if LOG_PROBS:
        lse = tl.zeros([BLOCK_S], ACC)
    else:
        lse = tl.load(lse_ptr + rows, mask=s_ok, other=0.0).to(ACC)
    a, b, e = _index_grad_coefs(scale, eps, w_t, C, wsum_ptr, ACC, HAS_WEIGHT, SMOOTH,
                                LOG_PROBS)
    _tile_grad_sweep(x_ptr, x_off, stride_c, g_ptr, g_off, g_stride_c, w_ptr, C, t, lse,
                     tl.zeros([BLOCK_S], ACC), active, ignored, s_ok, a, b, e, None, ACC,
                     HAS_WEIGHT, SMOOTH, LOG_PROBS, False, BLOCK_C, BLOCK_S)


@triton.jit
def _tile_smoothed_targets(y_ptr, y_off, stride_yc, w_ptr, c, c_ok, mask, keep, smooth_add,
                           ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """w_c*y'_c of a tile (y' = keep*y + smooth_add), 0 outside the mask."""
    y = _tile_load(y_ptr, y_off, c, stride_yc, mask, 0.0).to(ACC)
    wy = tl.where(mask, keep * y + smooth_add, 0.0)
    if HAS_WEIGHT:
        wy = wy * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(ACC)[:, None]
    return wy


@triton.jit
def _tile_prob_grad_sweep(x_ptr, x_off, stride_c, y_ptr, y_off, stride_yc, g_ptr, g_off,
                          g_stride_c, w_ptr, C, m, log_se, wysum, scale, keep, smooth_add,
                          s_ok, x_kept, wy_kept, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                          ONE_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    """_prob_grad_sweep for the tile's pixels: g_c = scale*(p_c*sum_j w_j*y'_j - w_c*y'_c);
    ONE_BLOCK: x and w*y' are x_kept and wy_kept (C <= BLOCK_C)."""
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = c_ok[:, None] & s_ok[None, :]
        if ONE_BLOCK:
            x = x_kept
            wy = wy_kept
        else:
            x = _tile_load(x_ptr, x_off, c, stride_c, mask, 0.0).to(ACC)
            wy = _tile_smoothed_targets(y_ptr, y_off, stride_yc, w_ptr, c, c_ok, mask, keep,
                                        smooth_add, ACC, HAS_WEIGHT)
        p = tl.exp((x - m[None, :]) - log_se[None, :])
        g = scale[None, :] * (p * wysum[None, :] - wy)
        tl.store(g_ptr + g_off[None, :] + c.to(tl.int64)[:, None] * g_stride_c,
                 g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_prob_tile_fwd_kernel(x_ptr, y_ptr, w_ptr, loss_ptr, lse_ptr, g_ptr, R, C, S, n_sblocks,
                             stride_n, stride_c, stride_s, stride_yn, stride_yc, stride_ys,
                             g_stride_n, g_stride_c, g_stride_s, eps_hi, eps_lo,
                             HAS_WEIGHT: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                             MEAN: tl.constexpr, ONE_BLOCK: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """_ce_prob_fwd_kernel for a tile of pixels; ONE_BLOCK keeps x and w*y' in registers."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    NEG_INF: tl.constexpr = float("-inf")
    n, s, s_ok = _tile_coords(S, n_sblocks, BLOCK_S)
    rows = n * S + s
    x_off = n * stride_n + s * stride_s
    y_off = n * stride_yn + s * stride_ys
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    keep = 1.0 - eps
    smooth_add = eps / C
    m = tl.full([BLOCK_S], NEG_INF, ACC)
    se = tl.zeros([BLOCK_S], ACC)
    wyx = tl.zeros([BLOCK_S], ACC)  # sum w*y'*(x - m), re-referenced when m grows
    wys = tl.zeros([BLOCK_S], ACC)  # sum w*y'
    x_kept = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    wy_kept = tl.zeros([BLOCK_C, BLOCK_S], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = c_ok[:, None] & s_ok[None, :]
        x = _tile_load(x_ptr, x_off, c, stride_c, mask, NEG_INF).to(ACC)
        wy = _tile_smoothed_targets(y_ptr, y_off, stride_yc, w_ptr, c, c_ok, mask, keep,
                                    smooth_add, ACC, HAS_WEIGHT)
        if ONE_BLOCK:
            x_kept = x
            wy_kept = wy
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
        m_ref_old = tl.where(m == NEG_INF, 0.0, m)
        se = se * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[None, :]), 0)
        wyx = wyx - (m_ref - m_ref_old) * wys + tl.sum(
            tl.where(mask, wy * (x - m_ref[None, :]), 0.0), 0)
        wys += tl.sum(wy, 0)
        m = m_new
    m = tl.where(m == NEG_INF, 0.0, m)
    log_se = tl.log(se)
    tl.store(loss_ptr + rows, wys * log_se - wyx, mask=s_ok)
    tl.store(lse_ptr + rows, m + log_se, mask=s_ok)

    if COMPUTE_GRAD:
        if MEAN:
            scale = tl.full([BLOCK_S], 1.0, ACC) / R  # R may arrive as constexpr 1
        else:
            scale = tl.full([BLOCK_S], 1.0, ACC)
        tl.debug_barrier()  # in place: every tile element read before any is written
        _tile_prob_grad_sweep(x_ptr, x_off, stride_c, y_ptr, y_off, stride_yc, g_ptr,
                              n * g_stride_n + s * g_stride_s, g_stride_c, w_ptr, C, m,
                              log_se, wys, scale, keep, smooth_add, s_ok, x_kept, wy_kept,
                              ACC, HAS_WEIGHT, ONE_BLOCK, BLOCK_C, BLOCK_S)


@triton.jit
def _ce_prob_tile_bwd_kernel(gl_ptr, stride_gl, x_ptr, y_ptr, w_ptr, lse_ptr, g_ptr, R, C, S,
                             n_sblocks, stride_n, stride_c, stride_s, stride_yn, stride_yc,
                             stride_ys, g_stride_n, g_stride_c, g_stride_s, eps_hi, eps_lo,
                             HAS_WEIGHT: tl.constexpr, MEAN: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """_ce_prob_bwd_kernel for a tile of pixels: sum w*y' over the targets, then the
    gradient times grad_loss from the saved lse."""
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    n, s, s_ok = _tile_coords(S, n_sblocks, BLOCK_S)
    rows = n * S + s
    y_off = n * stride_yn + s * stride_ys
    eps = (tl.zeros([], ACC) + eps_hi) + eps_lo
    keep = 1.0 - eps
    smooth_add = eps / C
    wys = tl.zeros([BLOCK_S], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = c_ok[:, None] & s_ok[None, :]
        wys += tl.sum(_tile_smoothed_targets(y_ptr, y_off, stride_yc, w_ptr, c, c_ok, mask,
                                             keep, smooth_add, ACC, HAS_WEIGHT), 0)
    scale = tl.load(gl_ptr + rows * stride_gl, mask=s_ok, other=0.0).to(ACC)
    if MEAN:
        scale = scale / R
    lse = tl.load(lse_ptr + rows, mask=s_ok, other=0.0).to(ACC)
    _tile_prob_grad_sweep(x_ptr, n * stride_n + s * stride_s, stride_c, y_ptr, y_off, stride_yc,
                          g_ptr, n * g_stride_n + s * g_stride_s, g_stride_c, w_ptr, C, lse,
                          tl.zeros([BLOCK_S], ACC), wys, scale, keep, smooth_add, s_ok, None,
                          None, ACC, HAS_WEIGHT, False, BLOCK_C, BLOCK_S)


@triton.jit
def _scale_grad_tile_kernel(g_ptr, gl_ptr, stride_gl, C, S, n_sblocks, g_stride_n,
                            g_stride_c, g_stride_s, BLOCK_C: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    """g[n, :, s] *= gl[n*S + s] (_scale_grad_rows_kernel) for a tile of pixels."""
    n, s, s_ok = _tile_coords(S, n_sblocks, BLOCK_S)
    gl = tl.load(gl_ptr + (n * S + s) * stride_gl, mask=s_ok, other=0.0)
    if g_ptr.dtype.element_ty == tl.float64:
        f = gl.to(tl.float64)
    else:
        f = gl.to(tl.float32)
    g_off = n * g_stride_n + s * g_stride_s
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = (c < C)[:, None] & s_ok[None, :]
        ptrs = g_ptr + g_off[None, :] + c.to(tl.int64)[:, None] * g_stride_c
        g = tl.load(ptrs, mask=mask)
        tl.store(ptrs, (g.to(f.dtype) * f[None, :]).to(g.dtype), mask=mask)


# ---------------------------------------------------------------------------------------
# Host-side helpers (torch ops and shape arithmetic only: traceable, no host sync)
# ---------------------------------------------------------------------------------------


class _TilePlan(NamedTuple):
    """A tile kernel launch over the (N, C, S) view: the tile's (N, S) and strides (2-D
    input as (1, C, N)), the contiguous gradient's strides in the same terms, the tile
    shape and the grid."""
    N: int
    S: int
    stride_n: int
    stride_c: int
    stride_s: int
    g_stride_n: int
    g_stride_c: int
    g_stride_s: int
    block_c: int
    block_s: int
    num_warps: int
    rows_as_pixels: bool  # S = 1: the N rows are the pixels of one n

    def strides_of(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(n, c, s) strides of another (N, C, S) view of the input's shape (probability
        targets) in the plan's terms."""
        sn, sc, ss = t.stride()
        return (0, sc, sn) if self.rows_as_pixels else (sn, sc, ss)

    @property
    def n_sblocks(self) -> int:
        return _cdiv(self.S, self.block_s)

    @property
    def grid(self) -> tuple[int]:
        return (self.N * self.n_sblocks,)


def _tile_plan(x: torch.Tensor, heavy: bool = False) -> "_TilePlan | None":
    """The tile launch for the (N, C, S) view x, or None when rows are long (more than
    _TILE_MAX_CLASSES classes) with unit class stride: one program per row serves those.
    ``heavy`` halves the tile, for kernels that keep two tiles (probability targets)."""
    N, C, S = x.shape
    stride_n, stride_c, stride_s = x.stride()
    if not _TILE or (C > _TILE_MAX_CLASSES and stride_c == 1):  # (the LM case: quick)
        return None
    g_stride_n, g_stride_c, g_stride_s = C * S, S, 1  # the gradient is contiguous (N, C, S)
    rows_as_pixels = S == 1
    if rows_as_pixels:
        N, S, stride_n, stride_s, g_stride_n, g_stride_s = 1, N, 0, stride_n, 0, C
    class_strided = stride_c != 1 and C > 1
    classes = max(_next_pow2(C), 2)
    if not _TILE or (classes > _TILE_MAX_CLASSES and not class_strided):
        return None
    elems, elems_unit = (_TILE_ELEMS // 2, _TILE_ELEMS_UNIT // 2) if heavy else \
        (_TILE_ELEMS, _TILE_ELEMS_UNIT)
    if classes <= _TILE_MAX_CLASSES:  # a pixel's classes fit one block: kept in registers
        block_c = classes
        if class_strided:  # at least 16 pixels: a 32-byte sector of bf16 per class
            block_s = max(elems // classes, 16)
        else:
            block_s = max(elems_unit // classes, 2)
    else:
        block_s = _TILE_STRIDED_PIXELS
        block_c = max(elems // block_s, 2)
    block_s = min(block_s, max(_next_pow2(S), 2))
    num_warps = max(1, min(4, block_c * block_s // 128))
    return _TilePlan(N, S, stride_n, stride_c, stride_s, g_stride_n, g_stride_c, g_stride_s,
                     block_c, block_s, num_warps, rows_as_pixels)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_ncs(t: torch.Tensor) -> torch.Tensor:
    """(C,) / (N, C) / (N, C, d1..dk) -> (N, C, S). A view for 1-D/2-D input and for
    K-dim input whose trailing dims merge (reshape copies only when they cannot)."""
    if t.dim() == 1:
        return t.reshape(1, t.shape[0], 1)
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))


def _rows_shape(input: torch.Tensor) -> tuple[int, ...]:
    """Shape of the rows: () for 1-D input, (N, d1..dk) otherwise."""
    if input.dim() == 1:
        return ()
    return (input.shape[0],) + tuple(input.shape[2:])


def _split_float(value: float) -> tuple[float, float]:
    """value = hi + lo with hi, lo exact fp32 numbers (Triton passes floats as fp32)."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    return hi, value - hi


def _grad_loss_arg(grad_loss: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(flat tensor, row stride): stride 0 broadcasts a 0-d grad_loss over the rows."""
    if grad_loss.dim() == 0:
        return grad_loss, 0
    flat = grad_loss.reshape(-1)
    return flat, flat.stride(0)


def _flat_targets(target: torch.Tensor) -> torch.Tensor:
    """The class indices as the kernels read them: packed, 1-D (row r at offset r). A
    copy only when the flat view is strided (a column of a label table, every other
    label, one label expanded to the batch); reshape alone would keep such a stride."""
    t = target.reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def _packed_weight(weight):
    """The class weights as the kernels read them (w[c] at offset c): a copy of C
    values when they are strided (e.g. every other entry of a table), as for targets."""
    return weight if weight is None or weight.is_contiguous() else weight.contiguous()


def _total_weight(target: torch.Tensor, weight, ignore_index: int, C: int,
                  acc: torch.dtype) -> torch.Tensor:
    """W = sum_r k_r*w_{t_r} (0-d, acc dtype); out-of-range targets count 0.

    One kernel reads the (contiguous, flat) targets once, each program summing a span
    of rows (a count in int64 without weights: exact past 2^24 rows); one program up to
    _TOTAL_WEIGHT_SPAN rows, so an LM batch costs one launch, which writes W itself (a
    count of at most 2^16 rows is exact in fp32); otherwise a deterministic torch.sum
    over the programs' partial sums."""
    R = target.numel()
    device = target.device
    if isinstance(R, int) and R <= _TOTAL_WEIGHT_SPAN:
        total = torch.empty((), dtype=acc, device=device)
        wrap_triton(_total_weight_kernel)[(1,)](
            target, weight if weight is not None else total, total, R, C, ignore_index,
            max(R, 1), HAS_WEIGHT=weight is not None, BLOCK=_TOTAL_WEIGHT_BLOCK)
        return total
    # (sym_min/sym_max: no guard on a dynamic batch size under torch.compile)
    programs = torch.sym_max(1, torch.sym_min(_cdiv(R, _TOTAL_WEIGHT_SPAN),
                                              _TOTAL_WEIGHT_MAX_PROGRAMS))
    span = torch.sym_max(_cdiv(R, programs), 1)
    partial = torch.empty(programs, dtype=torch.int64 if weight is None else acc,
                          device=device)
    wrap_triton(_total_weight_kernel)[(programs,)](
        target, weight if weight is not None else partial, partial, R, C, ignore_index, span,
        HAS_WEIGHT=weight is not None, BLOCK=_TOTAL_WEIGHT_BLOCK)
    return partial.sum().to(acc)


def _checked_loss_dtype(loss_dtype, default: torch.dtype) -> torch.dtype:
    """The forward ops' loss dtype: loss_dtype (the schemas' optional argument) or default
    (checked_loss_dtype in csrc/schemas.h for the C++ backends)."""
    if loss_dtype is None:
        return default
    if not loss_dtype.is_floating_point:
        raise ValueError(f"fused_nll: loss_dtype must be a floating dtype; got {loss_dtype}")
    return loss_dtype


def _fused_finish(R, reduction: int, acc: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether _reduce_loss takes one _finish_loss_kernel program: a mean or sum of at
    most _FINISH_MAX_ROWS rows (not a SymInt), and a cast the kernel rounds as torch
    would (fp64 row losses into a half-precision loss: torch's rounding)."""
    exact_cast = acc == torch.float32 or out_dtype == acc
    return (reduction != REDUCTION_NONE and isinstance(R, int) and R <= _FINISH_MAX_ROWS
            and exact_cast)


def _reduce_loss(loss_rows: torch.Tensor, reduction: int, den, rows_shape, out_dtype,
                 targets=None):
    """none -> per-row losses; sum -> the sum in acc; mean -> sum / den (nan for den = 0);
    then cast. Up to _FINISH_MAX_ROWS rows (an LM batch) one program does it all
    (_finish_loss_kernel, see _fused_finish): one launch instead of four or five small
    tensor ops. A mean with den None (only when _fused_finish): that program also sums
    the divisor from targets = (flat targets, weight or None, C, ignore_index)."""
    if reduction == REDUCTION_NONE:
        return loss_rows.reshape(rows_shape).to(out_dtype)
    R = loss_rows.numel()
    mean = reduction == REDUCTION_MEAN
    if _fused_finish(R, reduction, loss_rows.dtype, out_dtype):
        out = torch.empty((), dtype=out_dtype, device=loss_rows.device)
        den_tensor = isinstance(den, torch.Tensor)
        den_targets = mean and den is None
        t, w, C, ignore_index = targets if den_targets else (loss_rows, None, 0, 0)
        wrap_triton(_finish_loss_kernel)[(1,)](
            loss_rows, den if den_tensor else loss_rows, out, R,
            float(den) if mean and not den_tensor and not den_targets else 0.0,
            t, w if w is not None else loss_rows, C, ignore_index, MEAN=mean,
            DEN_TENSOR=den_tensor, DEN_TARGETS=den_targets, HAS_WEIGHT=w is not None,
            BLOCK=_FINISH_BLOCK, T_BLOCK=_TOTAL_WEIGHT_BLOCK, num_warps=8)
        return out
    total = loss_rows.sum()
    if mean:
        total = total / den
        if isinstance(den, torch.Tensor):  # W = 0: nan, as torch (smoothing alone: +inf)
            total = total.masked_fill(den == 0, float("nan"))
    return total.to(out_dtype)


def _empty_grad(input: torch.Tensor) -> torch.Tensor:
    return torch.empty((0,), dtype=input.dtype, device=input.device)


# ---------------------------------------------------------------------------------------
# Launchers (the bodies of the fused_nll::triton_* ops; semantics: docs/ops.md)
# ---------------------------------------------------------------------------------------


@_on_tensor_device("input", 0)
def cross_entropy_fwd(input: torch.Tensor, target: torch.Tensor, weight, ignore_index: int,
                      label_smoothing: float, reduction: int, log_probs: bool,
                      compute_grad: bool, loss_dtype: torch.dtype | None = None):
    """Index-target cross-entropy (log_probs=False) or nll_loss (log_probs=True).

    input: (C,), (N, C) or (N, C, d1..dk), any float dtype and strides; target: (), (N,)
    or (N, d1..dk), any int dtype. Equivalent to
    ``F.cross_entropy(input, target, weight, ignore_index=..., reduction=...,
    label_smoothing=...)`` (``F.nll_loss`` plus smoothing for log_probs=True), except that
    out-of-range targets give a nan row instead of an error.

    Returns (loss, lse, grad_input): loss in loss_dtype, default the input's dtype (rows'
    shape or 0-d); lse (acc dtype, rows' shape; 0 for ignored rows and with log_probs); grad_input (input's shape
    and dtype, contiguous; the gradient for grad_loss = 1) or an empty (0,) tensor.
    """
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device) \
        if compute_grad else None
    loss, lse = _index_fwd(input, target, weight, ignore_index, label_smoothing, reduction,
                           log_probs, grad, loss_dtype)
    return loss, lse, grad if compute_grad else _empty_grad(input)


@_on_tensor_device("input", 0)
def cross_entropy_fwd_inplace(input: torch.Tensor, target: torch.Tensor, weight,
                              ignore_index: int, label_smoothing: float, reduction: int,
                              log_probs: bool, loss_dtype: torch.dtype | None = None):
    """:func:`cross_entropy_fwd` with compute_grad=True, the gradient written over the
    (contiguous) input: each program reads a block of its row before it writes the
    same block, and x_t is loaded before the gradient sweep. Returns (loss, lse)."""
    _check_inplace(input)
    return _index_fwd(input, target, weight, ignore_index, label_smoothing, reduction,
                      log_probs, input, loss_dtype)


def _check_inplace(input: torch.Tensor) -> None:
    if not input.is_contiguous():
        raise ValueError(
            "fused_nll: the in-place forward writes the gradient into `input`, which must be "
            f"contiguous; got strides {list(input.stride())}")


def _index_fwd(input, target, weight, ignore_index, label_smoothing, reduction, log_probs,
               grad, loss_dtype):
    """Loss and lse; the gradient (grad_loss = 1) into `grad`, a contiguous tensor of the
    input's shape (possibly the input itself), unless grad is None."""
    compute_grad = grad is not None
    weight = _packed_weight(weight)
    x = _as_ncs(input)
    N, C, S = x.shape
    R = N * S
    acc = _acc_dtype(input.dtype)
    device = input.device
    rows_shape = _rows_shape(input)
    t = _flat_targets(target)
    loss_rows = torch.empty(R, dtype=acc, device=device)
    lse = torch.empty(rows_shape, dtype=acc, device=device)
    smooth = label_smoothing != 0.0
    mean = reduction == REDUCTION_MEAN
    out_dtype = _checked_loss_dtype(loss_dtype, input.dtype)
    den = None  # W, for the gradient's scale; for the loss alone the finish kernel sums it
    if mean and (compute_grad or not _fused_finish(R, reduction, acc, out_dtype)):
        den = _total_weight(t, weight, ignore_index, C, acc)
    wsum = None
    if weight is not None and smooth and compute_grad and not log_probs:
        wsum = weight.sum(dtype=acc)
    parts = None
    if compute_grad and not log_probs and C >= _SPLIT_MIN_CLASSES and _SPLIT_PARTS:
        # "auto": chunks of one block (_SPLIT_MAX_BLOCK classes at most: kept in registers)
        parts = _cdiv(C, _SPLIT_MAX_BLOCK) if _SPLIT_PARTS == "auto" else _SPLIT_PARTS
    tile = _tile_plan(x) if R > 0 else None
    if tile is not None:
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_tile_fwd_kernel)[tile.grid](
            x, t, weight if weight is not None else lse, loss_rows, lse,
            grad if compute_grad else lse, den if den is not None else lse,
            wsum if wsum is not None else lse, C, tile.S, tile.n_sblocks, tile.stride_n,
            tile.stride_c, tile.stride_s, tile.g_stride_n, tile.g_stride_c, tile.g_stride_s,
            ignore_index, eps_hi, eps_lo, HAS_WEIGHT=weight is not None, SMOOTH=smooth,
            LOG_PROBS=log_probs, COMPUTE_GRAD=compute_grad, MEAN=mean and compute_grad,
            ONE_BLOCK=C <= tile.block_c, BLOCK_C=tile.block_c, BLOCK_S=tile.block_s,
            num_warps=tile.num_warps)
    elif R > 0 and parts:
        _launch_split(x, t, weight, loss_rows, lse, grad, den, wsum, ignore_index,
                      label_smoothing, mean, parts)
    elif R > 0:
        knobs = (_GRAD_LAUNCH or {}) if compute_grad and C >= _GRAD_LAUNCH_MIN_CLASSES else {}
        block, num_warps = _row_config(C, input.element_size(), heavy=smooth and not log_probs,
                                       max_block=knobs.get("max_block"),
                                       per_thread=knobs.get("elems_per_thread"))
        prefetch = knobs.get("prefetch", _PREFETCH) and not log_probs
        one_block = C <= block and compute_grad and not log_probs
        # a 16-byte vector of classes per group (unit class stride: one thread's load)
        group = (16 // input.element_size() if _PER_VECTOR_MAX and not log_probs
                 and not one_block and C > block else 0)
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_fwd_kernel)[(_programs(R, device, knobs.get("programs_per_sm")),)](
            x, t, weight if weight is not None else lse, loss_rows, lse,
            grad if compute_grad else lse, den if den is not None else lse, wsum if wsum is not None else lse,
            R, C, S, x.stride(0), x.stride(1), x.stride(2), ignore_index, eps_hi, eps_lo,
            HAS_WEIGHT=weight is not None, SMOOTH=smooth, LOG_PROBS=log_probs,
            COMPUTE_GRAD=compute_grad, MEAN=mean and compute_grad,
            PREFETCH=prefetch, BLOCK=block,
            GRAD_EVICT_FIRST=bool(knobs.get("evict_first_store", False)),
            ONE_BLOCK=one_block, GROUP=group, FTZ=_ftz(acc, device), num_warps=num_warps)
    loss = _reduce_loss(loss_rows, reduction, den, rows_shape, out_dtype,
                        (t, weight, C, ignore_index))
    return loss, lse


def _launch_split(x, t, weight, loss_rows, lse, grad, den, wsum, ignore_index,
                  label_smoothing, mean, parts):
    """_ce_split_kernel over the (N, C, S) view x: one launch with the in-kernel exchange
    on CUDA (unless _SPLIT_FUSED is False), else two launches."""
    N, C, S = x.shape
    R = N * S
    device = x.device
    acc = lse.dtype
    smooth = label_smoothing != 0.0
    # one block per chunk where it fits (the chunk then stays in registers)
    block = min(max(_next_pow2(_cdiv(C, parts)), _MIN_BLOCK), _SPLIT_MAX_BLOCK)
    num_warps = _SPLIT_NUM_WARPS or min(32, max(4, block // (32 * _SPLIT_ELEMS_PER_THREAD)))
    chunk = _cdiv(_cdiv(C, parts), block) * block
    records = torch.empty(R * parts * 4, dtype=acc, device=device)
    x_t = torch.empty(R, dtype=acc, device=device)
    eps_hi, eps_lo = _split_float(label_smoothing)
    # The interpreter runs programs one after another (also on CUDA tensors): a part
    # spinning for the next program would never return.
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    fused = _SPLIT_FUSED and device.type == "cuda" and not interpreted
    if fused:
        sms = _sms(device)
        # Deadlock-free when at least `parts` programs can run at once. One per SM fits
        # (a few KB of registers), but kernels on other streams may hold SMs: keep a
        # margin of half the SMs; longer splits take two launches.
        fused = parts <= sms // 2
    if fused:
        programs = max(1, min(R * parts, sms * _SPLIT_PROGRAMS_PER_SM))
        counters = torch.zeros(R + 1, dtype=torch.int32, device=device)  # rows, then tickets
    elif _SPLIT_FUSED and interpreted and parts <= 2 and chunk == block:
        # The pipelined launch also runs in the interpreter when a row has at most two
        # parts: its lone running program, waiting for the row of item k', has already
        # published item k' + 1 (tests; one program takes every item).
        fused, programs = True, 1
        counters = torch.zeros(R + 1, dtype=torch.int32, device=device)
    else:
        programs, counters = R * parts, x_t  # counters unused
    for phase in (0,) if fused else (1, 2):
        wrap_triton(_ce_split_kernel)[(programs,)](
            x, t, weight if weight is not None else lse, loss_rows, lse, grad,
            den if den is not None else lse, wsum if wsum is not None else lse,
            records, x_t, counters, R, C, S, x.stride(0), x.stride(1), x.stride(2),
            ignore_index, eps_hi, eps_lo, chunk, HAS_WEIGHT=weight is not None,
            SMOOTH=smooth, MEAN=mean, PARTS=parts, RECORDS=_next_pow2(parts),
            PHASE=phase, ONE_BLOCK=chunk == block, BLOCK=block, FTZ=_ftz(acc, device),
            HOLD=_SPLIT_HOLD, num_warps=num_warps)


@_on_tensor_device("input", 1)
def cross_entropy_bwd(grad_loss: torch.Tensor, input: torch.Tensor, target: torch.Tensor,
                      weight, lse: torch.Tensor, ignore_index: int, label_smoothing: float,
                      reduction: int, log_probs: bool) -> torch.Tensor:
    """Gradient of :func:`cross_entropy_fwd`'s loss times grad_loss (0-d for mean/sum,
    the rows' shape for none), from the saved lse. Returns a new contiguous tensor of
    input's shape and dtype."""
    weight = _packed_weight(weight)
    x = _as_ncs(input)
    N, C, S = x.shape
    R = N * S
    acc = _acc_dtype(input.dtype)
    device = input.device
    t = _flat_targets(target)
    grad = torch.empty(input.shape, dtype=input.dtype, device=device)
    lse_flat = lse.reshape(-1).to(acc).contiguous()
    gl, stride_gl = _grad_loss_arg(grad_loss)
    smooth = label_smoothing != 0.0
    mean = reduction == REDUCTION_MEAN
    den = _total_weight(t, weight, ignore_index, C, acc) if mean else lse_flat
    wsum = lse_flat
    if weight is not None and smooth and not log_probs:
        wsum = weight.sum(dtype=acc)
    tile = _tile_plan(x) if R > 0 else None
    if tile is not None:
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_tile_bwd_kernel)[tile.grid](
            gl, stride_gl, x, t, weight if weight is not None else lse_flat, lse_flat, grad,
            den, wsum, C, tile.S, tile.n_sblocks, tile.stride_n, tile.stride_c, tile.stride_s,
            tile.g_stride_n, tile.g_stride_c, tile.g_stride_s, ignore_index, eps_hi, eps_lo,
            HAS_WEIGHT=weight is not None, SMOOTH=smooth, LOG_PROBS=log_probs, MEAN=mean,
            BLOCK_C=tile.block_c, BLOCK_S=tile.block_s, num_warps=tile.num_warps)
    elif R > 0:
        block, num_warps = _row_config(C, input.element_size())
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_bwd_kernel)[(R,)](
            gl, stride_gl, x, t, weight if weight is not None else lse_flat, lse_flat, grad,
            den, wsum, C, S, x.stride(0), x.stride(1), x.stride(2), ignore_index,
            eps_hi, eps_lo, HAS_WEIGHT=weight is not None, SMOOTH=smooth,
            LOG_PROBS=log_probs, MEAN=mean, BLOCK=block, FTZ=_ftz(acc, x.device),
            num_warps=num_warps)
    return grad


@_on_tensor_device("input", 0)
def cross_entropy_prob_fwd(input: torch.Tensor, target: torch.Tensor, weight,
                           label_smoothing: float, reduction: int, compute_grad: bool,
                           loss_dtype: torch.dtype | None = None):
    """Probability-target cross-entropy: ``F.cross_entropy(input, target, weight,
    reduction=..., label_smoothing=...)`` with float target of input's shape (any
    strides). Returns (loss, lse, grad_input) as :func:`cross_entropy_fwd`; the loss
    dtype is loss_dtype, default ``torch.result_type(input, target)``, and mean divides
    by the row count."""
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device) \
        if compute_grad else None
    loss, lse = _prob_fwd(input, target, weight, label_smoothing, reduction, grad, loss_dtype)
    return loss, lse, grad if compute_grad else _empty_grad(input)


@_on_tensor_device("input", 0)
def cross_entropy_prob_fwd_inplace(input: torch.Tensor, target: torch.Tensor, weight,
                                   label_smoothing: float, reduction: int,
                                   loss_dtype: torch.dtype | None = None):
    """:func:`cross_entropy_prob_fwd` with compute_grad=True, the gradient written over
    the (contiguous) input. Returns (loss, lse)."""
    _check_inplace(input)
    return _prob_fwd(input, target, weight, label_smoothing, reduction, input, loss_dtype)


def _prob_fwd(input, target, weight, label_smoothing, reduction, grad, loss_dtype):
    """Loss and lse; the gradient into `grad` as in _index_fwd."""
    compute_grad = grad is not None
    weight = _packed_weight(weight)
    x = _as_ncs(input)
    y = _as_ncs(target)
    N, C, S = x.shape
    R = N * S
    acc = _acc_dtype(input.dtype)
    device = input.device
    rows_shape = _rows_shape(input)
    loss_rows = torch.empty(R, dtype=acc, device=device)
    lse = torch.empty(rows_shape, dtype=acc, device=device)
    mean = reduction == REDUCTION_MEAN
    tile = _tile_plan(x, heavy=True) if R > 0 else None
    if tile is not None:
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_prob_tile_fwd_kernel)[tile.grid](
            x, y, weight if weight is not None else lse, loss_rows, lse,
            grad if compute_grad else lse, R, C, tile.S, tile.n_sblocks, tile.stride_n,
            tile.stride_c, tile.stride_s, *tile.strides_of(y), tile.g_stride_n,
            tile.g_stride_c, tile.g_stride_s, eps_hi, eps_lo, HAS_WEIGHT=weight is not None,
            COMPUTE_GRAD=compute_grad, MEAN=mean, ONE_BLOCK=C <= tile.block_c,
            BLOCK_C=tile.block_c, BLOCK_S=tile.block_s, num_warps=tile.num_warps)
    elif R > 0:
        block, num_warps = _row_config(C, max(input.element_size(), target.element_size()),
                                       heavy=True)
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_prob_fwd_kernel)[(R,)](
            x, y, weight if weight is not None else lse, loss_rows, lse,
            grad if compute_grad else lse, R, C, S, x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2), eps_hi, eps_lo,
            HAS_WEIGHT=weight is not None, COMPUTE_GRAD=compute_grad, MEAN=mean,
            BLOCK=block, num_warps=num_warps)
    out_dtype = _checked_loss_dtype(loss_dtype, torch.result_type(input, target))
    loss = _reduce_loss(loss_rows, reduction, R, rows_shape, out_dtype)
    return loss, lse


@_on_tensor_device("input", 1)
def cross_entropy_prob_bwd(grad_loss: torch.Tensor, input: torch.Tensor,
                           target: torch.Tensor, weight, lse: torch.Tensor,
                           label_smoothing: float, reduction: int) -> torch.Tensor:
    """Gradient of :func:`cross_entropy_prob_fwd`'s loss times grad_loss, from the saved
    lse. Returns a new contiguous tensor of input's shape and dtype."""
    weight = _packed_weight(weight)
    x = _as_ncs(input)
    y = _as_ncs(target)
    N, C, S = x.shape
    R = N * S
    acc = _acc_dtype(input.dtype)
    grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    lse_flat = lse.reshape(-1).to(acc).contiguous()
    gl, stride_gl = _grad_loss_arg(grad_loss)
    tile = _tile_plan(x, heavy=True) if R > 0 else None
    if tile is not None:
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_prob_tile_bwd_kernel)[tile.grid](
            gl, stride_gl, x, y, weight if weight is not None else lse_flat, lse_flat, grad,
            R, C, tile.S, tile.n_sblocks, tile.stride_n, tile.stride_c, tile.stride_s,
            *tile.strides_of(y), tile.g_stride_n, tile.g_stride_c, tile.g_stride_s,
            eps_hi, eps_lo, HAS_WEIGHT=weight is not None,
            MEAN=reduction == REDUCTION_MEAN, BLOCK_C=tile.block_c, BLOCK_S=tile.block_s,
            num_warps=tile.num_warps)
    elif R > 0:
        block, num_warps = _row_config(C, max(input.element_size(), target.element_size()),
                                       heavy=True)
        eps_hi, eps_lo = _split_float(label_smoothing)
        wrap_triton(_ce_prob_bwd_kernel)[(R,)](
            gl, stride_gl, x, y, weight if weight is not None else lse_flat, lse_flat, grad,
            R, C, S, x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2), eps_hi, eps_lo,
            HAS_WEIGHT=weight is not None, MEAN=reduction == REDUCTION_MEAN,
            BLOCK=block, num_warps=num_warps)
    return grad


@_on_tensor_device("grad_input", 0)
def scale_grad_(grad_input: torch.Tensor, grad_loss: torch.Tensor) -> None:
    """grad_input *= grad_loss in place (0-d: every element; rows' shape: per row,
    broadcast over the classes). A 0-d grad_loss equal to 1 is detected on the device:
    the kernel returns before touching grad_input, and the host never reads it."""
    numel = grad_input.numel()
    if numel == 0:
        return
    if not grad_input.is_contiguous():
        # not produced by these ops (their gradients are contiguous): plain torch
        if grad_loss.dim() == 0 or grad_input.dim() == 1:
            grad_input.mul_(grad_loss)
        else:
            grad_input.mul_(grad_loss.unsqueeze(1))
        return
    if grad_loss.dim() == 0 or grad_input.dim() == 1:
        grid = (min(_cdiv(numel, _SCALE_BLOCK), _SCALE_MAX_PROGRAMS),)
        wrap_triton(_scale_grad_kernel)[grid](grad_input, grad_loss.reshape(()), numel,
                                              BLOCK=_SCALE_BLOCK, num_warps=8)
        return
    g = _as_ncs(grad_input)
    N, C, S = g.shape
    gl, stride_gl = _grad_loss_arg(grad_loss)
    tile = _tile_plan(g)
    if tile is not None:
        wrap_triton(_scale_grad_tile_kernel)[tile.grid](
            g, gl, stride_gl, C, tile.S, tile.n_sblocks, tile.g_stride_n, tile.g_stride_c,
            tile.g_stride_s, BLOCK_C=tile.block_c, BLOCK_S=tile.block_s,
            num_warps=tile.num_warps)
        return
    block, num_warps = _row_config(C, grad_input.element_size())
    wrap_triton(_scale_grad_rows_kernel)[(N * S,)](g, gl, stride_gl, C, S, BLOCK=block,
                                                   num_warps=num_warps)

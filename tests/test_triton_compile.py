"""Every Triton kernel compiles with the real compiler, for sm_90 and sm_80, without a
GPU (triton.compile to PTX and cubin). Triton's interpreter, which CI uses to run the
kernels, accepts code the compiler rejects, so this is the check that a kernel will
build on a GPU at all (with this machine's Triton; the lent GPU has another version:
this file also passes with its triton 3.6, benchmarks/results/NOTES.md). The second
half checks the compiled code of the launch configurations for what their speed rests
on (16-byte accesses, no spills, rows in flight per SM)."""
import os
import re
import subprocess
import tempfile

import pytest

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("the interpreter replaces the kernels; compile them in a normal process",
                allow_module_level=True)
triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fused_nll.triton_kernels import cross_entropy as ce  # noqa: E402

# Triton >= 3.3 takes ASTSource(constexprs=, attrs={(i,): [[name, value]]}); Triton 3.2
# (torch 2.6's) takes constants= and an AttrsDescriptor. The plain compile check runs on
# both; the performance checks, which mark arguments as the JIT specialises them, need
# the newer API.
NEW_AST_API = "constexprs" in ASTSource.__init__.__code__.co_varnames
needs_new_ast_api = pytest.mark.skipif(
    not NEW_AST_API, reason=f"the performance checks use Triton >= 3.3's ASTSource; this is "
                            f"Triton {triton.__version__} (the compile check above still runs)")


def _source(kernel, signature, constexprs, attrs=None):
    if NEW_AST_API:
        return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    assert not attrs, "Triton 3.2's AttrsDescriptor is not supported here"
    return ASTSource(fn=kernel, signature=signature, constants=constexprs)

# Pointer and scalar types by argument name (bf16 logits, int64 targets).
POINTERS = {"x_ptr": "*bf16", "g_ptr": "*bf16", "y_ptr": "*bf16", "t_ptr": "*i64",
            "cnt_ptr": "*i32"}  # any other *_ptr: fp32
SCALARS = {"eps_hi": "fp32", "eps_lo": "fp32", "ignore_index": "i64", "den_value": "fp32"}  # others: i32

KERNELS = [  # (kernel, constexprs, num_warps)
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, COMPUTE_GRAD=True,
                             MEAN=True, PREFETCH=False, BLOCK=8192, GRAD_EVICT_FIRST=False, ONE_BLOCK=False, GROUP=0, FTZ=False), 8),
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, COMPUTE_GRAD=True,
                             MEAN=True, PREFETCH=True, BLOCK=4096, GRAD_EVICT_FIRST=True, ONE_BLOCK=False, GROUP=0, FTZ=False), 8),
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, COMPUTE_GRAD=True,
                             MEAN=True, PREFETCH=True, BLOCK=4096, GRAD_EVICT_FIRST=False,
                             ONE_BLOCK=True, GROUP=0, FTZ=False), 8),
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, COMPUTE_GRAD=True,
                             MEAN=True, PREFETCH=True, BLOCK=4096, GRAD_EVICT_FIRST=False,
                             ONE_BLOCK=False, GROUP=8, FTZ=True), 8),
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=False, SMOOTH=True, LOG_PROBS=True, COMPUTE_GRAD=True,
                             MEAN=False, PREFETCH=False, BLOCK=1024, GRAD_EVICT_FIRST=False, ONE_BLOCK=False, GROUP=0, FTZ=False), 4),
    (ce._ce_fwd_kernel, dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=True, COMPUTE_GRAD=True,
                             MEAN=True, PREFETCH=False, BLOCK=8192, GRAD_EVICT_FIRST=False, ONE_BLOCK=False, GROUP=0, FTZ=False), 8),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, MEAN=True, PARTS=16, RECORDS=16, PHASE=0,
                               ONE_BLOCK=True, BLOCK=8192, FTZ=True, HOLD=True), 8),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, MEAN=True, PARTS=8, RECORDS=8, PHASE=0,
                               ONE_BLOCK=False, BLOCK=4096, FTZ=False, HOLD=False), 4),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=False, SMOOTH=False, MEAN=False, PARTS=3, RECORDS=4, PHASE=1,
                               ONE_BLOCK=True, BLOCK=8192, FTZ=False, HOLD=True), 8),
    (ce._ce_split_kernel, dict(HAS_WEIGHT=False, SMOOTH=False, MEAN=False, PARTS=3, RECORDS=4, PHASE=2,
                               ONE_BLOCK=False, BLOCK=8192, FTZ=False, HOLD=True), 8),
    (ce._ce_bwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, MEAN=True,
                             BLOCK=8192, FTZ=True), 8),
    (ce._ce_prob_fwd_kernel, dict(HAS_WEIGHT=True, COMPUTE_GRAD=True, MEAN=True, BLOCK=4096), 8),
    (ce._ce_prob_bwd_kernel, dict(HAS_WEIGHT=False, MEAN=False, BLOCK=4096), 8),
    (ce._scale_grad_kernel, dict(BLOCK=4096), 8),
    (ce._total_weight_kernel, dict(HAS_WEIGHT=True, BLOCK=1024), 4),
    (ce._finish_loss_kernel, dict(MEAN=True, DEN_TENSOR=True, DEN_TARGETS=False,
                                  HAS_WEIGHT=False, BLOCK=4096, T_BLOCK=1024), 8),
    (ce._finish_loss_kernel, dict(MEAN=True, DEN_TENSOR=False, DEN_TARGETS=False,
                                  HAS_WEIGHT=False, BLOCK=4096, T_BLOCK=1024), 8),
    (ce._finish_loss_kernel, dict(MEAN=True, DEN_TENSOR=False, DEN_TARGETS=True,
                                  HAS_WEIGHT=True, BLOCK=4096, T_BLOCK=1024), 8),
    (ce._total_weight_kernel, dict(HAS_WEIGHT=False, BLOCK=1024), 4),
    (ce._scale_grad_rows_kernel, dict(BLOCK=8192), 8),
    (ce._ce_tile_fwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False,
                                  COMPUTE_GRAD=True, MEAN=True, ONE_BLOCK=True, BLOCK_C=32,
                                  BLOCK_S=128), 4),
    (ce._ce_tile_fwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False,
                                  COMPUTE_GRAD=True, MEAN=True, ONE_BLOCK=False, BLOCK_C=64,
                                  BLOCK_S=64), 4),
    (ce._ce_tile_fwd_kernel, dict(HAS_WEIGHT=False, SMOOTH=True, LOG_PROBS=True,
                                  COMPUTE_GRAD=True, MEAN=False, ONE_BLOCK=True, BLOCK_C=2,
                                  BLOCK_S=2), 1),
    (ce._ce_tile_bwd_kernel, dict(HAS_WEIGHT=True, SMOOTH=True, LOG_PROBS=False, MEAN=True,
                                  BLOCK_C=64, BLOCK_S=64), 4),
    (ce._scale_grad_tile_kernel, dict(BLOCK_C=32, BLOCK_S=128), 4),
    (ce._ce_prob_tile_fwd_kernel, dict(HAS_WEIGHT=True, COMPUTE_GRAD=True, MEAN=True,
                                       ONE_BLOCK=True, BLOCK_C=32, BLOCK_S=64), 4),
    (ce._ce_prob_tile_fwd_kernel, dict(HAS_WEIGHT=False, COMPUTE_GRAD=True, MEAN=False,
                                       ONE_BLOCK=False, BLOCK_C=32, BLOCK_S=64), 4),
    (ce._ce_prob_tile_bwd_kernel, dict(HAS_WEIGHT=True, MEAN=True, BLOCK_C=32, BLOCK_S=64), 4),
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
@pytest.mark.parametrize("case", KERNELS, ids=lambda c: f"{c[0].__name__}-{'-'.join(f'{k}{v}' for k, v in c[1].items() if k in ('PHASE', 'ONE_BLOCK', 'LOG_PROBS', 'SMOOTH', 'PREFETCH'))}")
def test_kernel_compiles(case, arch):
    kernel, constexprs, num_warps = case
    src = _source(kernel, _signature(kernel, constexprs), constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx and kernel.__name__ in ptx
    if kernel in (ce._ce_fwd_kernel, ce._ce_tile_fwd_kernel) and constexprs["COMPUTE_GRAD"]:
        # in place, x_t is read before any thread writes the gradient: a barrier even
        # where no reduction provides one (nll_loss on log-probs without smoothing)
        assert "bar.sync" in ptx
    if constexprs.get("GRAD_EVICT_FIRST"):
        # _GRAD_LAUNCH "evict_first_store": the gradient's stores carry the hint
        assert re.search(r"st\.global\.[\w:.]*evict_first", ptx)
    if kernel is ce._ce_split_kernel and constexprs["PHASE"] == 0:
        # the in-launch exchange: release add, acquire spin, volatile reads of the records
        assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release" in ptx
        assert ".acquire" in ptx and "ld.volatile.global" in ptx


# ---------------------------------------------------------------------------------------
# Static performance properties of the configurations the launchers pick for the
# reference shape (8192 x 128256, contiguous rows), compiled for sm_90 the way Triton's
# JIT specialises a real launch: integer arguments equal to 1 become constants (unit
# class stride, S = 1) and pointers and integers divisible by 16 are marked so. Speed
# itself is measured only on a GPU (benchmarks/); these are the properties that speed
# rests on and that a kernel change can lose without any CPU test noticing:
#   * the logits are read, and the gradient written, in 16-byte vectors;
#   * nothing spills to local memory;
#   * the forward kernel keeps at least 2 rows in flight per SM (2 programs fit the
#     register file): on the H200 one row per SM (BLOCK 16384, 16 warps) read
#     8192 x 128256 bf16 in 0.88 ms against 0.60 ms for the default
#     (benchmarks/results/h200_2026-11-26_triton_sweep.txt).
# ---------------------------------------------------------------------------------------
V_REF = 128256
SPECIALISED = dict(R=8192, C=V_REF, stride_n=V_REF, S=1, stride_c=1, stride_s=1, stride_gl=0,
                   chunk=8192)  # the split kernel: 16 parts of one 8192 block
REGISTERS_PER_SM = 65536  # sm_80 / sm_90


def _compile_specialised(kernel, constexprs, num_warps, element="bf16", specialised=None):
    """Compiles for sm_90 with the integer arguments in `specialised` (default: those of
    the reference shape) specialised as the JIT does."""
    specialised = SPECIALISED if specialised is None else specialised
    sig = _signature(kernel, constexprs)
    constexprs = dict(constexprs)
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        if sig[name] == "constexpr":
            continue
        if name.endswith("_ptr"):
            if name in ("x_ptr", "g_ptr", "y_ptr"):
                sig[name] = "*" + element
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in specialised:
            value = specialised[name]
            if value == 1:  # the JIT turns an int argument equal to 1 into a constant
                sig[name], constexprs[name] = "constexpr", 1
            elif value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = _source(kernel, sig, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _cubin_tool(compiled, tool: str, *args: str) -> str:
    """The output of one of the CUDA binary tools shipped with Triton (cuobjdump,
    nvdisasm) on the kernel's cubin; skips the test when this Triton has none."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)
    if not os.path.exists(path):
        pytest.skip(f"this Triton ({triton.__version__}) ships no {tool} at {path}")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([path, *args, f.name], capture_output=True, text=True,
                              check=True).stdout


def _resources(compiled) -> dict:
    """REG, LOCAL, ... of the kernel's cubin (cuobjdump -res-usage)."""
    out = _cubin_tool(compiled, "cuobjdump", "-res-usage")
    usage = re.search(r"Function \w+:\s*\n\s*(.*)", out)
    assert usage, out
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", usage.group(1))}


def _vector_accesses(ptx: str, op: str) -> bool:
    """Whether the PTX has 16-byte global accesses (ld/st .v4.b32, any cache hints)."""
    return re.search(rf"\b{op}\.global[\w.:]*\.v4\.b32\b", ptx) is not None


def _programs_per_sm(registers: int, num_warps: int) -> int:
    allocated = -(-registers // 8) * 8  # registers are allocated 8 per thread at a time
    return min(REGISTERS_PER_SM // (allocated * 32 * num_warps), 64 // num_warps)


def _tile_case(name, x, kernel, constexprs, element, reads, writes, min_programs):
    """A perf case for the tile kernel plan of the (meta) logits x (probability targets:
    of x's layout): its tile shape, warps and the integer arguments the JIT would
    specialise."""
    v = ce._as_ncs(x)
    prob = kernel in (ce._ce_prob_tile_fwd_kernel, ce._ce_prob_tile_bwd_kernel)
    plan = ce._tile_plan(v, heavy=prob)
    assert plan is not None, name
    constexprs = dict(constexprs, BLOCK_C=plan.block_c, BLOCK_S=plan.block_s)
    if kernel in (ce._ce_tile_fwd_kernel, ce._ce_prob_tile_fwd_kernel):
        constexprs["ONE_BLOCK"] = v.shape[1] <= plan.block_c
    specialised = dict(C=v.shape[1], stride_gl=0, n_sblocks=plan.n_sblocks,
                       **{f: getattr(plan, f) for f in ("S", "stride_n", "stride_c", "stride_s",
                                                        "g_stride_n", "g_stride_c",
                                                        "g_stride_s")})
    specialised.update(zip(("stride_yn", "stride_yc", "stride_ys"), plan.strides_of(v)))
    return (name, kernel, constexprs, plan.num_warps, element, reads, writes, min_programs,
            specialised)


def _tile_cases():
    import torch

    fwd = dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=False, COMPUTE_GRAD=True, MEAN=True)
    nchw = torch.empty(16, 21, 512, 512, device="meta")  # segmentation, 21 classes
    ade = torch.empty(16, 150, 128, 128, device="meta")  # 150 classes
    return [
        # contiguous (N, C, H, W): 16-byte accesses along the pixels
        _tile_case("tile-nchw-fwd+grad", nchw, ce._ce_tile_fwd_kernel, fwd, "bf16",
                   True, True, 3),
        _tile_case("tile-nchw150-fwd+grad", ade, ce._ce_tile_fwd_kernel, fwd, "bf16",
                   True, True, 3),
        _tile_case("tile-nchw-fwd+grad-smooth-weight", nchw, ce._ce_tile_fwd_kernel,
                   dict(fwd, HAS_WEIGHT=True, SMOOTH=True), "bf16", True, True, 2),
        _tile_case("tile-nchw-bwd", nchw, ce._ce_tile_bwd_kernel,
                   dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=False, MEAN=True), "bf16",
                   True, True, 3),
        _tile_case("tile-nchw-fwd+grad-fp32", nchw, ce._ce_tile_fwd_kernel, fwd, "fp32",
                   True, True, 3),
        # probability targets (soft labels) of the logits' layout: half tiles, x and y
        _tile_case("tile-prob-nchw-fwd+grad", nchw, ce._ce_prob_tile_fwd_kernel,
                   dict(HAS_WEIGHT=False, COMPUTE_GRAD=True, MEAN=True), "bf16", True, True,
                   3),
        _tile_case("tile-prob-nchw-bwd", nchw, ce._ce_prob_tile_bwd_kernel,
                   dict(HAS_WEIGHT=False, MEAN=True), "bf16", True, True, 3),
        # channels-last and (N*H*W, C): rows of 21 classes are not 16-byte aligned, so
        # element loads (coalesced); the (N, C, H, W) gradient is stored in 32-byte runs
        # (16 pixels of a class): full sectors, not 16-byte vectors
        _tile_case("tile-channels-last-fwd+grad", nchw.to(memory_format=torch.channels_last),
                   ce._ce_tile_fwd_kernel, fwd, "bf16", False, False, 3),
        _tile_case("tile-rows-fwd+grad", torch.empty(1 << 22, 21, device="meta"),
                   ce._ce_tile_fwd_kernel, fwd, "bf16", False, False, 3),
    ]


def _perf_cases():
    bf16_block, bf16_warps = ce._row_config(V_REF, 2)
    heavy_block, heavy_warps = ce._row_config(V_REF, 2, heavy=True)
    f32_block, f32_warps = ce._row_config(V_REF, 4)
    split_parts = 16  # a chunk of 128256 / 16 = 8016 classes: one block, in registers
    split_block = triton.next_power_of_2(triton.cdiv(V_REF, split_parts))
    split_warps = min(32, max(4, split_block // (32 * ce._SPLIT_ELEMS_PER_THREAD)))
    # FTZ: the exps as on a GPU (_ftz: fp32 accumulation, compiled code)
    fwd = dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=False, MEAN=True, PREFETCH=False,
               GRAD_EVICT_FIRST=False, ONE_BLOCK=False, GROUP=0, FTZ=ce._FTZ_EXP)
    grad_launch = ce._GRAD_LAUNCH or {}  # the forward with gradient's launch at V_REF
    gl_block, gl_warps = ce._row_config(V_REF, 2, max_block=grad_launch.get("max_block"),
                                        per_thread=grad_launch.get("elems_per_thread"))
    gl_prefetch = bool(grad_launch.get("prefetch", ce._PREFETCH))
    gl_evict = bool(grad_launch.get("evict_first_store", False))
    # (id, kernel, constexprs, num_warps, element, reads, writes, min programs per SM)
    return [
        ("fwd", ce._ce_fwd_kernel, dict(fwd, COMPUTE_GRAD=False, BLOCK=bf16_block),
         bf16_warps, "bf16", True, False, 2),
        ("fwd+grad", ce._ce_fwd_kernel, dict(fwd, COMPUTE_GRAD=True, BLOCK=bf16_block),
         bf16_warps, "bf16", True, True, 2),
        # the opt-in prefetch (_PREFETCH): one more block per thread in registers
        ("fwd-prefetch", ce._ce_fwd_kernel, dict(fwd, COMPUTE_GRAD=False, PREFETCH=True,
                                                 BLOCK=bf16_block),
         bf16_warps, "bf16", True, False, 2),
        ("fwd+grad-prefetch", ce._ce_fwd_kernel, dict(fwd, COMPUTE_GRAD=True, PREFETCH=True,
                                                      BLOCK=bf16_block),
         bf16_warps, "bf16", True, True, 2),
        # _GRAD_LAUNCH "evict_first_store": the hinted stores stay 16-byte vectors
        ("fwd+grad-evict-first", ce._ce_fwd_kernel, dict(fwd, COMPUTE_GRAD=True,
                                                         GRAD_EVICT_FIRST=True,
                                                         BLOCK=bf16_block),
         bf16_warps, "bf16", True, True, 2),
        # rows of at most one block (ONE_BLOCK): the row stays in registers from sweep 1
        # to the gradient, still 2 programs per SM at the largest default block. (A
        # 32768 block, for 32000-class rows, spills with 32 warps, in registers or not.)
        ("fwd+grad-one-block", ce._ce_fwd_kernel, dict(fwd, COMPUTE_GRAD=True, ONE_BLOCK=True,
                                                       BLOCK=bf16_block),
         bf16_warps, "bf16", True, True, 2),
        # the default launch of the forward with gradient at V_REF (_GRAD_LAUNCH)
        ("fwd+grad-grad-launch", ce._ce_fwd_kernel,
         dict(fwd, COMPUTE_GRAD=True, PREFETCH=gl_prefetch, GRAD_EVICT_FIRST=gl_evict,
              BLOCK=gl_block),
         gl_warps, "bf16", True, True, 1),
        # the opt-in running max per vector (_PER_VECTOR_MAX), with single-instruction exps
        ("fwd-per-vector-max", ce._ce_fwd_kernel,
         dict(fwd, COMPUTE_GRAD=False, GROUP=8, BLOCK=bf16_block),
         bf16_warps, "bf16", True, False, 2),
        ("fwd+grad-per-vector-max", ce._ce_fwd_kernel,
         dict(fwd, COMPUTE_GRAD=True, PREFETCH=gl_prefetch, GROUP=8, BLOCK=gl_block),
         gl_warps, "bf16", True, True, 1),
        ("fwd+grad-smooth-weight", ce._ce_fwd_kernel,
         dict(fwd, HAS_WEIGHT=True, SMOOTH=True, COMPUTE_GRAD=True, BLOCK=heavy_block),
         heavy_warps, "bf16", True, True, 1),
        ("fwd+grad-fp32", ce._ce_fwd_kernel, dict(fwd, COMPUTE_GRAD=True, BLOCK=f32_block),
         f32_warps, "fp32", True, True, 1),
        ("bwd", ce._ce_bwd_kernel, dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=False,
                                        MEAN=True, BLOCK=bf16_block, FTZ=ce._FTZ_EXP),
         bf16_warps, "bf16", True, True, 1),
        ("split-one-block", ce._ce_split_kernel,
         dict(HAS_WEIGHT=False, SMOOTH=False, MEAN=True, PARTS=split_parts,
              RECORDS=split_parts, PHASE=0, ONE_BLOCK=True, BLOCK=split_block,
              FTZ=ce._FTZ_EXP, HOLD=ce._SPLIT_HOLD),
         split_warps, "bf16", True, True, 1),
    ]


@pytest.mark.parametrize("case", _perf_cases() + _tile_cases(), ids=lambda c: c[0])
@needs_new_ast_api
def test_compiled_kernel_keeps_its_performance_properties(case):
    name, kernel, constexprs, num_warps, element, reads, writes, min_programs, *spec = case
    compiled = _compile_specialised(kernel, constexprs, num_warps, element, *spec)
    ptx = compiled.asm["ptx"]
    if reads:
        assert _vector_accesses(ptx, "ld"), f"{name}: the logits are not read in 16-byte vectors"
    if writes:
        assert _vector_accesses(ptx, "st"), f"{name}: the gradient is not written in 16-byte vectors"
    res = _resources(compiled)
    assert res.get("LOCAL", 0) == 0 and res.get("STACK", 0) == 0, f"{name} spills: {res}"
    programs = _programs_per_sm(res["REG"], num_warps)
    assert programs >= min_programs, (
        f"{name}: {res['REG']} registers x {num_warps} warps leave room for {programs} "
        f"program(s) per SM, expected at least {min_programs}")


@needs_new_ast_api
def test_exps_and_per_vector_max_shorten_the_loop():
    """_FTZ_EXP: tl.exp's ex2.approx.f32 is one MUFU.EX2 wrapped by ptxas in four more
    instructions (denormal inputs and results), ex2.approx.ftz.f32 is the MUFU alone.
    _PER_VECTOR_MAX: the per-block max of sweep 1 reduces across warps through shared
    memory, with barriers inside the loop over blocks; the per-vector max has none
    there. (sm_90, triton 3.9, bf16 at 128256 classes: 372 instructions per block,
    273 with FTZ, 267 with both.)"""
    block, warps = ce._row_config(V_REF, 2)
    fwd = dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=False, MEAN=True, PREFETCH=False,
               GRAD_EVICT_FIRST=False, ONE_BLOCK=False, COMPUTE_GRAD=False, BLOCK=block)
    loops = {(group, ftz): _innermost_loop(_compile_specialised(
        ce._ce_fwd_kernel, dict(fwd, GROUP=group, FTZ=ftz), warps))
        for group, ftz in ((0, False), (0, True), (8, True))}
    size = {k: len(loop) for k, loop in loops.items()}
    barriers = {k: sum("BAR.SYNC" in line for line in loop) for k, loop in loops.items()}
    fixups = {k: sum(re.search(r"FSETP\.GEU\.AND .*-126", line) is not None for line in loop)
              for k, loop in loops.items()}
    assert fixups[0, False] > 0 and fixups[0, True] == 0 == fixups[8, True], fixups
    assert size[0, True] < 0.8 * size[0, False] and size[8, True] <= size[0, True], size
    assert barriers[0, True] > 0 and barriers[8, True] == 0, barriers


def _innermost_loop(compiled) -> list[str]:
    """The SASS instructions of the kernel's innermost loop (the shortest span from a
    label to a branch back to it) that computes exponentials (nvdisasm)."""
    lines = _cubin_tool(compiled, "nvdisasm", "-c").splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^(\.L\w+):", line.strip()))}
    spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA\s+`?\(?(\.L\w+)", line)) and labels.get(m.group(1), i) < i]
    loops = [[l for l in lines[a:b + 1] if re.match(r"\s*/\*[0-9a-f]{4}\*/", l)]
             for a, b in sorted(spans, key=lambda s: s[1] - s[0])]
    loops = [loop for loop in loops if any("MUFU.EX2" in l for l in loop)]
    assert loops, "no loop with exponentials found"
    return loops[0]


@needs_new_ast_api
def test_specialisation_is_what_vectorises():
    """The check above can fail: without the unit class stride known at compile time
    (a strided input) the same kernel reads element by element."""
    constexprs = dict(HAS_WEIGHT=False, SMOOTH=False, LOG_PROBS=False, COMPUTE_GRAD=True,
                      MEAN=True, PREFETCH=False, BLOCK=8192, GRAD_EVICT_FIRST=False,
                      ONE_BLOCK=False, GROUP=0, FTZ=True)
    src = ASTSource(fn=ce._ce_fwd_kernel, signature=_signature(ce._ce_fwd_kernel, constexprs),
                    constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]
    assert not _vector_accesses(ptx, "ld") and not _vector_accesses(ptx, "st")

"""Benchmark: fused_nll (every usable backend) against torch eager
F.cross_entropy, torch.compile(F.cross_entropy) and, when installed,
Liger-Kernel, measured in the same run.

Reported per case: median time, GB/s and % of the memory-bandwidth floor, and
peak extra memory (GPU only: torch.cuda.max_memory_allocated; torch keeps no
allocator statistics for CPU tensors, so the CPU column stays empty), and on the GPU the
host time of one call (CPU time to issue it, the GPU not waited for: when it exceeds the
GPU time, the measured time is the host's). Bytes counted (the floor):
  forward:            read the logits once                  N*V*elt
  forward + backward: read the logits once, write the
                      gradient once                         2*N*V*elt
  per-sample gradients (--modes vmapgrad): the same as forward + backward;
                      torch.func.vmap(torch.func.grad(loss)) over the batch split
                      into 16 samples of N/16 rows (shapes with N % 16 == 0)
(class-index targets, N int64s, are < 0.1% and left out; probability targets,
--targets prob, are read once too: + N*V*elt). The floor is those bytes at the
copy bandwidth measured at the start of the run (read + write of a large
buffer), not the datasheet's.

    python -m fused_nll bench [--device cuda] [--quick] [--shapes 8192x128256] ...
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import signal
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fused_nll
from fused_nll import _backend

# The reference shape first: a run cut short (SIGTERM, e.g. a device time
# limit) still reports the cases it finished.
GPU_SHAPES = [(8192, 128256), (8192, 32000), (4096, 256000),
              (16, 21, 512, 512)]  # (N, C, H, W) contiguous: a segmentation loss
CPU_SHAPES = [(2048, 32000), (512, 128256)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
IGNORE_EVERY = 17  # every 17th target ignored, as in shared/reference/anchors.md
PER_SAMPLE = 16  # --modes vmapgrad: samples per batch


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps, warmup=3):
    """Median wall time of fn() in ms (GPU: CUDA events via triton's do_bench)."""
    if device == "cuda":
        try:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=max(100, reps * 10), return_mode="median")
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device) -> float:
    """Read + write bandwidth of a large device copy, GB/s (1e9 bytes/s)."""
    nbytes = (2 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10 if device == "cpu" else 50)
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ---------------------------------------------------------------------------
# Implementations: name -> (loss function, note) usable here
# ---------------------------------------------------------------------------


def _triton_with(**knobs):
    """fused_nll.cross_entropy on the Triton backend with module knobs of
    triton_kernels/cross_entropy.py set (name=value) for the call."""
    from fused_nll.triton_kernels import cross_entropy as triton_ce

    def run(x, t):
        saved = {knob: getattr(triton_ce, knob) for knob in knobs}
        for knob, value in knobs.items():
            setattr(triton_ce, knob, value)
        try:
            with fused_nll.use_backend("triton"):
                return fused_nll.cross_entropy(x, t)
        finally:
            for knob, value in saved.items():
                setattr(triton_ce, knob, value)

    return run


def _cuda_with_env(name: str, value: str):
    """fused_nll.cross_entropy on the CUDA C++ backend with the environment variable
    `name` set to `value` during the call (the forward, which writes the gradient)."""

    def run(x, t):
        os.environ[name] = value
        try:
            with fused_nll.use_backend("cuda"):
                return fused_nll.cross_entropy(x, t)
        finally:
            del os.environ[name]

    return run


def implementations(device, wanted):
    impls = {}
    for backend in _backend.BACKENDS:
        try:
            with fused_nll.use_backend(backend):
                _backend.select(torch.device(device))
        except RuntimeError:
            continue
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is for correctness, not speed

        def run(x, t, backend=backend):
            with fused_nll.use_backend(backend):
                return fused_nll.cross_entropy(x, t)

        def run_inplace(x, t, backend=backend):
            with fused_nll.use_backend(backend):
                return fused_nll.cross_entropy(x, t, inplace_backward=True)

        run.func = True  # usable inside torch.func transforms (--modes vmapgrad)
        impls[f"fused_nll[{backend}]"] = run
        run_inplace.inplace = True  # bench_case hands it non-leaf logits
        run_inplace.fwdbwd_only = True  # without a gradient it is the plain call
        impls[f"fused_nll[{backend}] inplace_backward"] = run_inplace
    if device == "cuda" and "fused_nll[triton]" in impls and "fused_nll[cuda]" in impls:
        # No backend forced: the default picks per input (_backend.prefers_cuda_cpp)
        def run_default(x, t):
            return fused_nll.cross_entropy(x, t)

        impls["fused_nll default"] = run_default
    if device == "cuda" and "fused_nll[triton]" in impls:
        # The Triton row kernels (one program per row) where the launchers pick the
        # tile kernels (short rows, class-strided layouts): what the tiles gain.
        run_row_kernels = _triton_with(_TILE=False)
        run_row_kernels.tile_shapes_only = True
        impls["fused_nll[triton] row kernels"] = run_row_kernels
        # The running max per 16-byte vector in the row kernel's sweep 1 (opt-in,
        # _PER_VECTOR_MAX): no reduction across warps per block, one-instruction exps.
        run_per_vector = _triton_with(_PER_VECTOR_MAX=True)
        run_per_vector.rows_only = True
        impls["fused_nll[triton] per-vector max"] = run_per_vector
        # The Triton split-row gradient path (module knobs, off by default): rows cut
        # into 4096-class chunks, pipelined, a program's previous chunk read again from
        # L2 (8 warps, 4 programs per SM; its best on the H100, 2026-11-27). fwd+bwd only
        # (forward-only calls do not take it).
        run_split = _triton_with(_SPLIT_PARTS="auto", _SPLIT_MAX_BLOCK=4096, _SPLIT_HOLD=False,
                                 _SPLIT_PROGRAMS_PER_SM=4, _SPLIT_ELEMS_PER_THREAD=16)
        run_split.fwdbwd_only = True
        run_split.rows_only = True
        run_split.index_only = True
        impls["fused_nll[triton] split rows (L2)"] = run_split
    if device == "cuda" and "fused_nll[cuda]" in impls:
        # The CUDA forward with gradient without its L2 policies (FUSED_NLL_CUDA_L2_HINTS=0:
        # plain sweep-1 loads, evict_normal in the gradient sweep), fwd+bwd only. (Other
        # row-group sizes and the one-block kernel were timed on the H100 and H200,
        # 2026-11-27, and lost: benchmarks/results/NOTES.md.)
        run_plain = _cuda_with_env("FUSED_NLL_CUDA_L2_HINTS", "0")
        run_plain.fwdbwd_only = True
        run_plain.rows_only = True
        impls["fused_nll[cuda] no L2 hints"] = run_plain
        # ... and with 2 row groups per SM instead of 4 (FUSED_NLL_CUDA_GRAD_ROWS_PER_SM):
        # fewer rows in flight, more of each still in L2 for the gradient sweep
        run_two = _cuda_with_env("FUSED_NLL_CUDA_GRAD_ROWS_PER_SM", "2")
        run_two.fwdbwd_only = True
        run_two.rows_only = True
        impls["fused_nll[cuda] 2 rows/SM"] = run_two
        if (torch.cuda.get_device_capability()[0] >= 9
                and os.environ.get("FUSED_NLL_BENCH_CLUSTER") != "0"):
            # The persistent Hopper cluster kernel (FUSED_NLL_CUDA_CLUSTER, off by default):
            # rows in a cluster's registers, read once, the next row's loads in flight
            # during a row's exchange. "require": a shape it does not take (more than
            # 262144 bf16 classes, 131072 fp32) is reported as failed, not timed as the
            # usual kernel. FUSED_NLL_BENCH_CLUSTER=0 leaves it out (gpu_check.sh, when
            # its GPU tests did not pass).
            run_cluster = _cuda_with_env("FUSED_NLL_CUDA_CLUSTER", "require")
            run_cluster.fwdbwd_only = True
            run_cluster.rows_only = True
            run_cluster.index_only = True
            impls["fused_nll[cuda] cluster"] = run_cluster

    def eager(x, t):
        return F.cross_entropy(x, t)

    eager.func = True
    impls["torch eager"] = eager
    # compile eager's Python function, not F.cross_entropy itself: torch < 2.7's Dynamo
    # asserts on a torch function passed to torch.compile directly
    compiled = torch.compile(eager)
    impls["torch.compile"] = lambda x, t: compiled(x, t)
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss()

            def run_liger(x, t):
                return liger(x, t)

            run_liger.rows_only = True  # (N, C) logits only
            run_liger.index_only = True
            impls["Liger-Kernel (overwrites logits)"] = run_liger
        except Exception:  # not installed
            pass
    if wanted:  # "=name": that implementation only; otherwise a substring of names
        impls = {k: v for k, v in impls.items()
                 if any(k == w[1:] if w.startswith("=") else w in k for w in wanted)}
    return impls


# ---------------------------------------------------------------------------


def applies(fn, shape) -> bool:
    """Whether an implementation is timed at this shape ((N, V) or (N, C, d1, ...))."""
    if getattr(fn, "rows_only", False) and len(shape) != 2:
        return False
    if getattr(fn, "tile_shapes_only", False):  # short or class-strided rows
        return len(shape) > 2 or shape[1] <= 256
    return shape[1] <= getattr(fn, "max_classes", shape[1])


def applies_to_mode(fn, shape, mode) -> bool:
    """vmapgrad: implementations that work inside torch.func, batches that split evenly."""
    if mode == "vmapgrad":
        return getattr(fn, "func", False) and shape[0] % PER_SAMPLE == 0
    if mode == "fwd":
        return not getattr(fn, "fwdbwd_only", False)  # (same as without)
    return not getattr(fn, "fwd_only", False)


def bench_case(fn, shape, dtype, mode, device, reps, targets="index", layout="contiguous"):
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    if targets == "prob":  # soft labels of the logits' dtype, e.g. distillation
        t = torch.softmax(torch.randn(shape, device=device, generator=gen), 1).to(dtype)
    else:
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=device, generator=gen)
        t.view(-1)[::IGNORE_EVERY] = -100
    if layout == "channels_last" and x.dim() > 2:  # K-dim logits with the classes innermost
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # in memory (a channels-last model)
        if targets == "prob":
            t = t.movedim(1, -1).contiguous().movedim(-1, 1)
    if mode == "fwd":
        step = lambda: fn(x, t)  # noqa: E731  (inference: no gradient kept)
        ctx = torch.no_grad
    elif mode == "vmapgrad":  # per-sample gradients of the samples' mean losses
        xs, ts = x.unflatten(0, (PER_SAMPLE, -1)), t.unflatten(0, (PER_SAMPLE, -1))
        per_sample = torch.func.vmap(torch.func.grad(fn))
        step = lambda: per_sample(xs, ts)  # noqa: E731
        ctx = torch.enable_grad
    elif getattr(fn, "inplace", False):
        # inplace_backward needs non-leaf logits (as a model's head produces):
        # made once, outside the timing; every step overwrites them with the
        # gradient, which is then the next step's input (same shapes, same work).
        x.requires_grad_(True)
        with torch.enable_grad():
            x = x * 1

        def step():
            torch.autograd.grad(fn(x, t), x)

        ctx = torch.enable_grad
    else:
        x.requires_grad_(True)

        def step():
            x.grad = None
            fn(x, t).backward()

        ctx = torch.enable_grad
    with ctx():
        step()  # compile / autotune outside the timing
        _sync(device)
        peak = None
        if device == "cuda":
            x.grad = None
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            # extra = peak beyond the inputs, minus the gradient torch must return
            # (inplace_backward returns it in the logits' storage)
            new_grad = mode != "fwd" and not getattr(fn, "inplace", False)
            grad_bytes = x.numel() * x.element_size() if new_grad else 0
            peak = max(0, torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**20
        ms = time_ms(step, device, reps)
        host = host_us(step) if device == "cuda" else None
    return ms, peak, host


def host_us(fn, calls=20):
    """CPU time of one fn() call in microseconds, GPU not waited for: Python, dispatch,
    autograd and launch overhead. When it exceeds the GPU time, `ms` measures it rather
    than the kernels (do_bench's events then wait for the launches)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fused_nll bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--shapes", default=None,
                   help="comma list of NxV or NxCxHxW (contiguous) (default: per device)")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list of bf16,fp32,fp16")
    p.add_argument("--modes", default="fwd,fwdbwd",
                   help="fwd, fwdbwd, vmapgrad (per-sample gradients, torch.func)")
    p.add_argument("--impls", default="",
                   help="comma list of substrings of implementation names to keep; "
                        "=NAME keeps that name only (e.g. '=fused_nll[triton],torch')")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="one small shape, fp32, few repetitions")
    p.add_argument("--csv", default=None, help="CSV path (default benchmarks/results/bench_<device>_<date>.csv)")
    p.add_argument("--plot", action="store_true", help="also write a PNG next to the CSV (needs matplotlib)")
    p.add_argument("--targets", choices=["index", "prob"], default="index",
                   help="class indices (every 17th ignored) or probabilities of the logits' shape")
    p.add_argument("--layout", choices=["contiguous", "channels_last"], default="contiguous",
                   help="memory layout of K-dim logits (N, C, d1, ...): channels_last puts the "
                        "classes innermost (probability targets too)")
    args = p.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        shapes = [(512, 32000)] if device == "cpu" else [(8192, 32000)]
        dtypes, reps = ["fp32"], args.reps or 5
    else:
        shapes = CPU_SHAPES if device == "cpu" else GPU_SHAPES
        dtypes, reps = args.dtypes.split(","), args.reps or (10 if device == "cpu" else 100)
    if args.shapes:
        shapes = [tuple(int(s) for s in shape.split("x")) for shape in args.shapes.split(",")]
    modes = args.modes.split(",")
    impls = implementations(device, [w for w in args.impls.split(",") if w])

    card = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    today = datetime.date.today().isoformat()
    bw = copy_bandwidth_gbs(device)
    print(f"{card}; torch {torch.__version__}; triton {triton_version}; {today}; "
          f"measured copy bandwidth {bw:.0f} GB/s")

    cases = [(s, d, m, i) for s in shapes for d in dtypes for m in modes for i in impls
             if applies_to_mode(impls[i], s, m) and applies(impls[i], s)
             and not (args.targets == "prob" and getattr(impls[i], "index_only", False))
             # inplace_backward needs contiguous logits
             and not (args.layout == "channels_last" and len(s) > 2
                      and getattr(impls[i], "inplace", False))]
    rows = []

    def stop(signum, frame):  # `timeout` sends SIGTERM: keep the finished rows
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        run_cases(cases, impls, device, reps, bw, card, triton_version, today, rows,
                  args.targets, args.layout)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {len(rows)} of {len(cases)} cases done; reporting those")
    finally:
        signal.signal(signal.SIGTERM, previous)
    print()

    path = args.csv or os.path.join("benchmarks", "results", f"bench_{device}_{today}.csv")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if rows:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    print_table(rows)
    print(f"CSV: {path}")
    if args.plot and rows:
        plot(path)
    return 0


def run_cases(cases, impls, device, reps, bw, card, triton_version, today, rows,
              targets="index", layout="contiguous"):
    """Times each (shape, dtype, mode, impl) case, appending a result row to `rows`
    as soon as it is measured (so an interrupted run keeps the finished ones)."""
    for k, (shape, dname, mode, impl) in enumerate(cases, 1):
        name = "x".join(map(str, shape))
        bar = "#" * (30 * k // len(cases))
        print(f"\r[{bar:30s}] {k}/{len(cases)} {impl} {name} {dname} {mode}".ljust(110), end="", flush=True)
        dtype = DTYPES[dname]
        elt = torch.finfo(dtype).bits // 8
        v = shape[1]
        n = math.prod(shape) // v  # rows: N (x d1 x ... for K-dim input)
        nbytes = n * v * elt * ((1 if mode == "fwd" else 2) + (targets == "prob"))
        try:
            ms, peak, host = bench_case(impls[impl], shape, dtype, mode, device, reps, targets, layout)
        except Exception as exc:  # e.g. out of memory: report and go on
            print(f"\n  {impl} {name} {dname} {mode} failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        floor_ms = nbytes / (bw * 1e9) * 1e3
        rows.append(dict(impl=impl, device=device, card=card, shape=name, N=n, V=v, dtype=dname,
                         targets=targets, layout=layout if len(shape) > 2 else "", mode=mode,
                         ms=round(ms, 4), GBps=round(nbytes / (ms * 1e-3) / 1e9, 1),
                         floor_ms=round(floor_ms, 4), pct_floor=round(100 * floor_ms / ms, 1),
                         peak_extra_MiB="" if peak is None else round(peak),
                         host_us="" if host is None else round(host, 1),
                         copy_GBps=round(bw), torch=torch.__version__, triton=triton_version, date=today))


def print_table(rows):
    print(f"{'impl':34s} {'shape':>16s} {'dtype':5s} {'mode':6s} {'ms':>9s} {'GB/s':>8s} "
          f"{'floor ms':>9s} {'% floor':>7s} {'extra MiB':>9s} {'host us':>8s}")
    for r in rows:
        print(f"{r['impl']:34s} {r['shape']:>16s} {r['dtype']:5s} {r['mode']:6s} {r['ms']:9.3f} "
              f"{r['GBps']:8.1f} {r['floor_ms']:9.3f} {r['pct_floor']:7.1f} {str(r['peak_extra_MiB']):>9s} "
              f"{str(r.get('host_us', '')):>8s}")


def plot(csv_path: str) -> str | None:
    """A grouped bar chart of time per implementation, from the CSV."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    groups = sorted({(r["shape"], r["dtype"], r["mode"]) for r in rows}, key=str)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for g, key in enumerate(groups):
            match = [r for r in rows if r["impl"] == impl and (r["shape"], r["dtype"], r["mode"]) == key]
            if match:
                xs.append(g + i * width)
                ys.append(float(match[0]["ms"]))
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{shape}\n{d} {m}" for shape, d, m in groups], fontsize=8)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_title(f"cross-entropy, {rows[0]['card']}, torch {rows[0]['torch']}, {rows[0]['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.splitext(csv_path)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")
    return out


if __name__ == "__main__":
    sys.exit(main())

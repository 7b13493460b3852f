"""Sweep of the Triton kernels' (BLOCK, num_warps) table on a GPU: prints the
median fwd and fwd+bwd time per configuration at the reference shapes, to
choose triton_kernels/cross_entropy.py's _MAX_BLOCK / _ELEMS_PER_THREAD /
_PROGRAMS_PER_SM (persistent grid for the index forward kernel)."""
import torch
from triton.testing import do_bench

import fused_nll
from fused_nll.triton_kernels import cross_entropy as ck

# (max block, elements per thread, programs per SM or None for one program per row)
CONFIGS = [(16384, 16, None), (8192, 32, None), (4096, 16, None), (4096, 8, None),
           (16384, 16, 1), (16384, 16, 2), (8192, 16, 2), (8192, 32, 4), (8192, 32, 8)]
SHAPES = [(8192, 128256), (8192, 32000)]


def main():
    default = (dict(ck._MAX_BLOCK), ck._ELEMS_PER_THREAD, ck._PROGRAMS_PER_SM)
    print(f"default: max_block {default[0]}, elems/thread {default[1]}")
    print(f"{'N':>6s} {'V':>7s} {'max_block':>9s} {'elems':>5s} {'BLOCK':>6s} {'warps':>5s} {'prog/SM':>7s} {'fwd ms':>8s} {'fwd+bwd ms':>10s}")
    for n, v in SHAPES:
        x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
        t = torch.randint(0, v, (n,), device="cuda")
        t[::17] = -100
        xg = x.clone().requires_grad_(True)

        def fwdbwd():
            xg.grad = None
            fused_nll.cross_entropy(xg, t).backward()

        for max_block, elems, per_sm in CONFIGS:
            ck._MAX_BLOCK[2], ck._ELEMS_PER_THREAD, ck._PROGRAMS_PER_SM = max_block, elems, per_sm
            block, warps = ck._row_config(v, 2)
            with fused_nll.use_backend("triton"), torch.no_grad():
                fwd = do_bench(lambda: fused_nll.cross_entropy(x, t), warmup=25, rep=150, return_mode="median")
            with fused_nll.use_backend("triton"):
                both = do_bench(fwdbwd, warmup=25, rep=150, return_mode="median")
            print(f"{n:6d} {v:7d} {max_block:9d} {elems:5d} {block:6d} {warps:5d} {str(per_sm):>7s} "
                  f"{fwd:8.3f} {both:10.3f}", flush=True)
    ck._MAX_BLOCK.update(default[0])
    ck._ELEMS_PER_THREAD, ck._PROGRAMS_PER_SM = default[1], default[2]


if __name__ == "__main__":
    main()

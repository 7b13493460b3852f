"""Checks of the CPU emulator that runs the CUDA C++ kernels in CI
(tests/cuda_emu/cuda_emu.h; the kernels themselves are tested in
tests/test_cuda_backend.py). It must give correct results for correct
kernels (shuffles, shared memory, thread-block clusters), expose a missing
barrier through its random thread order, and report a barrier misuse as an
error instead of hanging."""
import os
import shutil

import pytest

torch = pytest.importorskip("torch")

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("needs a C++ compiler", allow_module_level=True)

from cuda_emu import build as cuda_emu_build  # noqa: E402  (tests/ is on sys.path)

selftest = cuda_emu_build.load("fused_nll_emu_selftest", "emu_selftest.cpp")


def test_shuffles_and_shared_memory():
    assert torch.all(selftest.run("sum", 64) == sum(range(64)))


def test_cluster_shared_memory_and_sync():
    # 8 blocks of 32 threads in clusters of 4: each block sums 1 + 11 + 21 + 31.
    assert torch.all(selftest.run("cluster", 256) == 64)


def test_missing_barrier_is_exposed():
    # 200 blocks, each a fresh random order: thread 0 reads before and after
    # thread 1's write. With the barrier, always after.
    racy = selftest.run("race", 200)
    assert set(racy.tolist()) == {0, 1}
    assert torch.all(selftest.run("race_fixed", 200) == 1)


def test_race_between_warps_is_exposed():
    # A warp's shuffle completes without waiting for the other warps, which may
    # run ahead: warp 1 reads before or after warp 0's write.
    assert set(selftest.run("warp_race", 200).tolist()) == {0, 1}


@pytest.mark.parametrize("which, message", [
    ("divergent", "wait at different barriers: .*emu_selftest.cpp"),
    ("exited_lane", "shuffle that not all 32 lanes reach"),
])
def test_barrier_misuse_is_an_error(which, message):
    with pytest.raises(RuntimeError, match=message):
        selftest.run(which, 32)

"""The code paths only a CUDA GPU takes, on tensors several of the GPU's dense chunks large
(``lowrank_opt.apollo.dense_chunk_elements``: 2^22 elements there), so that the chunked and row-block paths are
the ones taken: bf16 stochastic rounding in row blocks, the dense AdamW update in chunks, and the projection
draw on the GPU the same in every process. Skipped without CUDA (benchmarks/gpu_proof.py runs them on a GPU)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

from lowrank_opt import Apollo
from lowrank_opt.apollo import dense_chunk_elements

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _scratch_of_last_step(opt) -> int:
    """Peak bytes allocated during ``opt.step()`` above what was allocated before it (the step's temporaries)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def _bf16_neighbours(x: torch.Tensor):
    """The two bf16 values around each fp32 value of ``x`` (equal where x is a bf16 value)."""
    bits = x.view(torch.int32)
    low = bits & -(1 << 16)
    high = torch.where(low == bits, low, low + (1 << 16))
    return low.view(torch.float32), high.view(torch.float32)


def test_bf16_row_block_rounding_is_unbiased_and_deterministic():
    """The dense AdamW path of a bf16 weight larger than one chunk, updated in row blocks with stochastic
    rounding: every element is one of the two bf16 neighbours of the exact fp32 step, the total rounding error
    is within 5 standard deviations of 0 under E[w] = x, and the same inputs give the same bits."""
    device, shape, lr = "cuda", (8192, 8192), 2.0**-11  # 16 chunks of 2^22
    gen = torch.Generator(device=device).manual_seed(0)
    w0 = (torch.rand(shape, generator=gen, device=device) * 3.75 + 0.25).to(torch.bfloat16)  # several binades
    grad = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
    assert w0.numel() >= 4 * dense_chunk_elements(device)

    def stepped(dtype, foreach: bool):
        p = torch.nn.Parameter(w0.to(dtype, copy=True))
        p.grad = grad.to(dtype, copy=True)
        Apollo([{"params": [p], "rank": None}], lr=lr, weight_decay=0.0, foreach=foreach).step()
        return p.detach()

    exact = stepped(torch.float32, foreach=False)
    w, again = stepped(torch.bfloat16, foreach=True), stepped(torch.bfloat16, foreach=True)
    low, high = _bf16_neighbours(exact.clone())
    wf = w.float()
    assert bool(((wf == low) | (wf == high)).all())
    variance = ((exact - low).double() * (high - exact).double()).sum()
    assert float(variance) > 0 and abs(float((wf - exact).double().sum() / variance.sqrt())) < 5
    assert float((wf != w0.float()).double().mean()) > 0
    assert torch.equal(w, again)


def test_dense_update_in_chunks_equals_the_whole_tensor():
    """The chunked fast path (``foreach=True``) of an fp32 tensor of 16 chunks and a ragged end equals the
    whole-tensor path bit for bit after 3 steps, weights and moments, with about one chunk of scratch."""
    device, shape = "cuda", (4 * 4096 + 1, 4096)
    gen = torch.Generator(device=device).manual_seed(0)
    w0 = torch.randn(shape, generator=gen, device=device).mul_(0.02)
    grads = [torch.randn(shape, generator=gen, device=device).mul_(1e-3) for _ in range(3)]
    assert math.ceil(w0.numel() / dense_chunk_elements(device)) >= 16

    def run(foreach: bool):
        p = torch.nn.Parameter(w0.clone())
        opt = Apollo([{"params": [p], "rank": None}], lr=1e-3, weight_decay=0.1, foreach=foreach)
        for g in grads[:-1]:
            p.grad = g
            opt.step()
        p.grad = grads[-1]
        scratch = _scratch_of_last_step(opt)
        return (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]), scratch

    (fast, fast_scratch), (slow, slow_scratch) = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(fast, slow))
    assert fast_scratch < 0.6 * slow_scratch, (fast_scratch, slow_scratch)


def fingerprint(shapes: list, rank: int, steps: int = 3) -> str:
    """SHA-256 of bf16 weights and moments after ``steps`` APOLLO steps on CUDA from seeded inputs, with a
    projection refresh inside the run (update_proj_gap 2): the same in every process if the draws are."""
    gen = torch.Generator(device="cuda").manual_seed(1234)
    named = [(f"layer.{i}.weight", torch.nn.Parameter(
        torch.randn(shape, generator=gen, device="cuda").mul_(0.02).to(torch.bfloat16))) for i, shape in enumerate(shapes)]
    opt = Apollo([{"params": named}], lr=1e-3, rank=rank, update_proj_gap=2)
    for _ in range(steps):
        for _, p in named:
            p.grad = torch.randn(p.shape, generator=gen, device="cuda").mul_(1e-3).to(torch.bfloat16)
        opt.step()
    h = hashlib.sha256()
    for _, p in named:
        for t in (p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]):
            h.update(t.contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def test_projection_draw_is_the_same_in_another_process():
    """P is a function of (seed, matrix, refresh) only: a fresh process agrees with this one, which has run other
    work on the device before, and so do the bf16 rounding bits seeded the same way."""
    shapes, rank = [[11008, 4096], [4096, 11008], [4096, 4096]], 256
    mine = fingerprint(shapes, rank)
    other = subprocess.run([sys.executable, __file__, json.dumps(shapes), str(rank)], capture_output=True,
                           text=True, timeout=300, check=True)
    assert other.stdout.strip().splitlines()[-1] == mine


if __name__ == "__main__":
    print(fingerprint(json.loads(sys.argv[1]), int(sys.argv[2])))

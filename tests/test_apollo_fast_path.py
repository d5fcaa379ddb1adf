"""The fast path (``foreach=None``/``True``: foreach and chunked plain-AdamW updates) against the simple
one-tensor-at-a-time reference path (``foreach=False``): bit for bit on CPU. Also the CPU column norms."""

from __future__ import annotations

import pytest
import torch

from lowrank_opt import Apollo, apollo_mini
from lowrank_opt import functional as apollo_module


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed": (1100, 1000),  # >= 2^20 elements: the chunked dense path (two pieces)
        "q": (48, 48), "up": (96, 48), "down": (48, 96), "conv": (8, 3, 3, 3), "q2": (48, 48),
        "norm": (48,), "bias": (96,), "head": (40, 48),
    }
    return {name: torch.nn.Parameter(torch.randn(shape, generator=g, dtype=dtype)) for name, shape in shapes.items()}


def _groups(params, dense_names=("embed", "norm", "bias", "head")):
    low = [(n, p) for n, p in params.items() if n not in dense_names]
    dense = [(n, p) for n, p in params.items() if n in dense_names]
    return [{"params": [p for _, p in low], "param_names": [n for n, _ in low]},
            {"params": [p for _, p in dense], "param_names": [n for n, _ in dense], "rank": None}]


def _run(foreach, steps=6, dtype=torch.float32, make=Apollo, grad_hook=None, make_params=_params, **options):
    params = make_params(dtype)
    opt = make(_groups(params), lr=1e-2, foreach=foreach, **options)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for name, p in params.items():
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
        if grad_hook is not None:
            grad_hook(step, params)
        opt.step()
    return params, opt


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
        sa, sb = oa.state[pa[name]], ob.state[pb[name]]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), (name, key)
            else:
                assert sa[key] == sb[key], (name, key)


@pytest.mark.parametrize("options", [
    dict(weight_decay=0.1),
    dict(weight_decay=0.0, correct_bias=False, norm_growth_limit=None),
    dict(weight_decay=0.05, cache_projection=True, update_proj_gap=2),
    dict(weight_decay=0.05, update_proj_gap=2, state_dtype="bfloat16"),
    dict(weight_decay=0.01, scale_type="tensor", scale=4.0),
])
def test_fast_path_equals_reference(options):
    fast = _run(None, **options)
    _assert_same(fast, _run(False, **options))
    _assert_same(fast, _run(True, **options))


def test_fast_path_float64_and_mini():
    _assert_same(_run(None, dtype=torch.float64), _run(False, dtype=torch.float64))
    _assert_same(_run(None, make=apollo_mini, weight_decay=0.1), _run(False, make=apollo_mini, weight_decay=0.1))


@pytest.mark.parametrize("options", [
    dict(weight_decay=0.1),  # stochastic rounding (the default for bf16 weights)
    dict(weight_decay=0.1, stochastic_rounding=False),
    dict(weight_decay=0.0, state_dtype="bfloat16", scale_type="tensor", scale=4.0),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_path_half_weights_in_row_blocks_equal_reference(monkeypatch, options, dtype):
    """Half-precision weights go through an fp32 copy; the fast path makes it a block of rows at a time. With
    a 2,000-element chunk every matrix is split (the 1,100 x 1,000 embedding into 550 blocks of 2 rows),
    mostly at row counts that do not divide its height; per-row factors (right projections, tall "up") are sliced
    with the rows, per-column ones ("down") are not. The rounding bits come from one generator per tensor
    and step, so the blocks see the same bits as the reference's one whole draw (on CPU). fp16 weights are
    always rounded to nearest."""
    monkeypatch.setattr(apollo_module, "CHUNK_CPU", 2000)
    calls = []
    from lowrank_opt import rounding

    real_round = rounding.stochastic_round_to_bf16_
    monkeypatch.setattr(rounding, "stochastic_round_to_bf16_",
                        lambda x, g=None: calls.append(x.numel()) or real_round(x, g))
    fast = _run(None, steps=3, dtype=dtype, **options)
    fast_calls, calls[:] = list(calls), []
    reference = _run(False, steps=3, dtype=dtype, **options)
    _assert_same(fast, reference)
    assert fast[0]["embed"].dtype == dtype
    if dtype == torch.bfloat16 and options.get("stochastic_rounding", True):
        n_params = len(fast[0])
        assert len(calls) == 3 * n_params  # the reference: one whole-tensor rounding per tensor and step
        assert len(fast_calls) > 3 * n_params and max(fast_calls) <= 2000
        assert sum(fast_calls) == sum(calls)
    # The weights moved (the comparison above is not between two untouched copies).
    assert not torch.equal(fast[0]["up"], _params(dtype)["up"])


def test_fast_path_skips_nonfinite_like_the_reference():
    def poison(step, params):
        if step == 2:
            params["norm"].grad[3] = float("nan")
            params["up"].grad[0, 0] = float("inf")

    fast = _run(None, nonfinite="skip", grad_hook=poison)
    reference = _run(False, nonfinite="skip", grad_hook=poison)
    _assert_same(fast, reference)
    assert fast[1].skipped_tensors == reference[1].skipped_tensors == 2


def test_fast_path_noncontiguous_parameter():
    def with_transposed(dtype):
        params = _params(dtype)
        params["head"] = torch.nn.Parameter(params["head"].detach().t())  # dense and not contiguous
        assert not params["head"].is_contiguous()
        return params

    fast = _run(None, weight_decay=0.1, make_params=with_transposed)
    _assert_same(fast, _run(False, weight_decay=0.1, make_params=with_transposed))


def test_chunk_size_splits_the_dense_tensor():
    assert _params()["embed"].numel() > apollo_module.CHUNK_CPU  # the chunked path is exercised above


@pytest.mark.parametrize("shape", [(7, 5), (300, 1000), (1000, 300), (3, 200000)])
def test_channel_norms_match_torch(shape):
    x = torch.randn(shape, dtype=torch.float64)
    for dim in (0, 1):
        torch.testing.assert_close(apollo_module.channel_norms(x, dim), torch.linalg.vector_norm(x, dim=dim),
                                   rtol=1e-12, atol=0)
    half = x.to(torch.bfloat16)
    torch.testing.assert_close(apollo_module.channel_norms(half, 0, torch.float32),
                               torch.linalg.vector_norm(half, dim=0, dtype=torch.float32), rtol=1e-5, atol=0)
    inf = x.clone()
    inf[-1, 0] = float("inf")
    assert torch.isinf(apollo_module.channel_norms(inf, 0)[0])


def _peak_cpu_bytes(fn) -> int:
    """The most bytes torch's CPU allocator handed out at once during ``fn()`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("shape", [(3000, 700), (700, 3000), (1, 600000)])
def test_wide_norms_of_bf16_on_cpu_match_torch_without_a_full_size_fp32_copy(shape):
    """The norms APOLLO, its dense AdamW part and NormGrowthCap take of a bf16 gradient on CPU: torch's
    reduction with ``dtype=float32`` first copies the whole gradient to fp32 (a 524 MB temporary for 7B's
    lm_head, the peak of a layer-wise step); ours widens a block at a time, to the same norms."""
    from lowrank_opt import _common

    g = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = torch.linalg.vector_norm(g.double())
    whole = _common.vector_norm_wide(g, torch.float32)
    assert whole.dtype == torch.float32
    torch.testing.assert_close(whole.double(), exact, rtol=2e-5, atol=0)  # torch's own fp32 norm: ~5e-5 off
    rows = apollo_module.channel_norms(g, 1, torch.float32)
    torch.testing.assert_close(rows.double(), torch.linalg.vector_norm(g.double(), dim=1), rtol=2e-5, atol=0)
    assert rows.dtype == torch.float32 and rows.shape == (shape[0],)
    batched = _common.norms_wide([g, g[:1].contiguous(), g.float()], torch.float32)
    assert torch.equal(batched[0], whole) and torch.equal(batched[2], torch.linalg.vector_norm(g.float()))
    assert torch.equal(batched[1], _common.vector_norm_wide(g[:1].contiguous(), torch.float32))
    torch.testing.assert_close(batched[1].double(), torch.linalg.vector_norm(g[:1].double()), rtol=2e-5, atol=0)
    fp32_copy = g.numel() * 4
    assert _peak_cpu_bytes(lambda: torch.linalg.vector_norm(g, dtype=torch.float32)) >= fp32_copy  # torch's
    for fn in (lambda: _common.vector_norm_wide(g, torch.float32),
               lambda: apollo_module.channel_norms(g, 1, torch.float32),
               lambda: _common.norms_wide([g, g[:1].contiguous()], torch.float32)):
        assert _peak_cpu_bytes(fn) <= 4 * _common._WIDEN_BLOCK + 4 * g.shape[0] + 4096
    inf = g.clone()
    inf[-1, -1] = float("inf")
    assert torch.isinf(_common.vector_norm_wide(inf, torch.float32))
    # Nothing to widen (fp32), and non-CPU-like cases, are torch's own call, bit for bit.
    assert torch.equal(_common.vector_norm_wide(g.float(), torch.float32), torch.linalg.vector_norm(g.float()))


def test_foreach_option_is_validated():
    with pytest.raises(TypeError, match="foreach must be None or a bool, got 'yes'"):
        Apollo([torch.nn.Parameter(torch.zeros(4, 4))], foreach="yes")

"""Apollo: shapes, ranks, orientation, state, resume, projection identity, validation, non-finite handling."""

import io
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowrank_opt import Apollo, apollo_mini, lowrank_param_groups
from lowrank_opt.memory import optimizer_state_bytes
from lowrank_opt.projection import resolve_rank


def _grads(params, seed, dtype=None):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype or p.dtype)


def _run(opt, params, steps, start=0):
    for t in range(start, start + steps):
        _grads(params, 1000 + t)
        opt.step()


def _reference_update(p, grad, proj, side, step_size, scale_type="channel", eps=1e-6, scale=1.0):
    """First step of APOLLO written out from the design's formulas (no limiter on step 1, moments start
    at 0): m = 0.1 R, v = 0.001 R^2, R~ = m / (sqrt(v) + eps)."""
    g2 = grad.reshape(p.shape[0], -1).double()
    r = g2 @ proj.double().T if side == "right" else proj.double() @ g2
    m, v = 0.1 * r, 0.001 * r * r
    rn = m / (v.sqrt() + eps)
    dim = 1 if side == "right" else 0
    if scale_type == "channel":
        s = rn.norm(dim=dim) / (r.norm(dim=dim) + 1e-8)
        s = s[:, None] if side == "right" else s[None, :]
    else:
        s = rn.norm() / (r.norm() + 1e-8)
    return (-step_size * math.sqrt(scale) * g2 * s).reshape(p.shape)


STEP1 = 1e-2 * math.sqrt(1 - 0.999) / (1 - 0.9)  # bias-corrected step size at t=1, lr=1e-2


@pytest.mark.parametrize(
    "shape,rank,side,moment_shape",
    [
        ((24, 10), 4, "right", (24, 4)),  # tall: compress the 10 columns
        ((9, 30), 4, "left", (4, 30)),  # wide: compress the 9 rows
        ((8, 3, 3, 3), 5, "left", (5, 27)),  # conv: 8 x 27, wide
        ((40, 2, 3), 3, "right", (40, 3)),  # 3-D: 40 x 6, tall
        ((16, 16), 6, "right", (16, 6)),  # square: right
    ],
)
def test_first_step_equals_formula_for_each_shape(shape, rank, side, moment_shape):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(shape, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = Apollo([("w", p)], lr=1e-2, rank=rank)
    _grads([p], 3)
    proj = opt.projection_matrix(p, step=0)
    expected = _reference_update(p, p.grad, proj, side, STEP1)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == moment_shape
    torch.testing.assert_close(p.detach() - p0, expected, rtol=1e-10, atol=1e-14)


def test_sort_dims_false_compresses_rows_of_a_tall_matrix():
    p = nn.Parameter(torch.randn(40, 16, dtype=torch.float64))
    p0 = p.detach().clone()
    opt = Apollo([("w", p)], lr=1e-2, rank=5, sort_dims=False)
    _grads([p], 4)
    proj = opt.projection_matrix(p, step=0)
    assert proj.shape == (5, 40)  # P compresses the 40 rows, not the 16 columns
    expected = _reference_update(p, p.grad, proj, "left", STEP1)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (5, 16)
    torch.testing.assert_close(p.detach() - p0, expected, rtol=1e-10, atol=1e-14)


def test_conv_weight_update_equals_its_2d_view():
    conv = nn.Parameter(torch.randn(8, 4, 3, 3, dtype=torch.float64))
    flat = nn.Parameter(conv.detach().reshape(8, -1).clone())
    a = Apollo([("layer.weight", conv)], lr=1e-2, rank=3, update_proj_gap=3)
    b = Apollo([("layer.weight", flat)], lr=1e-2, rank=3, update_proj_gap=3)
    for t in range(7):
        _grads([conv], t)
        flat.grad = conv.grad.reshape(8, -1).clone()
        a.step()
        b.step()
    assert conv.shape == (8, 4, 3, 3)
    torch.testing.assert_close(conv.detach().reshape(8, -1), flat.detach(), rtol=0, atol=0)


def test_one_dimensional_params_get_adamw():
    bias = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = Apollo([("b", bias)], lr=0.1, weight_decay=0.01, eps=1e-6)
    grads = [torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.1, 0.3, -0.2], dtype=torch.float64)]
    w = bias.detach().clone()
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.zeros(3, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        bias.grad = g.clone()
        opt.step()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        step_size = 0.1 * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        w = w - step_size * m / (v.sqrt() + 1e-6)
        w = w - 0.1 * 0.01 * w
    assert "limiter_norm" not in opt.state[bias]
    torch.testing.assert_close(bias.detach(), w, rtol=1e-12, atol=1e-14)


def test_group_with_rank_none_is_adamw_for_matrices_too():
    w = nn.Parameter(torch.randn(6, 5))
    opt = Apollo([{"params": [w], "rank": None}])
    _grads([w], 0)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (6, 5)
    assert opt.projection_matrix(w) is None


def test_rank_rules():
    assert resolve_rank(1000, 6) == 6  # clipped to the compressed dim
    assert resolve_rank(0.25, 16) == 4
    assert resolve_rank(lambda d: math.ceil(math.sqrt(d)), 64) == 8
    w = nn.Parameter(torch.randn(64, 100))
    opt = Apollo([("w", w)], rank=lambda d: math.ceil(math.sqrt(d)))
    _grads([w], 0)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (8, 100)


def test_rank_larger_than_dim_is_clipped():
    w = nn.Parameter(torch.randn(6, 20))
    opt = Apollo([("w", w)], rank=1000)
    _grads([w], 0)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (6, 20)
    assert opt.projection_matrix(w).shape == (6, 6)


def test_apollo_mini_preset():
    w = nn.Parameter(torch.randn(32, 48))
    opt = apollo_mini([("w", w)], lr=1e-3)
    group = opt.param_groups[0]
    assert (group["rank"], group["scale_type"], group["scale"]) == (1, "tensor", 128.0)
    _grads([w], 0)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (1, 48)


# -- state and memory -----------------------------------------------------------------------------------

LLAMA_60M_LAYER = {  # one decoder layer of the paper's 60M LLaMA (hidden 512, intermediate 1376)
    "q_proj": (512, 512), "k_proj": (512, 512), "v_proj": (512, 512), "o_proj": (512, 512),
    "gate_proj": (1376, 512), "up_proj": (1376, 512), "down_proj": (512, 1376),
    "input_layernorm": (512,), "post_attention_layernorm": (512,),
}


def test_state_bytes_match_closed_form_for_llama_layer():
    rank = 128
    params = [(name, nn.Parameter(torch.zeros(shape))) for name, shape in LLAMA_60M_LAYER.items()]
    opt = Apollo(params, rank=rank)
    for _, p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    expected = 0
    for shape in LLAMA_60M_LAYER.values():
        if len(shape) == 2:
            expected += (2 * rank * max(shape) + 1) * 4  # two r x max(m, n) moments + the limiter norm
        else:
            expected += 2 * shape[0] * 4  # AdamW moments for a norm weight
    got = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    assert got == expected
    for name, p in params:
        keys = set(opt.state[p])
        # "identity": the parameter's projection key, fixed at its first update (plain data, not a tensor)
        assert keys == ({"step", "identity", "exp_avg", "exp_avg_sq", "limiter_norm"} if p.ndim == 2
                        else {"step", "identity", "exp_avg", "exp_avg_sq"})
        if p.ndim == 2:
            assert opt.state[p]["exp_avg"].numel() == rank * max(p.shape)
    # An AdamW of the same layer would hold 2 x numel moments: APOLLO's are a quarter here (r = d/4).
    adam_bytes = sum(2 * math.prod(s) * 4 for s in LLAMA_60M_LAYER.values())
    assert got < 0.3 * adam_bytes


def test_projection_is_not_in_state_dict_and_loads_with_weights_only():
    w = nn.Parameter(torch.randn(24, 10))
    opt = Apollo([("w", w)], rank=4, cache_projection=True)
    _run(opt, [w], 3)
    sd = opt.state_dict()
    for key, value in sd["state"][0].items():
        assert key in {"step", "identity", "exp_avg", "exp_avg_sq", "limiter_norm"}  # identity: a plain int
        assert not (torch.is_tensor(value) and value.shape == (4, 10))
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)


def test_state_dtype_bfloat16_halves_moments():
    w = nn.Parameter(torch.randn(24, 10))
    opt = Apollo([("w", w)], rank=4, state_dtype=torch.bfloat16)
    _run(opt, [w], 2)
    assert opt.state[w]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[w]["exp_avg_sq"].dtype == torch.bfloat16
    assert torch.isfinite(w).all()


def test_bf16_params_stay_bf16_and_track_fp32():
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16))]
    low = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in ref]
    opt_ref = Apollo([("w", ref[0]), ("b", ref[1])], lr=1e-2, rank=4)
    opt_low = Apollo([("w", low[0]), ("b", low[1])], lr=1e-2, rank=4)
    for t in range(5):
        _grads(ref, t)
        for a, b in zip(low, ref):
            a.grad = b.grad.to(torch.bfloat16)
        opt_ref.step()
        opt_low.step()
    for a, b in zip(low, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.detach(), rtol=2e-2, atol=2e-2)
    assert opt_low.state[low[0]]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", [False, True])
def test_resume_is_exact(tmp_path, dtype, cache):
    def build(params):
        return Apollo(
            [{"params": [("w1", params[0]), ("w2", params[1])]}, {"params": [("b", params[2])], "rank": None}],
            lr=1e-2, rank=3, update_proj_gap=4, weight_decay=0.01, cache_projection=cache,
        )

    torch.manual_seed(0)
    init = [torch.randn(12, 7).to(dtype), torch.randn(5, 3, 3).to(dtype), torch.randn(7).to(dtype)]
    straight = [nn.Parameter(t.clone()) for t in init]
    opt = build(straight)
    _run(opt, straight, 10)

    first = [nn.Parameter(t.clone()) for t in init]
    opt1 = build(first)
    _run(opt1, first, 6)
    torch.save(opt1.state_dict(), tmp_path / "opt.pt")
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = build(resumed)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt2.state[resumed[0]]["exp_avg"].dtype == torch.float32
    _run(opt2, resumed, 4, start=6)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


# -- projection identity ---------------------------------------------------------------------------------


def test_projection_is_a_pure_function_of_seed_identity_and_refresh():
    a, b = nn.Parameter(torch.randn(20, 8)), nn.Parameter(torch.randn(20, 8))
    opt = Apollo([("a", a), ("b", b)], rank=4, update_proj_gap=5, seed=7)
    again = Apollo([("a", a.detach().clone().requires_grad_()), ("b", b.detach().clone().requires_grad_())],
                   rank=4, update_proj_gap=5, seed=7)
    other_seed = Apollo([("a", a)], rank=4, update_proj_gap=5, seed=8)
    pa0 = opt.projection_matrix(a, step=0)
    assert torch.equal(pa0, opt.projection_matrix(a, step=4))  # same refresh window
    assert not torch.equal(pa0, opt.projection_matrix(a, step=5))  # redrawn at step T
    assert not torch.equal(pa0, opt.projection_matrix(b, step=0))  # same shape, different parameter
    assert torch.equal(pa0, again.projection_matrix(again.param_groups[0]["params"][0], step=0))
    assert not torch.equal(pa0, other_seed.projection_matrix(a, step=0))
    # Entries are N(0, 1/r): r * variance ~ 1.
    w = nn.Parameter(torch.zeros(2000, 1000))
    proj = Apollo([("w", w)], rank=64).projection_matrix(w)
    assert abs(proj.var().item() * 64 - 1.0) < 0.02


@pytest.mark.slow
def test_projection_is_identical_in_another_process():
    code = (
        "import torch; from torch import nn; from lowrank_opt import Apollo\n"
        "w = nn.Parameter(torch.zeros(30, 12)); u = nn.Parameter(torch.zeros(7))\n"
        "opt = Apollo([u, w], rank=5, seed=3, update_proj_gap=10)\n"
        "print(repr(opt.projection_matrix(w, step=25).sum().item()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    w = nn.Parameter(torch.zeros(30, 12))
    u = nn.Parameter(torch.zeros(7))
    opt = Apollo([u, w], rank=5, seed=3, update_proj_gap=10)
    assert out == repr(opt.projection_matrix(w, step=25).sum().item())


def test_cached_and_regenerated_projection_give_identical_training():
    torch.manual_seed(0)
    init = [torch.randn(12, 7), torch.randn(6, 15)]
    runs = []
    for cache in (False, True):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = Apollo([("a", params[0]), ("b", params[1])], rank=3, update_proj_gap=3, cache_projection=cache)
        _run(opt, params, 8)
        runs.append(params)
        # The cache holds one P per matrix (3 x 7 and 3 x 6 fp32), never saved: more state bytes, same training.
        assert optimizer_state_bytes(opt) - (2 * (12 * 3 + 3 * 15) * 4 + 2 * 4) == (3 * 7 + 3 * 6) * 4 * cache
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# -- limiter --------------------------------------------------------------------------------------------


def test_norm_growth_limiter_caps_update_growth():
    # A gradient spike after quiet steps: m/(sqrt(v)+eps) jumps from ~1 to ~0.1/sqrt(0.001) ~ 3 per entry, so
    # the unlimited update grows about 3x in one step; the limiter allows 1% per step.
    torch.manual_seed(0)
    w = torch.randn(16, 8, dtype=torch.float64)
    grads = [torch.randn(16, 8, dtype=torch.float64) * (1000.0 if t >= 5 else 1.0) for t in range(8)]
    for gamma, capped in ((1.01, True), (None, False)):
        p = nn.Parameter(w.clone())
        opt = Apollo([("w", p)], lr=1e-2, rank=4, norm_growth_limit=gamma, correct_bias=False)
        norms = []
        for g in grads:
            before = p.detach().clone()
            p.grad = g.clone()
            opt.step()
            norms.append((p.detach() - before).norm().item())
        ratios = [b / a for a, b in zip(norms, norms[1:])]
        if capped:
            assert max(ratios) <= 1.01 + 1e-9
        else:
            assert max(ratios) > 2.0


# -- validation and non-finite gradients -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rank=0), "rank must be >= 1, got 0"),
        (dict(rank=lambda d: 0), "rank must be >= 1, got 0"),
        (dict(rank=1.5), "a fractional rank must be in (0, 1], got 1.5"),
        (dict(lr=-1.0), "lr must be >= 0, got -1.0"),
        (dict(betas=(1.0, 0.999)), "betas[0] must be in [0, 1), got 1.0"),
        (dict(betas=(0.9, -0.1)), "betas[1] must be in [0, 1), got -0.1"),
        (dict(eps=-1e-8), "eps must be > 0 (with eps = 0 a zero row of R gives 0/0 and NaN weights), got -1e-08"),
        (dict(eps=0.0), "eps must be > 0"),
        (dict(lr="1e-3"), "lr must be a number, got '1e-3' (str)"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0, got -0.1"),
        (dict(scale_type="row"), "scale_type must be one of 'channel', 'tensor', got 'row'"),
        (dict(update_proj_gap=0), "update_proj_gap must be an integer >= 1, got 0"),
        (dict(scale=0.0), "scale must be > 0, got 0.0"),
        (dict(norm_growth_limit=0.5), "norm_growth_limit must be None or >= 1, got 0.5"),
        (dict(nonfinite="ignore"), "nonfinite must be one of 'raise', 'skip', got 'ignore'"),
        (dict(state_dtype="int8"), "state_dtype must be None or one of"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, message):
    w = nn.Parameter(torch.randn(8, 6))
    with pytest.raises((ValueError, TypeError)) as info:
        Apollo([("model.layers.0.mlp.up_proj.weight", w)], **kwargs)
    assert message in str(info.value)
    if "rank" in kwargs:
        assert "'model.layers.0.mlp.up_proj.weight'" in str(info.value)


def test_bad_group_override_names_the_group():
    w, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6))
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -0.5 in param_groups\[1\]"):
        Apollo([{"params": [w]}, {"params": [b], "lr": -0.5}])


def test_complex_params_and_sparse_grads_are_refused():
    with pytest.raises(TypeError, match="complex64"):
        Apollo([nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))])
    emb = nn.Embedding(10, 4, sparse=True)
    opt = Apollo([("emb.weight", emb.weight)], rank=2)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*'emb.weight'"):
        opt.step()


def test_nonfinite_gradient_raises_and_changes_nothing():
    a, b, c = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6, 9)), nn.Parameter(torch.randn(6))
    opt = Apollo([("a", a), ("b", b), ("c", c)], rank=2)
    _run(opt, [a, b, c], 2)
    before = [p.detach().clone() for p in (a, b, c)]
    state_before = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in opt.state.items()}
    _grads([a, b, c], 99)
    b.grad[2, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite gradient \(inf or nan\) for 'b'"):
        opt.step()
    for p, q in zip((a, b, c), before):
        assert torch.equal(p, q)
    for p, s in state_before.items():
        for key, value in s.items():
            assert torch.equal(opt.state[p][key], value) if torch.is_tensor(value) else opt.state[p][key] == value


def test_nonfinite_gradient_skip_updates_the_others():
    a, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(6))
    opt = Apollo([("a", a), ("b", b)], rank=2, nonfinite="skip")
    a0, b0 = a.detach().clone(), b.detach().clone()
    _grads([a, b], 0)
    a.grad[0, 0] = float("inf")
    opt.step()
    assert torch.equal(a, a0) and not torch.equal(b, b0)
    assert opt.skipped_tensors == 1 and a not in opt.state


def test_param_without_grad_is_untouched():
    a, b = nn.Parameter(torch.randn(8, 6)), nn.Parameter(torch.randn(8, 6))
    opt = Apollo([a, b], rank=2)
    b0 = b.detach().clone()
    _grads([a], 0)
    opt.step()
    assert torch.equal(b, b0) and b not in opt.state


# -- target modules ------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"attn": nn.Linear(16, 16), "mlp": nn.Linear(16, 32), "norm": nn.LayerNorm(16)}) for _ in range(2)
        )
        self.lm_head = nn.Linear(16, 50, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


def test_lowrank_param_groups_selects_like_hf():
    model = TinyLM()
    groups = lowrank_param_groups(model, "all-linear", rank=4)
    low = [name for name, _ in groups[1]["params"]]
    assert low == ["layers.0.attn.weight", "layers.0.mlp.weight", "layers.1.attn.weight", "layers.1.mlp.weight"]
    rest = [name for name, _ in groups[0]["params"]]
    assert "lm_head.weight" in rest and "embed_tokens.weight" in rest and groups[0]["rank"] is None
    assert [n for n, _ in lowrank_param_groups(model, ["attn"])[1]["params"]] == ["layers.0.attn.weight", "layers.1.attn.weight"]
    assert [n for n, _ in lowrank_param_groups(model, r"layers\.1\..*")[1]["params"]] == ["layers.1.attn.weight", "layers.1.mlp.weight"]
    assert "embed_tokens.weight" in [n for n, _ in lowrank_param_groups(model, ["attn"], include_embeddings=True)[1]["params"]]
    opt = Apollo(groups, lr=1e-3)
    assert opt.param_groups[1]["rank"] == 4 and opt.param_groups[1]["param_names"][0] == "layers.0.attn.weight"
    with pytest.raises(ValueError, match="matched no weight"):
        lowrank_param_groups(model, ["q_proj"])


# -- layer-wise mode -------------------------------------------------------------------------------------


def test_layerwise_equals_normal_and_frees_gradients():
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randn(32, 3)

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Conv1d(1, 1, 1), nn.Flatten(), nn.Linear(24, 3))

    def forward(model):
        h = model[1](model[0](x))
        return ((model[4](model[3](model[2](h.unsqueeze(1)))) - y) ** 2).mean()

    normal, layerwise = make(), make()
    opt_n = Apollo(lowrank_param_groups(normal, "all-linear", rank=4), lr=1e-2, update_proj_gap=3, weight_decay=0.1)
    opt_l = Apollo(lowrank_param_groups(layerwise, "all-linear", rank=4), lr=1e-2, update_proj_gap=3, weight_decay=0.1,
                   layerwise=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt_l, lambda t: 1.0 / (1 + t))
    schedule_n = torch.optim.lr_scheduler.LambdaLR(opt_n, lambda t: 1.0 / (1 + t))
    for _ in range(7):
        opt_n.zero_grad()
        forward(normal).backward()
        opt_n.step()
        schedule_n.step()
        forward(layerwise).backward()
        assert all(p.grad is None for p in layerwise.parameters())  # consumed inside backward
        opt_l.step()  # nothing left to do, but keeps the scheduler's bookkeeping
        schedule.step()
    for a, b in zip(normal.parameters(), layerwise.parameters()):
        assert torch.equal(a, b)
    sd_n, sd_l = opt_n.state_dict(), opt_l.state_dict()
    for k in sd_n["state"]:
        for key, value in sd_n["state"][k].items():
            other = sd_l["state"][k][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other
    opt_l.remove_hooks()
    forward(layerwise).backward()
    assert all(p.grad is not None for p in layerwise.parameters())


@pytest.mark.parametrize("names", ["module.", "_orig_mod.", "unnamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_into_renamed_parameters_keeps_the_projections(names, dtype):
    """The checkpoint's identities (saved in the state at the first update) seed the projections and rounding
    bits after load, whatever the new parameters are called: DDP's ``module.``, torch.compile's ``_orig_mod.``,
    or no names at all."""
    shapes = {"attn.q.weight": (12, 7), "mlp.up.weight": (6, 15), "experts": (3, 8, 5), "norm.weight": (7,)}
    torch.manual_seed(0)
    init = {n: torch.randn(s).to(dtype) for n, s in shapes.items()}

    def build(prefix=""):
        params = {n: nn.Parameter(t.clone()) for n, t in init.items()}
        named = [(prefix + n, params[n]) for n in ("attn.q.weight", "mlp.up.weight", "norm.weight")]
        unnamed = names == "unnamed" and prefix
        groups = [{"params": [p for _, p in named] if unnamed else named},
                  {"params": [params["experts"]] if unnamed else [(prefix + "experts", params["experts"])],
                   "stacked": True}]
        return params, Apollo(groups, lr=1e-2, rank=2, update_proj_gap=2, weight_decay=0.1)

    straight, opt = build()
    order = list(shapes)
    _run(opt, [straight[n] for n in order], 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    snapshot = {n: p.detach().clone() for n, p in straight.items()}
    _run(opt, [straight[n] for n in order], 3, start=3)
    resumed, opt2 = build(prefix="module." if names == "unnamed" else names)
    for n, p in resumed.items():
        p.data.copy_(snapshot[n])
    opt2.load_state_dict(saved)
    for n in ("attn.q.weight", "experts"):
        assert torch.equal(opt2.projection_matrix(resumed[n]), opt.projection_matrix(straight[n], step=3))
    _run(opt2, [resumed[n] for n in order], 3, start=3)
    for n in order:
        assert torch.equal(resumed[n], straight[n]), n

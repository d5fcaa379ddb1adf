"""One table drives shared tests for every registry name (and its NormGrowthCap-wrapped form):
convergence on a quadratic and a tiny MLP, dtype preservation, no grad -> no change, per-group lr,
exact resume, construction errors. Plus the registry's own behaviour and AdamW/AMSGrad hand values."""

import io
import math

import pytest
import torch
from torch import nn

from lowrank_opt import Apollo, NormGrowthCap
from lowrank_opt.registry import OPTIMIZERS, available, build_optimizer, parse_name

# Test settings per name: a learning rate that suits the small problems below, and options that shorten
# long warmups. Every registry name must appear here, so a new optimizer cannot skip the shared tests.
TEST_OPTIONS = {
    "apollo": dict(lr=3e-2, rank=2),
    "apollo_mini": dict(lr=3e-2),
    "apollo_layerwise": dict(lr=3e-2, rank=2),
    "apollo_mini_layerwise": dict(lr=3e-2),
    "apollo_dqn": dict(lr=1e-2, warmup=10),  # quasi-Newton: steps up to lr * g / 0.01, so a small lr
    "apollo_dqn_w": dict(lr=1e-2, warmup=10),
    "adamp": dict(lr=3e-2),
    "sgdp": dict(lr=3e-2),
    "adamw": dict(lr=3e-2, weight_decay=0.0),
    "amsgrad": dict(lr=3e-2, weight_decay=0.0),
}
NAMES = sorted(OPTIMIZERS) + [n + "_capped" for n in sorted(OPTIMIZERS)]


def test_every_registry_name_has_test_options():
    assert set(TEST_OPTIONS) == set(OPTIMIZERS)


def _options(name):
    spec, _ = parse_name(name)
    return dict(TEST_OPTIONS[spec.name])


def _build(name, params, **extra):
    return build_optimizer(name, params, **{**_options(name), **extra})


def _quadratic_params(dtype=torch.float32):
    torch.manual_seed(0)
    return [("w", nn.Parameter(torch.randn(6, 5, dtype=dtype))), ("b", nn.Parameter(torch.randn(5, dtype=dtype)))]


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_quadratic(name):
    params = _quadratic_params()
    targets = [torch.full(p.shape, 0.5) for _, p in params]
    opt = _build(name, params)

    def loss_fn():
        return sum(((p - t) ** 2).sum() for (_, p), t in zip(params, targets))

    start = loss_fn().item()
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss_fn().item() < 0.05 * start


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_converges_on_a_tiny_mlp(name):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = torch.sin(x[:, :2] * 2.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = _build(name, model)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_params_stay_bf16(name):
    params = _quadratic_params(torch.bfloat16)
    before = [p.detach().clone() for _, p in params]
    opt = _build(name, params)
    for _ in range(3):
        for _, p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    for (_, p), b in zip(params, before):
        assert p.dtype == torch.bfloat16
        assert not torch.equal(p, b)


@pytest.mark.parametrize("name", NAMES)
def test_param_without_grad_is_unchanged(name):
    params = _quadratic_params()
    opt = _build(name, params)
    frozen = params[1][1].detach().clone()
    params[0][1].grad = torch.ones(6, 5)
    opt.step()
    assert torch.equal(params[1][1], frozen)


@pytest.mark.parametrize("name", NAMES)
def test_per_group_lr_is_respected(name):
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6, 5)), nn.Parameter(torch.randn(6, 5))
    # ApolloDQN warms up towards the constructor's lr whatever a group says (as published): no warmup here.
    extra = {"warmup": 0} if parse_name(name)[0].cls.__name__ in ("ApolloDQN", "ApolloW") else {}
    opt = _build(name, [{"params": [("a", a)]}, {"params": [("b", b)], "lr": 0.0}], **extra)
    b0 = b.detach().clone()
    a0 = a.detach().clone()
    for _ in range(2):
        a.grad, b.grad = torch.ones(6, 5), torch.ones(6, 5)
        opt.step()
    assert torch.equal(b, b0) and not torch.equal(a, a0)


@pytest.mark.parametrize("name", NAMES)
def test_exact_resume(name):
    def run(params, opt, steps, start):
        for t in range(start, start + steps):
            g = torch.Generator().manual_seed(t)
            for _, p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    straight = _quadratic_params()
    run(straight, _build(name, straight), 6, 0)
    first = _quadratic_params()
    opt = _build(name, first)
    run(first, opt, 3, 0)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = [(n, nn.Parameter(p.detach().clone())) for n, p in first]
    opt2 = _build(name, resumed)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    run(resumed, opt2, 3, 3)
    for (_, a), (_, b) in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_bad_learning_rate_fails_at_construction(name):
    # Ours: "lr must be >= 0, got -1.0"; torch's AdamW: "Invalid learning rate: -1.0".
    with pytest.raises(ValueError, match=r"(lr must be >= 0, got -1|Invalid learning rate: -1)"):
        _build(name, _quadratic_params(), lr=-1.0)


# -- the registry itself --------------------------------------------------------------------------------


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        build_optimizer("adafactor", _quadratic_params())
    for name in available():
        assert name in str(info.value)


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'rnak' for optimizer 'apollo'; valid: .*rank"):
        build_optimizer("apollo", _quadratic_params(), rnak=4)


def test_capped_suffix_and_option_wrap_in_norm_growth_cap():
    opt = build_optimizer("apollo_capped", _quadratic_params(), rank=2)
    assert isinstance(opt, NormGrowthCap) and isinstance(opt.optimizer, Apollo)
    opt = build_optimizer("adamw", _quadratic_params(), norm_growth_cap={"tau": 1.05})
    assert isinstance(opt, NormGrowthCap) and opt.tau == 1.05


def test_model_input_splits_lowrank_and_plain_groups():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = build_optimizer("apollo_mini", model)
    assert [g["rank"] for g in opt.param_groups] == [None, 1]
    assert opt.param_groups[1]["param_names"] == ["0.weight", "2.weight"]
    assert opt.param_groups[1]["scale"] == 128.0
    opt = build_optimizer("apollo", model, target_modules=["0"], rank=4)
    assert opt.param_groups[1]["param_names"] == ["0.weight"]
    with pytest.raises(ValueError, match="target_modules applies to low-rank optimizers only"):
        build_optimizer("adamw", model, target_modules=["0"])


def test_adamw_via_registry_matches_hand_values():
    # torch AdamW, lr=0.1, wd=0.01, theta=1, g=0.5: decay first, then the Adam step of ~lr.
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = build_optimizer("adamw", [p], lr=0.1, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)  # torch's math, under the package's checks (classic.AdamW)
    p.grad = torch.tensor([0.5], dtype=torch.float64)
    opt.step()
    assert p.item() == pytest.approx(0.999 - 0.1 * 0.5 / (0.5 + 1e-8), rel=0, abs=1e-12)  # 0.899000002


def test_amsgrad_takes_max_of_raw_second_moment():
    # lr=0.1, wd=0, g1=1, g2=0. Step 2: v2 = 0.000999 < vmax = 0.001, denom = sqrt(0.001/(1-0.999^2)).
    p = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = build_optimizer("amsgrad", [p], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step()
    first = -p.item()
    p.grad = torch.tensor([0.0], dtype=torch.float64)
    opt.step()
    second = -p.item() - first
    m_hat = 0.09 / (1 - 0.9**2)
    expected = 0.1 * m_hat / (math.sqrt(0.001 / (1 - 0.999**2)) + 1e-8)
    assert first == pytest.approx(0.1 / (1 + 1e-8), abs=1e-9)
    assert second == pytest.approx(expected, rel=1e-9)
    assert second == pytest.approx(0.0669723, abs=5e-8)  # the reference's number; plain Adam gives 0.0670058


class _TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)

    def get_output_embeddings(self):
        return self.head

    def forward(self, x):
        return self.head(self.body(x))


def test_all_linear_leaves_the_output_embedding_dense_through_ddp_and_compile(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lowrank_opt import lowrank_param_groups, lowrank_targets

    model = _TinyLM()
    assert [n for n, _ in lowrank_targets(model)] == ["body.weight"]
    compiled = torch.compile(model)  # an OptimizedModule around it (_orig_mod); nothing is compiled here
    assert [n for n, _ in lowrank_targets(compiled)] == ["_orig_mod.body.weight"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrapped, prefix in ((DistributedDataParallel(model), "module."),
                                (DistributedDataParallel(compiled), "module._orig_mod.")):
            assert [n for n, _ in lowrank_targets(wrapped)] == [prefix + "body.weight"]
            dense = next(g for g in lowrank_param_groups(wrapped) if g["rank"] is None)
            assert prefix + "head.weight" in [n for n, _ in dense["params"]]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("given,expected", [
    ("attn,mlp", ["attn", "mlp"]),
    (["attn,mlp"], ["attn", "mlp"]),
    ([r"model\.layers\.\d{1,2}\.self_attn\.q_proj"], [r"model\.layers\.\d{1,2}\.self_attn\.q_proj"]),
    (r"layers\.\d{1,2}\.(q|k)_proj,mlp", [r"layers\.\d{1,2}\.(q|k)_proj", "mlp"]),
    (r"layers\.[0,1]\.q_proj", r"layers\.[0,1]\.q_proj"),
    (["all-linear"], "all-linear"),
])
def test_target_modules_split_only_at_commas_between_names(given, expected):
    from lowrank_opt.registry import normalize_target_modules

    assert normalize_target_modules(given) == expected


def test_a_regex_with_a_quantifier_selects_its_matrices():
    model = nn.Sequential(nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)]))
    opt = build_optimizer("apollo", model, target_modules=[r"0\.\d{1,1}"], rank=2)  # layers 0-9, not 10 and 11
    assert opt.param_groups[-1]["param_names"] == [f"0.{i}.weight" for i in range(10)]

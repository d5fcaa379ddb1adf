"""Every model family, MoE included: what goes low-rank, per-expert APOLLO, training and exact resume.

transformers stores the experts of MoE models as one (E, out, in) parameter (gpt_oss and llama4: (E, in, out)).
The default targets take them as E matrices, each with its own projection, moments, scaling and limiter; routers,
embeddings, the head, norms and biases stay dense.
"""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch import nn
from tiny_models import FAMILIES, build

from lowrank_opt import Apollo, lowrank_param_groups
from lowrank_opt.registry import build_optimizer

pytest.importorskip("transformers")


def _batch(seed=0):
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps, seed=0):
    losses = []
    for t in range(steps):
        ids = _batch(seed)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _lowrank_names(opt):
    names = set()
    for group in opt.param_groups:
        if group.get("rank") is not None:
            names.update(group["param_names"])
    return names


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("optim", ["apollo", "apollo_mini"])
def test_every_family_trains_its_projections_low_rank_per_expert_and_resumes_exactly(family, optim):
    _, pattern, experts = FAMILIES[family]
    model = build(family)
    opt = build_optimizer(optim, model, lr=1e-2, **({"rank": 4} if optim == "apollo" else {}))
    expected = {n for n, _ in model.named_parameters() if re.search(pattern, n)}
    assert _lowrank_names(opt) == expected  # routers, embeddings, head, norms and biases are dense
    losses = _train(model, opt, 6)
    assert losses[-1] < losses[0], losses
    rank = 4 if optim == "apollo" else 1
    params = dict(model.named_parameters())
    for name in expected:
        p, state = params[name], opt.state[params[name]]
        if p.ndim == 3:  # E matrices: moments (E, r x max(out, in)), a projection and a limiter per expert
            assert p.shape[0] == experts and state["exp_avg"].shape[0] == experts
            assert state["exp_avg"].shape[1:].numel() == rank * max(p.shape[1:]) and rank in state["exp_avg"].shape[1:]
            assert state["limiter_norm"].shape == (experts,)
            assert opt.projection_matrix(p).shape == (experts, rank, min(p.shape[1:]))
        else:
            assert state["exp_avg"].numel() == rank * max(p.shape)
    # Resume: 3 steps, a weights-only checkpoint, 3 more steps equal 6 straight steps, bit for bit.
    straight, resumed = build(family), build(family)
    opt_a = build_optimizer(optim, straight, lr=1e-2)
    _train(straight, opt_a, 3)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optimizer": opt_a.state_dict()}, buffer)
    _train(straight, opt_a, 3, seed=1)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt_b = build_optimizer(optim, resumed, lr=1e-2)
    opt_b.load_state_dict(saved["optimizer"])
    _train(resumed, opt_b, 3, seed=1)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("targets", [None, "all-linear", ["all-linear"]])
def test_default_and_all_linear_targets_take_the_experts(targets):
    model = build("mixtral")
    kwargs = {} if targets is None else {"target_modules": targets}
    names = _lowrank_names(build_optimizer("apollo", model, **kwargs))
    assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"} <= names
    assert not any(".gate.weight" in n for n in names)


def _experts(shape, seed=0):
    return nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


@pytest.mark.parametrize("shape", [(4, 12, 7), (4, 6, 15), (3, 8, 8)])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
@pytest.mark.parametrize("transposed", [False, True])
def test_stacked_experts_equal_separate_matrices_with_the_same_projections(shape, scale_type, transposed):
    """E matrices in one (E, m, n) parameter give the updates of E separate 2-D parameters, each stepped by its
    own Apollo with that expert's projection; an expert without tokens (a zero gradient) included."""
    experts = _experts(shape)
    singles = [nn.Parameter(experts.detach()[e].clone()) for e in range(shape[0])]
    options = dict(lr=1e-2, rank=3, scale_type=scale_type, update_proj_gap=3, weight_decay=0.1, transposed=transposed)
    stacked = Apollo([{"params": [("experts", experts)], "stacked": True}], **options)
    separate = [Apollo([(f"expert{e}", w)], **options) for e, w in enumerate(singles)]
    generator = torch.Generator().manual_seed(1)
    for step in range(8):
        grad = torch.randn(shape, generator=generator, dtype=torch.float64)
        if step == 2:
            grad[1] = 0.0  # no token reached expert 1
        projections = stacked.projection_matrix(experts)
        experts.grad = grad
        for e, (w, opt) in enumerate(zip(singles, separate)):
            w.grad = grad[e].clone()
            opt._projection = lambda part, plan, key, step, dtype, p=projections[e]: p.unsqueeze(0).to(dtype)
            opt.step()
        stacked.step()
    for e, w in enumerate(singles):
        torch.testing.assert_close(experts.detach()[e], w.detach(), rtol=1e-12, atol=1e-14)
    assert not torch.equal(experts.detach(), _experts(shape))
    projections = stacked.projection_matrix(experts)
    assert len({p.sum().item() for p in projections}) == shape[0]  # each expert its own projection


def test_stacked_experts_are_computed_batched_not_one_by_one(monkeypatch):
    """One batched product per step for all experts: no Python loop over experts in the update."""
    calls = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: calls.append((a.shape, b.shape)) or real(a, b))
    experts = _experts((16, 12, 7))
    opt = Apollo([{"params": [experts], "stacked": True}], rank=3)
    experts.grad = torch.randn_like(experts)
    opt.step()
    assert calls == [((16, 12, 7), (16, 7, 3))]


def test_a_3d_weight_that_cannot_be_classified_is_refused_with_the_fix():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Parameter(torch.zeros(4, 6, 8))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = Odd()
            self.out = nn.Linear(8, 8)

    model = Model()
    with pytest.raises(ValueError, match=r"layer\.proj \(shape \(4, 6, 8\), in a Odd\).*stacked="):
        lowrank_param_groups(model, ["layer"])
    groups = lowrank_param_groups(model, ["layer"], stacked={"layer.proj": "out_in"})
    assert [g.get("stacked", False) for g in groups if g.get("rank", 0) is not None] == [True]
    assert lowrank_param_groups(model)[-1]["params"] == [("out.weight", model.out.weight)]  # all-linear skips it


def test_routers_are_dense_unless_asked_for():
    model = build("qwen2_moe")
    names = {n for g in lowrank_param_groups(model, ["mlp"]) if g.get("rank", 0) is not None for n, _ in g["params"]}
    assert not any(n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) for n in names)
    with pytest.raises(ValueError, match="names only routers.*include_routers=True"):
        lowrank_param_groups(model, ["all-linear", "shared_expert_gate"])
    groups = lowrank_param_groups(model, ["shared_expert_gate"], include_routers=True)
    assert {n for n, _ in groups[-1]["params"]} == {f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in range(2)}


MODES = {
    "layerwise": dict(name="apollo_layerwise"),
    "bf16-stochastic-rounding": dict(dtype=torch.bfloat16),
    "8bit-dense-states": dict(options=dict(dense_state_bits=8)),
    "int8-linear-weights": dict(int8=True),
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_experts_train_and_resume_exactly_in_every_mode(mode):
    """Layer-wise updates, bf16 weights with stochastic rounding, 8-bit dense states and int8 Linear weights (the
    experts, not nn.Linear, stay in float) with fused experts: training moves the loss and a weights-only
    checkpoint resumes bit for bit; layer-wise equals the normal step."""
    pytest.importorskip("bitsandbytes")
    from lowrank_opt.quant import quantize_model_

    spec = MODES[mode]
    dtype, name, options = spec.get("dtype", torch.float32), spec.get("name", "apollo"), spec.get("options", {})

    def make():
        model = build("qwen3_moe", dtype=dtype)
        if spec.get("int8"):
            assert quantize_model_(model)  # the attention matrices
        return model, build_optimizer(name, model, lr=1e-2, rank=4, **options)

    straight, opt = make()
    losses = _train(straight, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": straight.state_dict(), "optimizer": opt.state_dict()}, buffer)
    losses += _train(straight, opt, 3, seed=1)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed, opt2 = make()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    assert _train(resumed, opt2, 3, seed=1) == losses[3:]
    assert losses[2] < losses[0]
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    experts = straight.model.layers[0].mlp.experts.gate_up_proj
    assert experts.dtype == dtype and opt.state[experts]["exp_avg"].shape == (4, 48, 4)  # (E, 2I, r): tall experts
    if mode == "layerwise":
        normal = build("qwen3_moe")
        assert _train(normal, build_optimizer("apollo", normal, lr=1e-2, rank=4), 3) == losses[:3]


def test_experts_kept_flattened_are_refused_with_the_fix_not_trained_as_something_else():
    """dbrx keeps each layer's experts as 2-D (E * F, H) weights: all-linear refuses them by name (they would
    otherwise be one big matrix, or silently AdamW), and targets that leave them out work."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("dbrx", d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=128,
                                  attn_config={"kv_n_heads": 2, "rope_theta": 1e4, "clip_qkv": 8},
                                  ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"ffn\.experts\.mlp \(DbrxExpertGLU\).*leave it out"):
        lowrank_param_groups(model)
    groups = lowrank_param_groups(model, ["attn"])
    assert {n for n, _ in groups[-1]["params"]} == {"transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight",
                                                     "transformer.blocks.0.norm_attn_norm.attn.out_proj.weight"}

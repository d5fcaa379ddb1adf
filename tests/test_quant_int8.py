"""Int8 weights for training (lowrank_opt.quant.int8): codec error bounds, unbiased and reproducible stochastic
re-quantization, the Int8Linear layer (gradient carrier, no saved float weight), checkpoints, training."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_opt.quant.int8 import (
    QMAX,
    Int8Linear,
    apply_int8_update_,
    dequantize_int8,
    int8_module_of,
    int8_weight_bytes,
    quantize_int8,
    quantize_model_,
    stochastic_requantize_int8_,
)

ROOT = Path(__file__).resolve().parents[1]
EPS32 = torch.finfo(torch.float32).eps


def _group_scale_per_element(scales: torch.Tensor, cols: int, group: int) -> torch.Tensor:
    return scales.repeat_interleave(group, dim=1)[:, :cols]


@pytest.mark.parametrize("group", [128, 7, None])
def test_round_to_nearest_error_is_at_most_half_a_step(group):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(19, 300, generator=g) * torch.logspace(-3, 1, 19)[:, None]  # rows of different scales
    w[3, :128] = 0.0  # an all-zero group
    codes, scales = quantize_int8(w, group)
    size = 300 if group is None else group
    groups = math.ceil(300 / size)  # 300 is not a multiple of 128 or 7: a short last group
    assert codes.dtype == torch.int8 and codes.shape == (19, 300)
    assert scales.dtype == torch.float32 and scales.shape == (19, groups)
    assert codes.abs().max().item() <= QMAX and (codes != -128).all()
    # s = max|W_group| / 127, computed independently here
    padded = F.pad(w.abs(), (0, groups * size - 300)).view(19, groups, size)
    assert torch.equal(scales, padded.amax(dim=-1) / 127)
    if group == 128:
        assert scales[3, 0].item() == 0.0 and (codes[3, :128] == 0).all()
    step = _group_scale_per_element(scales, 300, size)
    error = (dequantize_int8(codes, scales, group) - w).abs()
    assert (error <= step / 2 + 4 * EPS32 * w.abs()).all()
    # and the bound is reached, roughly: round-to-nearest errors spread over [0, s/2]
    assert (error / step.clamp_min(1e-30)).max().item() > 0.45


def test_dequantize_to_bf16_rounds_the_fp32_value_once():
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    codes, scales = quantize_int8(w, 128)
    assert torch.equal(dequantize_int8(codes, scales, 128, torch.bfloat16),
                       dequantize_int8(codes, scales, 128).to(torch.bfloat16))


def _grid_weight(rows=64, cols=256, group=128, seed=2):
    """A weight exactly on its int8 grid, with codes well inside [-127, 127] (so nothing grows)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-100, 101, (rows, cols), generator=g, dtype=torch.int8)
    codes[:, ::group] = 127  # the group maximum fixes the scale at what we choose
    scales = torch.rand(rows, math.ceil(cols / group), generator=g) + 0.5
    return codes, scales


def test_stochastic_requantization_is_unbiased():
    codes, scales = _grid_weight()
    w = dequantize_int8(codes, scales, 128)
    step = _group_scale_per_element(scales, 256, 128)
    # an update of a fraction f of a step, f different per column; codes at 127 stay put (updates go down)
    fraction = torch.linspace(0.05, 0.95, 256)
    target = w - fraction * step
    draws = 400
    total = torch.zeros_like(w, dtype=torch.float64)
    for seed in range(draws):
        c, s = codes.clone(), scales.clone()
        stochastic_requantize_int8_(target.clone(), c, s, 128, torch.Generator().manual_seed(seed))
        assert torch.equal(s, scales)  # values still fit: the grid is kept
        total += dequantize_int8(c, s, 128).double()
    mean = total / draws
    # each draw lands on one of the two neighbours: variance s^2 f (1 - f); standard error of the mean
    sem = step.double() * torch.sqrt(fraction * (1 - fraction) / draws).double()
    z = (mean - target.double()).abs() / sem
    assert z.max().item() < 6.0  # 16384 elements: the largest |z| of normal draws is about 4.5
    assert z.mean().item() < 1.0  # E|z| = 0.8 for an unbiased estimate
    # round-to-nearest on the same grid is biased by up to half a step: at f = 1/2 that is 0.5 / sqrt(1/4 / 400)
    # = 20 standard errors, so the test can tell
    nearest = torch.round(target / step) * step
    assert ((nearest.double() - target.double()).abs() / sem).max().item() > 15


def test_stochastic_requantization_is_reproducible_with_a_seed():
    codes, scales = _grid_weight(seed=3)
    target = dequantize_int8(codes, scales, 128) + 0.3 * _group_scale_per_element(scales, 256, 128)
    results = []
    for seed in (5, 5, 6):
        c, s = codes.clone(), scales.clone()
        stochastic_requantize_int8_(target.clone(), c, s, 128, torch.Generator().manual_seed(seed))
        results.append(c)
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_a_group_that_outgrows_its_scale_gets_a_larger_one():
    codes, scales = _grid_weight(rows=2, cols=256, seed=4)
    w = dequantize_int8(codes, scales, 128)
    w[0, 5] = 3.0 * 127 * scales[0, 0]  # three times the group's range
    c, s = codes.clone(), scales.clone()
    stochastic_requantize_int8_(w.clone(), c, s, 128, torch.Generator().manual_seed(0))
    assert s[0, 0].item() == pytest.approx(w[0, :128].abs().max().item() / 127, rel=1e-7)
    assert torch.equal(s[0, 1:], scales[0, 1:]) and torch.equal(s[1], scales[1])
    assert c[0, 5].item() == 127
    error = (dequantize_int8(c, s, 128) - w).abs()
    assert (error <= _group_scale_per_element(s, 256, 128) * (1 + 1e-6)).all()  # within one (new) step


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def test_update_works_on_row_blocks_only():
    lin = nn.Linear(256, 96, bias=False)
    module = Int8Linear.from_linear(lin, 128)
    before = module.dequantized_weight()
    delta = torch.randn(96, 256) * 1e-3
    block = 8 * 256  # 8 rows per block
    with _LargestAllocation() as mode:
        apply_int8_update_(module.weight, delta, generator=torch.Generator().manual_seed(0), block_elements=block)
    assert mode.largest <= block < 96 * 256
    after = module.dequantized_weight()
    # W - U, up to one (stochastic) step per element
    step = _group_scale_per_element(module.weight_scale, 256, 128)
    assert ((after - (before - delta)).abs() <= step * (1 + 1e-6)).all()


def test_update_callable_sees_rows_and_blocks_give_the_same_bits_on_cpu():
    torch.manual_seed(0)
    a = Int8Linear.from_linear(nn.Linear(256, 40), 128)
    b = copy.deepcopy(a)
    grad = torch.randn(40, 256)
    seen = []

    def update(w, rows):
        seen.append((rows.start, rows.stop))
        w.add_(grad[rows], alpha=-1e-3).mul_(1 - 1e-4)

    apply_int8_update_(a, update, generator=torch.Generator().manual_seed(1), block_elements=10 * 256)
    assert seen == [(0, 10), (10, 20), (20, 30), (30, 40)]
    apply_int8_update_(b, lambda w, rows: w.add_(grad[rows], alpha=-1e-3).mul_(1 - 1e-4),
                       generator=torch.Generator().manual_seed(1))
    # CPU's generator yields the same stream in pieces as at once
    assert torch.equal(a.weight_int8, b.weight_int8) and torch.equal(a.weight_scale, b.weight_scale)


def test_int8_linear_equals_a_float_linear_with_the_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(300, 24)
    module = Int8Linear.from_linear(lin, 128)
    reference = nn.Linear(300, 24)
    with torch.no_grad():
        reference.weight.copy_(module.dequantized_weight())
        reference.bias.copy_(lin.bias)
    x = torch.randn(2, 5, 300, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = module(x), reference(x_ref)
    assert torch.equal(out, ref)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(module.bias.grad, reference.bias.grad, rtol=1e-6, atol=1e-6)
    assert module.bias is lin.bias  # the bias parameter is reused


def test_backward_saves_no_float_weight():
    module = Int8Linear.from_linear(nn.Linear(256, 64, bias=False), 128)
    x = torch.randn(3, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, tuple(t.shape))) or t,
                                                  lambda t: t):
        module(x).sum().backward()
    assert (torch.int8, (64, 256)) in saved
    assert not any(dtype.is_floating_point and numel_shape == (64, 256) for dtype, numel_shape in saved)


def test_gradient_carrier():
    module = Int8Linear.from_linear(nn.Linear(256, 32), 128)
    carrier = module.weight
    assert isinstance(carrier, nn.Parameter) and carrier.shape == (32, 256)
    assert carrier.untyped_storage().nbytes() == carrier.element_size()  # one element
    assert torch.isnan(carrier).all()
    assert int8_module_of(carrier) is module and int8_module_of(module.bias) is None
    fired = []
    carrier.register_post_accumulate_grad_hook(lambda p: fired.append(tuple(p.grad.shape)))
    module(torch.randn(4, 256)).sum().backward()
    assert fired == [(32, 256)] and carrier.grad.is_contiguous()
    # an optimizer that does not know the int8 form fails loudly
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.optim.AdamW([carrier], lr=1e-3).step()
    with pytest.raises(RuntimeError, match="single memory location"):
        torch.optim.SGD([carrier], lr=1e-3, foreach=True).step()


def test_to_dtype_keeps_fp32_scales_and_a_one_element_carrier():
    module = Int8Linear.from_linear(nn.Linear(256, 32), 128)
    scales = module.weight_scale.clone()
    carrier = module.weight
    module.to(torch.bfloat16)
    assert module.weight is carrier and carrier.dtype == torch.bfloat16 and carrier.stride() == (0, 0)
    assert module.weight_scale.dtype == torch.float32 and torch.equal(module.weight_scale, scales)
    assert module.weight_int8.dtype == torch.int8 and module.bias.dtype == torch.bfloat16
    out = module(torch.randn(2, 256, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    twin = copy.deepcopy(module)
    assert int8_module_of(twin.weight) is twin and twin.weight.stride() == (0, 0)
    assert torch.equal(twin.weight_int8, module.weight_int8)


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(ROOT / "configs" / "llama_tiny.json")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_quantize_model_swaps_the_linear_layers_but_not_the_head():
    model = _tiny_llama()
    float_names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    replaced = quantize_model_(model, group_size=128)
    config = model.config
    assert len(replaced) == 7 * config.num_hidden_layers  # q k v o gate up down
    assert "lm_head" not in replaced and type(model.lm_head) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, Int8Linear)  # in 344: groups 128, 128, 88
    assert model.model.layers[0].mlp.down_proj.weight_scale.shape == (128, 3)
    # parameter names and shapes are the float model's (optimizer target rules keep working)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == float_names
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.weight_int8" in keys
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    ids = torch.randint(0, config.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).logits).all()
    weight_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "weight_" in n)
    h, i = config.hidden_size, config.intermediate_size
    per_layer = 4 * int8_weight_bytes(h, h) + 2 * int8_weight_bytes(i, h) + int8_weight_bytes(h, i)
    assert weight_bytes == config.num_hidden_layers * per_layer


def test_tied_weights_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight

    with pytest.raises(ValueError, match="a.weight is shared with another module"):
        quantize_model_(Tied())


def test_checkpoint_round_trip_with_weights_only():
    model = _tiny_llama()
    quantize_model_(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    torch.manual_seed(123)
    fresh = _tiny_llama()
    for p in fresh.parameters():  # a different model before loading
        nn.init.normal_(p)
    quantize_model_(fresh)
    fresh.load_state_dict(state)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    # a float checkpoint does not load silently into the int8 model, nor the int8 one into a float model
    with pytest.raises(RuntimeError, match="a float weight cannot be loaded into Int8Linear"):
        fresh.load_state_dict(_tiny_llama().state_dict())
    with pytest.raises(RuntimeError, match="Missing key"):
        _tiny_llama().load_state_dict(state)


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _train_int8(model, ids, steps, lr, stochastic=True):
    """Adam on every parameter; the int8 weights through apply_int8_update_ (fp32 moments, test only)."""
    int8_params = [p for p in model.parameters() if int8_module_of(p) is not None]
    others = [p for p in model.parameters() if int8_module_of(p) is None]
    dense = torch.optim.Adam(others, lr=lr)
    moments = {p: (torch.zeros(p.shape), torch.zeros(p.shape)) for p in int8_params}
    losses = []
    for step in range(1, steps + 1):
        loss = _lm_loss(model, ids)
        losses.append(loss.item())
        model.zero_grad(set_to_none=True)
        loss.backward()
        dense.step()
        bias1, bias2 = 1 - 0.9**step, 1 - 0.999**step
        for index, p in enumerate(int8_params):
            m, v = moments[p]
            grad = p.grad.float()
            m.mul_(0.9).add_(grad, alpha=0.1)
            v.mul_(0.999).addcmul_(grad, grad, value=0.001)

            def update(w, rows, m=m, v=v):
                w.addcdiv_(m[rows], v[rows].sqrt().add_(1e-8), value=-lr * math.sqrt(bias2) / bias1)

            generator = torch.Generator().manual_seed(1000 * step + index)
            if stochastic:
                apply_int8_update_(p, update, generator=generator)
            else:  # round-to-nearest on the kept grid, for comparison
                module = int8_module_of(p)
                w = module.dequantized_weight(torch.float32)
                update(w, slice(None))
                grouped = module.weight_scale.repeat_interleave(module.group_size, 1)[:, : w.shape[1]]
                module.weight_int8.copy_(torch.round(w / grouped).clamp_(-QMAX, QMAX))
            p.grad = None
    return losses


@pytest.mark.slow
def test_tiny_llama_trains_through_the_int8_path():
    model = _tiny_llama()
    quantize_model_(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = _train_int8(model, ids, steps=20, lr=3e-3)
    assert losses[-1] < losses[0] - 1.0, losses  # memorising one batch: the loss falls by over a nat
    float_model = _tiny_llama()
    optimizer = torch.optim.Adam(float_model.parameters(), lr=3e-3)
    float_losses = []
    for _ in range(20):
        loss = _lm_loss(float_model, ids)
        float_losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # int8 weights (group 128) reach at least half of the float run's reduction
    assert losses[0] - losses[-1] > 0.5 * (float_losses[0] - float_losses[-1]), (losses, float_losses)


def test_small_updates_survive_only_with_stochastic_rounding():
    # lr so small that every Adam step (about lr per element) is far below half an int8 step
    results = {}
    for stochastic in (True, False):
        model = _tiny_llama()
        quantize_model_(model)
        before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_int8")}
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        _train_int8(model, ids, steps=3, lr=1e-5, stochastic=stochastic)
        changed = sum(int((b != before[n]).sum()) for n, b in model.named_buffers() if n in before)
        results[stochastic] = changed
    assert results[False] == 0  # round-to-nearest: every update is lost
    assert results[True] > 0  # stochastic rounding: some codes move, with probability |update| / step

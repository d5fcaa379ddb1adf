"""The lean causal-LM loss (lowrank_opt.loss): equal to the plain logits path in value and gradients, and
never allocating a tokens x vocabulary tensor."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lowrank_opt.loss import (
    causal_lm_loss,
    causal_lm_loss_from_model,
    linear_cross_entropy,
    shift_labels,
)

ROOT = Path(__file__).resolve().parents[1]


def _problem(tokens=37, vocab=50, hidden=16, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, b, y


def _grads(loss, tensors):
    grads = torch.autograd.grad(loss, [t for t in tensors if t is not None])
    return list(grads)


def _assert_close_scaled(actual, expected, rel=1e-6):
    """Within ``rel`` of the tensor's own scale: |a - e| <= rel * (|e| + max|e|)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# chunk shapes: one tile, uneven last chunks in both directions, single tokens, chunks larger than the input
CHUNKS = [(37, 50), (8, 16), (5, 7), (1, 50), (64, 64), (8, 1)]


@pytest.mark.parametrize("token_chunk,vocab_chunk", CHUNKS)
def test_matches_plain_loss_and_gradients_fp32(token_chunk, vocab_chunk):
    h, w, b, y = _problem()
    y[3] = -100
    y[8:16] = -100  # with token chunk 8: a whole chunk ignored (skipped), with 5: chunks partly ignored
    ref = F.cross_entropy(F.linear(h, w, b), y)
    ours = linear_cross_entropy(h, w, y, b, token_chunk_size=token_chunk, vocab_chunk_size=vocab_chunk)
    assert ours.dtype == torch.float32
    _assert_close_scaled(ours, ref)
    for mine, theirs in zip(_grads(ours, [h, w, b]), _grads(ref, [h, w, b])):
        _assert_close_scaled(mine, theirs)


def test_sum_reduction_and_num_items_in_batch():
    h, w, b, y = _problem(seed=1)
    y[:4] = -100
    ref_sum = F.cross_entropy(F.linear(h, w, b), y, reduction="sum")
    ours_sum = linear_cross_entropy(h, w, y, b, reduction="sum", token_chunk_size=6, vocab_chunk_size=9)
    _assert_close_scaled(ours_sum, ref_sum)
    # transformers' fixed_cross_entropy: sum / num_items_in_batch (int or tensor), e.g. the token count of the
    # whole accumulated batch, which differs from this micro-batch's count
    for items in (100, torch.tensor(100)):
        ref = F.cross_entropy(F.linear(h, w, b), y, reduction="sum") / 100
        ours = linear_cross_entropy(h, w, y, b, num_items_in_batch=items, token_chunk_size=6, vocab_chunk_size=9)
        _assert_close_scaled(ours, ref)
        for mine, theirs in zip(_grads(ours, [h, w, b]), _grads(ref, [h, w, b])):
            _assert_close_scaled(mine, theirs)


def test_all_labels_ignored_gives_nan_mean_and_zero_gradients_like_torch():
    h, w, b, y = _problem(seed=2)
    y[:] = -100
    ref = F.cross_entropy(F.linear(h, w, b), y)
    ours = linear_cross_entropy(h, w, y, b, token_chunk_size=8, vocab_chunk_size=16)
    assert math.isnan(ref.item()) and math.isnan(ours.item())
    for mine, theirs in zip(_grads(ours, [h, w, b]), _grads(ref, [h, w, b])):
        assert torch.equal(theirs, torch.zeros_like(theirs))
        assert torch.equal(mine, torch.zeros_like(mine))
    summed = linear_cross_entropy(h, w, y, b, num_items_in_batch=5)
    assert summed.item() == 0.0


def test_ignore_index_other_than_default_and_batched_shape():
    h, w, b, y = _problem(tokens=24, seed=3)
    y[::3] = 7  # class 7 is the ignored one here
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=7)
    ours = linear_cross_entropy(h.view(4, 6, -1), w, y.view(4, 6), b, ignore_index=7, token_chunk_size=5,
                                vocab_chunk_size=11)
    _assert_close_scaled(ours, ref)
    for mine, theirs in zip(_grads(ours, [h, w, b]), _grads(ref, [h, w, b])):
        _assert_close_scaled(mine, theirs)


def test_frozen_weight_and_no_bias():
    h, w, _, y = _problem(seed=4, bias=False)
    w.requires_grad_(False)
    ref = F.cross_entropy(F.linear(h, w), y)
    ours = linear_cross_entropy(h, w, y, token_chunk_size=9, vocab_chunk_size=13)
    (g_ours,) = torch.autograd.grad(ours, h)
    (g_ref,) = torch.autograd.grad(ref, h)
    _assert_close_scaled(g_ours, g_ref)


def test_bf16_inputs_compute_in_fp32():
    """bf16 hidden states and weights: the loss is the fp32 computation on the upcast inputs (fp32 result),
    and each gradient is that computation's fp32 gradient rounded once to bf16, so within one bf16 spacing
    (2^-7 relative: 8 significant bits) of it; a bf16 logits path is far off in the loss."""
    h, w, b, y = _problem(tokens=40, vocab=300, hidden=32, dtype=torch.bfloat16, seed=5)
    y[10:20] = -100
    ours = linear_cross_entropy(h, w, y, b, token_chunk_size=16, vocab_chunk_size=64)
    assert ours.dtype == torch.float32
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h, w, b))
    ref = F.cross_entropy(F.linear(h32, w32, b32), y)
    _assert_close_scaled(ours, ref)
    for mine, theirs, src in zip(_grads(ours, [h, w, b]), _grads(ref, [h32, w32, b32]), (h, w, b)):
        assert mine.dtype == torch.bfloat16 == src.dtype
        # one rounding to bf16: |bf16(x) - x| <= 2^-8 |x| (half a spacing), plus fp32 noise near a tie
        bound = theirs.abs() * 2.0**-8 + 1e-6 * theirs.abs().max()
        assert ((mine.float() - theirs).abs() <= bound).all()
    # the HF path rounds the logits to bf16 first: its loss differs from the fp32 one by far more than ours
    hf_loss = F.cross_entropy(F.linear(h, w, b).float(), y)
    assert abs(hf_loss.item() - ref.item()) > 100 * abs(ours.item() - ref.item())


def test_bad_input_is_rejected_before_work():
    h, w, b, y = _problem()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        linear_cross_entropy(h, w, torch.where(y == y[0], 50, y), b)
    with pytest.raises(ValueError, match="token_chunk_size must be an integer >= 1, got 0"):
        linear_cross_entropy(h, w, y, b, token_chunk_size=0)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        linear_cross_entropy(h, w, y, b, reduction="none")
    with pytest.raises(ValueError, match=r"hidden size 8 does not match weight shape \(50, 16\)"):
        linear_cross_entropy(h[:, :8], w, y, b)
    with pytest.raises(TypeError, match="labels must be an int64 tensor"):
        linear_cross_entropy(h, w, y.int(), b)
    with pytest.raises(ValueError, match="needs reduction='mean'"):
        linear_cross_entropy(h, w, y, b, reduction="sum", num_items_in_batch=3)


class _LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) any op returns while active: every tensor the loss and its
    backward allocate comes out of some op."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shape = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


def test_no_tokens_by_vocab_tensor_is_allocated():
    tokens, vocab, hidden = 256, 1000, 24
    h, w, b, y = _problem(tokens=tokens, vocab=vocab, hidden=hidden, seed=6)
    tile = (64, 128)
    with _LargestAllocation() as mode:
        loss = linear_cross_entropy(h, w, y, b, token_chunk_size=tile[0], vocab_chunk_size=tile[1])
        loss.backward()
    # the largest things it may hold: a tile, the weight's gradient (V x H), an fp32 copy of hidden (T x H)
    assert mode.largest <= max(tile[0] * tile[1], vocab * hidden, tokens * hidden), mode.shape
    assert mode.largest < tokens * vocab
    # the detector sees the plain path's logits
    with _LargestAllocation() as plain:
        F.cross_entropy(F.linear(h, w, b), y).backward()
    assert plain.largest >= tokens * vocab


@contextlib.contextmanager
def _cpu_peak_bytes():
    """Peak of live CPU tensor bytes allocated inside the block, from torch.profiler's memory timeline (the
    method of benchmarks/fit_7b.py)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    result: dict = {}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        yield result
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    result["peak"] = max((sum(row) for row in sizes), default=0)


def test_peak_memory_below_the_plain_path():
    tokens, vocab, hidden = 512, 4000, 32
    h, w, b, y = _problem(tokens=tokens, vocab=vocab, hidden=hidden, seed=7)
    with _cpu_peak_bytes() as plain:
        F.cross_entropy(F.linear(h, w, b), y).backward()
    h.grad = w.grad = b.grad = None
    with _cpu_peak_bytes() as lean:
        linear_cross_entropy(h, w, y, b, token_chunk_size=128, vocab_chunk_size=512).backward()
    logits_bytes = tokens * vocab * 4
    assert plain["peak"] >= 2 * logits_bytes  # logits and their log-softmax / gradient at least
    assert lean["peak"] < logits_bytes // 2, (lean["peak"], plain["peak"])


def test_shift_labels_matches_hf():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert shift_labels(labels).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]


def _tiny_llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(ROOT / "configs" / "llama_tiny.json")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


@pytest.mark.parametrize("num_items", [None, 29])
def test_llama_loss_and_gradients_equal_the_models_own(num_items):
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt that does not count
    attention_mask = torch.ones_like(input_ids)
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    params = [p for p in model.parameters()]

    ref = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
    ref_grads = torch.autograd.grad(ref, params)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    ours = causal_lm_loss_from_model(model, inputs, num_items, token_chunk_size=16, vocab_chunk_size=1000)
    our_grads = torch.autograd.grad(ours, params)
    _assert_close_scaled(ours, ref)
    for (name, _), mine, theirs in zip(model.named_parameters(), our_grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item(), msg=name)
    assert inputs["labels"] is labels  # the caller's dict is not modified


def test_causal_lm_loss_accepts_pre_shifted_labels():
    h, w, _, y = _problem(tokens=20, seed=8, bias=False)
    hidden = h.view(2, 10, -1)
    labels = y.view(2, 10)
    a = causal_lm_loss(hidden, w, labels)
    b = causal_lm_loss(hidden, w, shifted_labels=shift_labels(labels))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="exactly one of labels"):
        causal_lm_loss(hidden, w, labels, shifted_labels=shift_labels(labels))


def test_model_with_logit_transform_is_refused():
    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="final_logit_softcapping=30.0"):
        causal_lm_loss_from_model(model, {"input_ids": ids, "labels": ids})


def test_an_int8_lm_head_is_refused():
    from lowrank_opt.quant import quantize_model_

    model = _tiny_llama()
    quantize_model_(model, include_output_embedding=True)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="holds no values of its own"):
        causal_lm_loss_from_model(model, {"input_ids": ids, "labels": ids})


# ----------------------------------------------------------------------------------------------------------
# benchmarks/lean_loss.py: the script behind the peak-memory figures of docs/quantization.md


@pytest.fixture
def lean_loss_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("lean_loss_under_test", ROOT / "benchmarks" / "lean_loss.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_lean_loss_script_measures_every_path_inputs_and_gradients_included(lean_loss_script, tmp_path, capsys):
    script = lean_loss_script
    output = tmp_path / "lean_loss.json"
    tokens, vocab, hidden = 64, 500, 16
    cases = f"{tokens}x{vocab}x{hidden}:fp32,{tokens}x{vocab}x{hidden}:bf16"
    assert script.main(["--cases", cases, "--threads", "1", "--output", str(output)]) == 0
    payload = json.loads(output.read_text())
    rows = {(r["case"], r["path"]): r for r in payload["results"]}
    assert len(rows) == 6
    tile = 4 * tokens * vocab  # one fp32 tokens x vocabulary tensor (the default chunks exceed this case)
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        case = f"{tokens}x{vocab}x{hidden}:{dtype}"
        for path in ("plain", "torch", "lean"):
            row = rows[(case, path)]
            assert row["status"] == "ok", row
            # h (T x H) and w (V x H) in the case's dtype, int64 labels, and the gradients of h and w
            assert row["inputs_bytes"] == (tokens + vocab) * hidden * size + tokens * 8
            assert row["grad_bytes"] == (tokens + vocab) * hidden * size
            assert row["peak_bytes"] > row["inputs_bytes"] + row["grad_bytes"]
            assert row["scratch_bytes"] == row["peak_bytes"] - row["inputs_bytes"] - row["grad_bytes"]
            # (The allocator's running total at the profiler's start, subtracted from the peak, is whatever the
            # process held before: 0 alone, a few MB after other tests; so it is recorded, not asserted.)
            assert row["profiler_baseline_bytes"] >= 0
        plain, lean = rows[(case, "plain")], rows[(case, "lean")]
        assert lean["peak_bytes"] < plain["peak_bytes"]
        assert plain["scratch_bytes"] >= 2 * tile  # fp32 logits and their log-softmax at once
        assert lean["scratch_bytes"] >= tile  # its one tile is the whole logits here
        # loss.py's formula: 16 T + 4 T H + 4 Ct Cv, and for bf16 4 Ct H + 8 Cv H (Ct = T, Cv = V here)
        formula = 16 * tokens + 4 * tokens * hidden + tile + (0 if dtype == "fp32" else 4 * tokens * hidden
                                                               + 8 * vocab * hidden)
        assert lean["formula_scratch_bytes"] == formula
        comparison = next(c for c in payload["loss_comparison"] if c["case"] == case)
        assert comparison["reference"] == "plain"
        assert abs(comparison["differences"]["lean"]) < (1e-5 if dtype == "fp32" else 1e-2)
        assert comparison["max_loss_difference"] == pytest.approx(
            max(comparison["losses"].values()) - min(comparison["losses"].values()))
    printed = capsys.readouterr().out
    assert f"python benchmarks/lean_loss.py --cases {cases}" in printed
    assert f"| {tokens}x{vocab}x{hidden}:bf16 | lean | {lean['peak_bytes'] / 1e6:,.1f} |" in printed
    assert payload["environment"]["torch"] == torch.__version__


@pytest.mark.slow
def test_lean_loss_script_says_why_a_path_is_not_measured(lean_loss_script, tmp_path, capsys, monkeypatch):
    script = lean_loss_script
    monkeypatch.setattr(script, "torch_path_missing", lambda: "absent: no linear_cross_entropy in this torch")
    output = tmp_path / "skipped.json"
    # the default --skip leaves out the bf16 plain path at LLaMA-7B's head shape: no input is even drawn
    assert script.main(["--cases", "2048x32000x4096:bf16", "--paths", "plain,torch", "--output", str(output)]) == 0
    rows = {r["path"]: r for r in json.loads(output.read_text())["results"]}
    assert rows["plain"]["status"] == "skipped" and "--skip" in rows["plain"]["reason"]
    assert rows["torch"] == {**rows["torch"], "status": "absent",
                             "reason": "absent: no linear_cross_entropy in this torch"}
    printed = capsys.readouterr().out
    assert "| 2048x32000x4096:bf16 | plain | — |" in printed and "skipped by default" in printed


@pytest.mark.slow
@pytest.mark.parametrize("argv,named", [
    (["--cases", "64x500:fp32"], "'64x500:fp32'"),
    (["--cases", "64x500x16:int8"], "'int8'"),
    (["--paths", "plain,logits"], "'logits'"),
    (["--cases", "64x500x16:fp32", "--skip", "64x500x16:bf16:plain"], "64x500x16:bf16:plain"),
])
def test_lean_loss_script_rejects_bad_arguments_before_work(argv, named, lean_loss_script, tmp_path, capsys):
    script = lean_loss_script
    output = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_info:
        script.main([*argv, "--output", str(output)])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not output.exists()

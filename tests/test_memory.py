"""Memory estimator, measurement and the `lowrank-opt memory` CLI (CPU).

The estimator's optimizer states come from a dry-run step on meta tensors; here they are compared with the
bytes a real optimizer allocates after a real step, for every registry name and for the Hugging Face
optimizers (bitsandbytes 8-bit AdamW, GaLore, apollo-torch) built by the Trainer itself. The activation
formula is compared with what autograd really saves for backward.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig  # noqa: E402

from lowrank_opt import cli  # noqa: E402
from lowrank_opt.integrations.hf import parse_optim_args  # noqa: E402
from lowrank_opt.memory import (  # noqa: E402
    MemoryCallback,
    activation_bytes,
    estimate,
    known_optimizers,
    optimizer_state_bytes,
)
from lowrank_opt.registry import OPTIMIZERS, available, build_optimizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "llama_tiny.json"
GB = 1e9


def _tiny_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY))
    return model.to(dtype)


def _backward(model, seed=1, batch=2, seq=16):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    model(input_ids=ids, labels=ids).loss.backward()


# Options that keep every optimizer small and valid on the tiny model.
_OPTIONS = {name: ("rank=16" if spec.lowrank else "") for name, spec in OPTIMIZERS.items()}


# ----------------------------------------------------------------------------------------------------------
# LLaMA-7B: fast, no allocation, sane numbers (in a fresh process, so peak RSS means something)

_SEVEN_B = textwrap.dedent("""
    import json, resource, time
    from lowrank_opt.memory import estimate
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.process_time()  # CPU time: robust to other work on the machine (a figure, not asserted)
    out = {}
    for key, kw in {
        "adamw": dict(optimizer="adamw"),
        "adamw_master": dict(optimizer="adamw", master_weights=True),
        "adamw_8bit": dict(optimizer="adamw_8bit"),
        "galore": dict(optimizer="galore"),
        "apollo": dict(optimizer="apollo", optim_args="rank=256"),
        "apollo_bf16": dict(optimizer="apollo", optim_args="rank=256,state_dtype=bfloat16"),
        "apollo_mini": dict(optimizer="apollo_mini"),
        "apollo_layerwise": dict(optimizer="apollo_layerwise", gradient_checkpointing=True),
        "adamw_zero2": dict(optimizer="adamw", zero_stage=2, num_gpus=8),
        "adamw_zero3": dict(optimizer="adamw", zero_stage=3, num_gpus=8),
    }.items():
        out[key] = estimate("llama_7b", dtype="bf16", **kw).to_dict()
    out["seconds"] = time.process_time() - t0
    out["rss_growth"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def seven_b_process():
    """The LLaMA-7B estimates run in a fresh process (so that its peak RSS means something), started by the
    first test of this file and left to run on the other core while the in-process tests run."""
    proc = subprocess.Popen([sys.executable, "-c", _SEVEN_B], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def seven_b(seven_b_process):
    out, err = seven_b_process.communicate(timeout=300)
    assert seven_b_process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_llama_7b_estimates_start_in_the_background(seven_b_process):
    assert seven_b_process.poll() in (None, 0)


# ----------------------------------------------------------------------------------------------------------
# Optimizer states: estimate == real allocation


@pytest.mark.parametrize("name", available() + ["apollo_capped", "adamp_capped"])
def test_registry_states_match_a_real_step(name):
    """Every registry optimizer: bytes after one real step on real CPU tensors == the meta dry run."""
    base = name.replace("_capped", "")
    options = _OPTIONS[base]
    model = _tiny_model()
    kwargs = {"rank": 16} if options else {}
    opt = build_optimizer(name, model, **kwargs)
    _backward(model)  # layer-wise optimizers update inside this backward
    opt.step()
    measured = optimizer_state_bytes(opt)
    assert measured > 0
    est = estimate(TINY, name, optim_args=options, dtype="fp32", seq_len=16)
    assert est.optimizer_states == measured, (name, est.optimizer_states, measured)


@pytest.mark.parametrize("name,options", [
    ("apollo", "rank=16"),
    ("apollo", "rank=16,state_dtype=bfloat16"),
    ("apollo_mini", ""),
    ("adamw", ""),
    ("apollo_dqn", ""),
])
def test_bf16_states_match_a_real_step(name, options):
    model = _tiny_model(torch.bfloat16)
    opt = build_optimizer(name, model, **parse_optim_args(options))
    _backward(model)
    opt.step()
    est = estimate(TINY, name, optim_args=options, dtype="bf16", seq_len=16)
    assert est.optimizer_states == optimizer_state_bytes(opt)


def test_projection_cache_is_counted():
    model = _tiny_model()
    opt = build_optimizer("apollo", model, rank=16, cache_projection=True)
    _backward(model)
    opt.step()
    est = estimate(TINY, "apollo", optim_args="rank=16,cache_projection=true", dtype="fp32", seq_len=16)
    plain = estimate(TINY, "apollo", optim_args="rank=16", dtype="fp32", seq_len=16)
    assert est.optimizer_states == optimizer_state_bytes(opt)
    cache = est.components["optimizer_states.projection cache"]
    # P is r x min(m, n) fp32 per low-rank matrix: tiny LLaMA has 4 layers x (4 attention 128x128 + 3 MLP).
    assert cache == 4 * (4 * 16 * 128 + 3 * 16 * 128) * 4
    assert est.optimizer_states - plain.optimizer_states == cache


def _hf_optimizer(tmp_path, model, optim, optim_args):
    """The optimizer exactly as the Hugging Face Trainer builds it for --optim NAME (bnb embedding
    override, GaLore/APOLLO target selection included)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, optim_args=optim_args,
                             optim_target_modules="all-linear", use_cpu=True, report_to=[], learning_rate=1e-3)
    trainer = Trainer(model=model, args=args)
    return trainer.create_optimizer()


@pytest.mark.parametrize("optim,module,options", [
    ("adamw_bnb_8bit", "bitsandbytes", ""),
    ("galore_adamw", "galore_torch", "rank=16"),
    ("galore_adamw", "galore_torch", "rank=300"),  # above min(m, n): SVD truncates
    ("apollo_adamw", "apollo_torch", "rank=16"),
    ("apollo_adamw", "apollo_torch", "rank=200"),  # a random projection is not clipped
])
def test_hf_optimizer_states_match_the_real_packages(tmp_path, optim, module, options):
    pytest.importorskip(module)
    model = _tiny_model()
    opt = _hf_optimizer(tmp_path, model, optim, options)
    _backward(model)
    opt.step()
    est = estimate(TINY, optim, optim_args=options, dtype="fp32", seq_len=16)
    assert est.optimizer_states == optimizer_state_bytes(opt), (optim, options)


def test_optimizer_step_temporaries_are_measured():
    n = estimate(TINY, "adamw", dtype="fp32").n_params
    foreach = estimate(TINY, "adamw", dtype="fp32", seq_len=8)
    fused = estimate(TINY, "adamw_torch_fused", dtype="fp32", seq_len=8)
    apollo = estimate(TINY, "apollo", optim_args="rank=16", dtype="fp32", seq_len=8)
    assert foreach.components["step.scratch tensors"] == 4 * n  # sqrt(v) of every parameter at once
    assert fused.optim_args == {"fused": True} and fused.optimizer_states == foreach.optimizer_states
    assert fused.components["step.scratch tensors"] < foreach.components["step.scratch tensors"]
    # APOLLO's plain-AdamW tensors (embeddings, lm_head, norms) are updated a chunk at a time (2^22 elements on
    # accelerators, which the meta device stands for): its scratch is bounded by one fp32 chunk, not the model.
    from lowrank_opt.functional import CHUNK_ACCELERATOR as _DENSE_CHUNK_ACCELERATOR

    assert 0 < apollo.components["step.scratch tensors"] < foreach.components["step.scratch tensors"]
    assert apollo.components["step.scratch tensors"] <= 4 * _DENSE_CHUNK_ACCELERATOR
    # With short sequences the step is the peak: all gradients plus the scratch tensors.
    assert foreach.step_temporaries > 0
    assert foreach.total > fused.total


@pytest.mark.slow
def test_pure_bf16_step_scratch_is_bounded_by_a_chunk_not_the_embedding():
    """bf16 weights are updated through fp32 copies a block of rows at a time: LLaMA-1B's 65.5M-element
    embedding and lm_head (AdamW under APOLLO) would need 16 bytes per element of scratch at once (the fp32
    weight, the fp32 gradient, sqrt(v) and the int32 rounding bits), about 1 GB; in blocks it is at most that
    for one chunk of 2^22 elements (the meta device stands for an accelerator)."""
    from lowrank_opt.functional import CHUNK_ACCELERATOR as _DENSE_CHUNK_ACCELERATOR

    for optim in ("apollo_mini", "apollo_mini_layerwise"):
        est = estimate("llama_1b", optim, dtype="bf16", seq_len=256, gradient_checkpointing=True)
        embed = next(k for k in est.kinds if k["kind"] == "embedding")
        assert embed["params"] >= 3 * _DENSE_CHUNK_ACCELERATOR  # so a whole-tensor update would break the bound
        scratch = est.components["step.scratch tensors"]
        assert 0 < scratch <= 16 * _DENSE_CHUNK_ACCELERATOR, (optim, scratch)


def test_device_cpu_takes_cpu_code_paths_and_no_cuda_overhead():
    cuda = estimate(TINY, "adamw", dtype="fp32", seq_len=8)
    cpu = estimate(TINY, "adamw", dtype="fp32", seq_len=8, device="cpu")
    assert cpu.device == "cpu" and cpu.overhead == 0 and cuda.overhead > 0
    assert cpu.optimizer_states == cuda.optimizer_states
    # torch's AdamW on CPU runs its single-tensor loop: scratch for one tensor, not sqrt(v) of all of them.
    assert cpu.components["step.scratch tensors"] < cuda.components["step.scratch tensors"]
    assert "on cpu" in cpu.table() and "peak live tensors" in cpu.table()
    with pytest.raises(ValueError, match="device must be 'cuda' or 'cpu', got 'gpu'"):
        estimate(TINY, "apollo", device="gpu")


def test_aliases_and_unknown_names():
    assert estimate(TINY, "adamw_torch", dtype="fp32").optimizer_states == estimate(TINY, "adamw", dtype="fp32").optimizer_states
    assert estimate(TINY, "galore", dtype="fp32").optimizer == "galore_adamw"
    with pytest.raises(ValueError, match="known: .*apollo_mini"):
        estimate(TINY, "adafactorz")
    with pytest.raises(ValueError, match="unknown config 'llama_3t'.*llama_7b"):
        estimate("llama_3t", "apollo")
    with pytest.raises(ValueError, match="unknown option"):
        estimate(TINY, "apollo", optim_args="rnak=3")
    with pytest.raises(ValueError, match="unknown optim_args"):
        estimate(TINY, "galore", optim_args="scale_type=channel")
    assert {"adamw_8bit", "galore", "apollo_adamw", "apollo", "apollo_mini_layerwise"} <= set(known_optimizers())


def test_optimizer_state_bytes_sees_through_wrappers():
    from lowrank_opt import NormGrowthCap

    model = _tiny_model()
    inner = build_optimizer("adamw", model)
    capped = NormGrowthCap(inner)
    _backward(model)
    capped.step()
    n_tensors = len(list(model.parameters()))
    moments = sum(2 * p.numel() * 4 for p in model.parameters())
    # AdamW: two fp32 moments and a 0-d fp32 step per tensor; NormGrowthCap: a 0-d fp32 norm per tensor.
    assert optimizer_state_bytes(capped) == moments + 4 * n_tensors + 4 * n_tensors
    assert optimizer_state_bytes(inner) == optimizer_state_bytes(capped)

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the real one in .optimizer
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert optimizer_state_bytes(Wrapper(capped)) == optimizer_state_bytes(capped)


# ----------------------------------------------------------------------------------------------------------
# Activations: formula == what autograd saves


def _saved_bytes(config, *, batch, seq, mode):
    """Bytes of the tensors autograd saves for backward in one forward with loss (parameters and the
    autocast weight casts excluded, each storage once)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if mode == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        is_weight_cast = mode == "mixed" and t.dtype == torch.bfloat16 and tuple(t.shape) in weight_shapes
        if ptr not in params and not is_weight_cast:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "mixed"):
            model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize("mode,attn,kv", [
    ("bf16", "sdpa", 4), ("bf16", "eager", 2), ("fp32", "sdpa", 2), ("fp32", "eager", 4),
    ("mixed", "sdpa", 2), ("mixed", "eager", 4),
])
def test_activation_formula_matches_saved_tensors(mode, attn, kv):
    # Dimensions chosen so that no activation has the shape of a weight (T = 48 tokens).
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=kv,
                         num_hidden_layers=2, vocab_size=320, max_position_embeddings=64, attn_implementation=attn)
    batch, seq = 2, 24
    measured = _saved_bytes(config, batch=batch, seq=seq, mode=mode)
    act = activation_bytes(config, batch_size=batch, seq_len=seq, dtype="fp32" if mode == "fp32" else "bf16",
                           autocast=mode == "mixed", attn_implementation=attn)
    assert act.base + act.layers * act.per_layer + act.head == measured


def test_loss_peak_formula_matches_a_profiled_loss():
    """The loss's short-lived tensors: Hugging Face's causal-LM loss on bf16 logits, profiled on CPU (every
    allocation and free of torch's allocator, torch.profiler's memory timeline): its peak is the saved fp32
    log-probabilities (4TV, part of ``head``) plus the larger of ``logits_forward`` and ``logits_backward``."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    from transformers.loss.loss_utils import ForCausalLMLoss

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                         vocab_size=8000, max_position_embeddings=512)
    tokens = 256
    act = activation_bytes(config, batch_size=1, seq_len=tokens, dtype="bf16")
    x = torch.randn(tokens, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(config.vocab_size, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, config.vocab_size, (1, tokens))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        logits = (x @ w.T).view(1, tokens, config.vocab_size)
        loss = ForCausalLMLoss(logits, labels, vocab_size=config.vocab_size)
        del logits  # as in the model: nothing but the loss keeps the 16-bit logits
        loss.backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    measured = int(np.array(sizes).sum(axis=1).max())
    predicted = 4 * tokens * config.vocab_size + max(act.logits_forward, act.logits_backward)
    assert act.logits_backward > act.logits_forward  # the backward is the loss's peak
    assert predicted <= measured <= 1.05 * predicted  # plus the gradients of x and w, and small tensors


def test_activation_checkpointing_and_scaling():
    cfg = AutoConfig.from_pretrained(REPO / "configs" / "llama_7b.json")
    full = activation_bytes(cfg, batch_size=1, seq_len=2048, dtype="bf16")
    ckpt = activation_bytes(cfg, batch_size=1, seq_len=2048, dtype="bf16", gradient_checkpointing=True)
    t, h, i = 2048, 4096, 11008
    assert full.per_layer == 2 * (6 * t * h + 4 * t) + 2 * t * h + 2 * t * 3 * h + 4 * 32 * t + 2 * t * h * 2 + 8 * t * i
    assert 0.3e9 < full.per_layer < 0.45e9  # ~0.38 GB per layer at 2k tokens
    assert ckpt.per_layer_kept == 2 * t * h and ckpt.recompute == full.per_layer
    assert 1e9 < ckpt.peak < 3e9  # DESIGN.md: "activations with checkpointing ~1-3 GB at 2k tokens"
    assert full.peak > 10 * ckpt.peak / 2
    double = activation_bytes(cfg, batch_size=2, seq_len=2048, dtype="bf16")
    assert double.per_layer == 2 * full.per_layer  # SDPA: linear in tokens
    eager = activation_bytes(cfg, batch_size=1, seq_len=2048, dtype="bf16", attn_implementation="eager")
    assert eager.per_layer - full.per_layer > 6 * 32 * 2048 * 2048 - 2 * t * h  # the s x s scores


# ----------------------------------------------------------------------------------------------------------
# Gradients, ZeRO and layer-wise on the tiny model


def test_layerwise_gradients_are_the_largest_parameter():
    model = _tiny_model()
    largest = max(p.numel() for p in model.parameters())
    plain = estimate(TINY, "apollo", dtype="bf16", seq_len=64)
    lw = estimate(TINY, "apollo_layerwise", dtype="bf16", seq_len=64)
    explicit = estimate(TINY, "apollo", dtype="bf16", seq_len=64, layerwise=True)
    assert plain.gradients == 2 * sum(p.numel() for p in model.parameters())
    assert lw.gradients == explicit.gradients == 2 * largest
    assert lw.optimizer_states == plain.optimizer_states
    assert lw.components["gradients.largest tensor"] == 2 * largest
    with pytest.raises(ValueError, match="layer-wise"):
        estimate(TINY, "apollo_layerwise", layerwise=False)
    with pytest.raises(ValueError, match="data parallel"):
        estimate(TINY, "apollo_layerwise", zero_stage=1, num_gpus=2)


@pytest.mark.parametrize("optimizer", ["adamw", "apollo"])
def test_zero_stages_divide_per_gpu(optimizer):
    # Short sequences, so that gradients (not activations) set the peak of the tiny model.
    one = estimate(TINY, optimizer, dtype="bf16", master_weights=True, zero_stage=1, num_gpus=1, seq_len=8)
    by = {s: estimate(TINY, optimizer, dtype="bf16", zero_stage=s, num_gpus=4, seq_len=8) for s in (1, 2, 3)}
    n = one.n_params
    assert one.weights == 2 * n + 4 * n and one.gradients == 2 * n + 4 * n
    if optimizer == "adamw":
        assert by[1].optimizer_states == one.optimizer_states // 4
    else:  # ZeroApollo: the wide down_proj matrices keep their full r x n moments on every rank
        down = [k for k in one.kinds if k["kind"] == "mlp"][0]
        wide = 4 * 2 * 128 * 344 * 4 + 4 * 4  # 4 layers x (2 moments r x n fp32 + limiter), rank 256 -> 128
        assert by[1].optimizer_states == pytest.approx((one.optimizer_states - wide) / 4 + wide, abs=8)
        assert down["optimizer_states"] > wide
    assert by[1].weights == 2 * n + n and by[1].gradients == 2 * n + n  # fp32 master and fp32 grads / 4
    assert by[2].gradients == (2 * n + 4 * n) // 4 and by[2].weights == by[1].weights
    assert by[3].weights == (2 * n + 4 * n) // 4 and by[3].optimizer_states == by[1].optimizer_states
    assert by[1].activations == by[3].activations == one.activations  # data parallel: same micro-batch
    assert by[3].total < by[2].total < by[1].total < one.total
    zero0 = estimate(TINY, optimizer, dtype="bf16", num_gpus=4, seq_len=8)  # plain DDP: a full copy per GPU
    assert not zero0.master_weights and zero0.weights == 2 * n


def test_master_weights_and_dtypes():
    n = estimate(TINY, "adamw", dtype="fp32").n_params
    fp32 = estimate(TINY, "adamw", dtype="fp32")
    mixed = estimate(TINY, "adamw", dtype="bf16", master_weights=True)
    pure = estimate(TINY, "adamw", dtype="bf16")
    assert (fp32.weights, fp32.gradients) == (4 * n, 4 * n)
    assert (mixed.weights, mixed.gradients) == (6 * n, 4 * n)  # autocast: fp32 grads on the fp32 weights
    assert (pure.weights, pure.gradients) == (2 * n, 2 * n)
    assert mixed.optimizer_states == fp32.optimizer_states
    with pytest.raises(ValueError, match="dtype"):
        estimate(TINY, "adamw", dtype="int8")


def test_estimate_accepts_config_objects_and_reports():
    cfg = AutoConfig.from_pretrained(TINY)
    est = estimate(cfg, "apollo", optim_args={"rank": 16}, dtype="bf16", seq_len=32)
    again = estimate(str(TINY), "apollo", optim_args="rank=16", dtype="bf16", seq_len=32)
    by_name = estimate("llama_tiny", "apollo", optim_args="rank=16", dtype="bf16", seq_len=32)
    assert est.total == again.total == by_name.total
    d = est.to_dict()
    assert json.loads(est.to_json())["total"] == d["total"] == est.total
    kinds = {k["kind"]: k for k in d["kinds"]}
    assert set(kinds) == {"embedding", "attention", "mlp", "norm/bias", "lm_head"}
    assert kinds["attention"]["treatment"] == "low-rank rank=16" and kinds["embedding"]["treatment"] == "AdamW"
    assert sum(k["optimizer_states"] for k in d["kinds"]) == est.optimizer_states
    assert sum(k["weights"] for k in d["kinds"]) == est.weights
    for case in (est, estimate(TINY, "apollo", dtype="bf16", gradient_checkpointing=True, zero_stage=3, num_gpus=2),
                 estimate(TINY, "galore", dtype="fp32", layerwise=True)):
        for category in ("weights", "gradients", "optimizer_states", "activations", "overhead"):
            parts = sum(v for k, v in case.components.items() if k.startswith(category + "."))
            assert abs(parts - getattr(case, category)) <= 4, (category, case.components)
    text = est.table(detail=True)
    for word in ("weights", "gradients", "optimizer states", "activations", "overhead", "total", "attention"):
        assert word in text


# ----------------------------------------------------------------------------------------------------------
# CLI


def test_cli_text_and_json(capsys):
    assert cli.main(["memory", "llama_tiny", "--optim", "apollo", "--optim-args", "rank=16", "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "total (peak per GPU)" in text and "optimizer states" in text
    assert cli.main(["memory", str(TINY), "--optim", "apollo", "--optim-args", "rank=16", "--seq-len", "64",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    est = estimate(TINY, "apollo", optim_args="rank=16", seq_len=64)
    assert data["total"] == est.total and data["optimizer_states"] == est.optimizer_states
    assert cli.main(["memory", "llama_tiny", "--optim", "adamw,apollo_mini", "--layerwise", "--gradient-checkpointing",
                     "--zero-stage", "0", "--detail"]) == 0
    text = capsys.readouterr().out
    assert "adamw" in text and "apollo_mini" in text and "layer-wise" in text and "lm_head" in text
    assert cli.main(["memory", "llama_tiny", "--optim", "adamw", "--zero-stage", "2", "--num-gpus", "4",
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["zero_stage"] == 2 and data["num_gpus"] == 4 and data["master_weights"]


def test_cli_errors(capsys):
    assert cli.main(["memory", "llama_13t"]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'llama_13t'" in err and "llama_7b" in err and "llama_tiny" in err
    assert cli.main(["memory", "llama_tiny", "--optim", "adamq"]) == 2
    err = capsys.readouterr().err
    assert "unknown optimizer 'adamq'" in err and "apollo_mini" in err and "adamw_8bit" in err
    assert cli.main(["optimizers"]) == 0
    assert "galore_adamw" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["memory"])


@pytest.mark.slow
def test_console_script():
    exe = shutil.which("lowrank-opt")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    proc = subprocess.run([exe, "configs"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "llama_7b" in proc.stdout.split()


# ----------------------------------------------------------------------------------------------------------
# MemoryCallback in a Trainer run


def test_memory_callback_in_a_three_step_trainer_run(tmp_path, capsys):
    from transformers import Trainer, TrainingArguments

    batch, seq = 2, 32
    model = _tiny_model()
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 4096, (12, seq), generator=gen)]
    est = estimate(TINY, "apollo", optim_args="rank=16", dtype="fp32", batch_size=batch, seq_len=seq)
    callback = MemoryCallback(estimate=est)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=batch, use_cpu=True,
                             report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)
    optimizer = build_optimizer("apollo", model, rank=16, lr=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None), callbacks=[callback])
    trainer.train()
    assert [r["step"] for r in callback.history] == [1, 2, 3]
    for record in callback.history:
        assert record["optimizer_state_bytes"] == est.optimizer_states  # the estimate is exact
        assert record["peak_rss"] > 0
    assert callback.summary["optimizer_state_bytes"] == est.optimizer_states
    out = capsys.readouterr().out
    assert "MemoryCallback: 3 steps on cpu" in out and "measured" in out and "estimated" in out
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 3


# ----------------------------------------------------------------------------------------------------------
# LLaMA-7B results (from the background process)


def test_llama_7b_allocates_nothing(seven_b):
    # (How long the estimates take is a figure for a benchmark, not a unit test: it varies with the machine's load.)
    assert seven_b["rss_growth"] < 1e9, seven_b["rss_growth"]  # the bf16 model alone would be 13.5 GB


def test_llama_7b_numbers_are_sane(seven_b):
    n = seven_b["adamw"]["n_params"]
    assert n == 6_738_415_616
    assert seven_b["adamw"]["weights"] == 2 * n  # 13.5 GB of bf16 weights
    assert seven_b["adamw"]["gradients"] == 2 * n
    # DESIGN.md: "AdamW fp32 states: 54 GB" (fp32 master weights; pure bf16 torch AdamW keeps bf16 moments).
    assert seven_b["adamw_master"]["optimizer_states"] == pytest.approx(8 * n, rel=1e-6)
    assert seven_b["adamw"]["optimizer_states"] == pytest.approx(4 * n, rel=1e-6)
    assert seven_b["adamw_master"]["weights"] == 6 * n
    # bitsandbytes: 2 bytes/param + absmax (4 bytes per 256) for 8-bit tensors, embeddings and small tensors fp32.
    emb = 32000 * 4096
    assert seven_b["adamw_8bit"]["optimizer_states"] == pytest.approx(2 * (n - emb) * (1 + 4 / 256) + 8 * emb, rel=1e-3)
    # APOLLO r=256 on the attention/MLP matrices: 2 x 256 x max(m, n) per matrix.
    lowrank_numbers = 2 * 256 * (4 * 4096 + 3 * 11008) * 32
    apollo = seven_b["apollo"]["components"]
    limiters = 7 * 32 * 4  # one 0-d fp32 norm-growth-limiter state per low-rank matrix
    assert apollo["optimizer_states.low-rank"] == lowrank_numbers * 4 + limiters  # fp32 moments (3.2 GB)
    # DESIGN.md / paper Table 3: "APOLLO r=256: about 1.6 GB of states" = bf16 moments of the low-rank part.
    assert seven_b["apollo_bf16"]["components"]["optimizer_states.low-rank"] == lowrank_numbers * 2 + limiters
    assert 1.55e9 < lowrank_numbers * 2 < 1.65e9
    # The embedding, lm_head and 65 RMSNorm weights are updated with AdamW (fp32 moments).
    assert apollo["optimizer_states.dense"] == 2 * (2 * emb + 65 * 4096) * 4
    mini = seven_b["apollo_mini"]["components"]
    assert mini["optimizer_states.low-rank"] == 2 * 1 * (4 * 4096 + 3 * 11008) * 32 * 4 + limiters
    assert mini["optimizer_states.low-rank"] < 0.02e9  # "APOLLO-Mini: about 0"
    # GaLore (HF default rank 128, lm_head included): moments 2 x r x max + P r x min, bf16.
    galore = seven_b["galore"]["optimizer_states"]
    assert 0.5e9 < galore < 2e9
    for key in ("adamw", "apollo", "apollo_layerwise", "adamw_zero2"):
        d = seven_b[key]
        parts = (d["weights"] + d["gradients"] + d["optimizer_states"] + d["activations"] - d["freed_during_backward"]
                 + d["step_temporaries"] + d["overhead"])
        assert abs(parts - d["total"]) <= 8, key
    # torch's foreach AdamW (its CUDA default) makes sqrt(v) for every parameter at once: one more bf16 moment.
    assert seven_b["adamw"]["components"]["step.scratch tensors"] == pytest.approx(2 * n, rel=1e-6)


def test_llama_7b_layerwise_and_zero(seven_b):
    lw = seven_b["apollo_layerwise"]
    assert lw["layerwise"] and lw["gradient_checkpointing"]
    assert lw["gradients"] == 2 * 32000 * 4096  # the largest tensor (embedding / lm_head) in bf16
    # Layer-wise: the activation peak is the loss, before any gradient exists; each gradient appears later,
    # next to fewer activations, so the largest one does not add to the peak.
    assert lw["freed_during_backward"] == lw["gradients"]
    assert lw["total"] - lw["overhead"] == pytest.approx(
        lw["weights"] + lw["optimizer_states"] + lw["activations"] + lw["step_temporaries"], abs=8)
    assert lw["total"] < seven_b["apollo"]["total"] - 10e9
    n = seven_b["adamw"]["n_params"]
    z2 = seven_b["adamw_zero2"]
    assert z2["master_weights"]  # DeepSpeed keeps fp32 master weights
    # DeepSpeed's estimate_zero2_model_states_mem_needs: 2n + 18n/G (REFERENCE 6.4).
    assert z2["weights"] + z2["gradients"] + z2["optimizer_states"] == pytest.approx(2 * n + 18 * n / 8, rel=1e-6)
    z3 = seven_b["adamw_zero3"]
    assert z3["weights"] + z3["gradients"] + z3["optimizer_states"] == pytest.approx(20 * n / 8, rel=1e-6)
    assert z3["components"]["overhead.zero-3 gathered layer"] == 4 * 32000 * 4096


# ----------------------------------------------------------------------------------------------------------
# Resolution of names and options, and readable errors for bad configs and targets


def test_resolve_gives_the_dry_run_what_it_needs():
    from lowrank_opt.classic import AdamW
    from lowrank_opt.registry import resolve

    fused = resolve("adamw_torch_fused")
    assert (fused.name, fused.given, fused.spec.cls, fused.spec.layout) == ("adamw", {"fused": True}, AdamW, None)
    assert issubclass(fused.spec.cls, torch.optim.AdamW)  # torch's math under the package's policy
    assert {"foreach", "fused"} <= fused.spec.options() and not fused.spec.lowrank and not fused.capped
    capped = resolve(" APOLLO_capped ", "rank=4,cap_tau=1.1", ["q_proj"])
    assert capped.name == "apollo_capped" and capped.capped and capped.spec.lowrank
    assert capped.given == {"rank": 4, "cap_tau": 1.1} and capped.target_modules == ["q_proj"]
    assert capped.spec.defaults == OPTIMIZERS["apollo"].defaults and not capped.layerwise
    assert resolve("apollo_mini_layerwise").layerwise
    assert resolve("apollo", "layerwise=True").layerwise
    galore = resolve("galore_layerwise", {"rank": 8})
    assert galore.name == "galore_adamw_layerwise" and galore.spec.layout == "galore" and galore.layerwise
    assert galore.given == {"rank": 8} and galore.spec.defaults["rank"] == 128
    with pytest.raises(TypeError, match="not built"):
        galore.build(torch.nn.Linear(2, 2))


def test_invalid_target_regex_is_a_value_error_before_any_work():
    for name in ("apollo", "galore", "apollo_adamw"):
        with pytest.raises(ValueError, match=r"target_modules '\(\(' is not a valid regular expression"):
            estimate("no_such_config_is_read_first", name, target_modules="((")
    # A list entry that is no regex still matches as a name or substring (HF's rule), so it is not an error.
    est = estimate(TINY, "apollo", optim_args="rank=4", target_modules=["q_proj", "(("], dtype="fp32")
    assert {k["kind"]: k["treatment"] for k in est.kinds}["attention"] == "AdamW + low-rank rank=4"


def test_bad_config_files_name_the_file(tmp_path):
    from lowrank_opt.memory import resolve_config

    broken = tmp_path / "broken.json"
    second = ' "num_attention_heads": }'
    broken.write_text('{"hidden_size": 64,\n' + second)
    column = second.index("}") + 1  # where the missing value was expected
    with pytest.raises(ValueError, match=rf"config file '{broken}' is not valid JSON \(Expecting value at line 2, "
                                         rf"column {column}\)"):
        resolve_config(str(broken))
    with pytest.raises(ValueError, match=rf"config file '{tmp_path / 'nope.json'}' not found; .*llama_tiny"):
        resolve_config(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match=rf"config directory '{tmp_path}' has no config.json"):
        resolve_config(tmp_path)
    odd = tmp_path / "config.json"
    odd.write_text('{"model_type": "llama", "hidden_size": 64, "num_attention_heads": 5}')
    with pytest.raises(ValueError, match=rf"^cannot read config '{tmp_path}': [^\n]*\(64\)[^\n]*\(5\)[^\n]*$"):
        resolve_config(tmp_path)


def test_external_integer_options_say_which_option():
    with pytest.raises(ValueError, match="optim_args rank must be an integer for galore_adamw, got 'x'"):
        estimate(TINY, "galore", optim_args="rank=x")
    with pytest.raises(ValueError, match="optim_args min_8bit_size must be an integer for adamw_bnb_8bit, got 'big'"):
        estimate(TINY, "adamw_8bit", optim_args="min_8bit_size=big")


@pytest.mark.parametrize("mode", ["bf16", "fp32"])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_moe_activation_formula_matches_saved_tensors(mode, family):
    """MoE layers: the router, the routed tokens' copies and the experts' activations (transformers' grouped
    experts), per layer, byte-exact against what autograd saves."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  vocab_size=320, max_position_embeddings=64)
    if family == "mixtral":
        config = MixtralConfig(intermediate_size=40, num_local_experts=6, num_experts_per_tok=2, **common)
    else:
        config = Qwen3MoeConfig(intermediate_size=88, moe_intermediate_size=40, head_dim=16, num_experts=6,
                                num_experts_per_tok=3, norm_topk_prob=True, **common)
    batch, seq = 2, 24
    measured = _saved_bytes(config, batch=batch, seq=seq, mode=mode)
    act = activation_bytes(config, batch_size=batch, seq_len=seq, dtype=mode)
    assert act.base + act.layers * act.per_layer + act.head == measured


def test_moe_layouts_the_activation_formula_does_not_model_are_refused():
    from transformers import DeepseekV3Config, Qwen2MoeConfig

    with pytest.raises(NotImplementedError, match="shared experts.*dense layers"):
        activation_bytes(DeepseekV3Config(n_shared_experts=1, first_k_dense_replace=1), batch_size=1, seq_len=8)
    with pytest.raises(NotImplementedError, match="shared experts"):
        activation_bytes(Qwen2MoeConfig(), batch_size=1, seq_len=8)

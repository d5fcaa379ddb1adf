"""Activation memory of a LLaMA-style decoder: the bytes autograd saves for backward, term by term.

Per LLaMA decoder layer, derived term by term from what the Hugging Face LLaMA implementation saves for
backward (checked byte-exact against ``torch.autograd.graph.saved_tensors_hooks`` in tests/test_memory.py), in
the spirit of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
Sec. 4.1, GPT layer: ``sbh(34 + 5as/h)`` bytes). With T = batch x seq tokens, h hidden, i intermediate, a heads,
k kv-heads, d head dim, e = 2 (16-bit) or 4 (fp32) bytes of matmul activations and r the bytes of the residual
stream (2 for pure 16-bit, 4 for fp32 or autocast):

- each RMSNorm (2 per layer): its fp32 input ``4Th``, the normalised tensor ``rTh``, ``rsqrt`` ``4T``;
- inputs of q/k/v, o, gate/up projections: ``3eTh`` (autocast casts the input once per linear:
  q/k/v ``3eTh``, gate/up ``2eTh``);
- attention, SDPA/flash: q ``eT·ad``, k and v ``eT·kd`` each, log-sum-exp ``4aT`` (the output is the o_proj
  input); eager: q, k, v at all heads ``3eT·ad`` plus the fp32 softmax ``4as²b`` and probabilities ``eas²b``
  (in fp32 they are the same tensor);
- SwiGLU MLP: gate output, SiLU output, up output and down-projection input, ``4eTi``;
- a MoE block instead (E experts of intermediate I, each token routed to k; transformers' grouped experts):
  the router input ``eTh``, its fp32 probabilities ``4TE``, the top-k weights and indices ``12Tk`` and their
  normaliser ``4T``, per routed token (kT of them) three index vectors ``24`` and its weight (fp32 in Mixtral,
  else ``e``), its gathered input and its expert output ``2eh``, the gate/up output, the activation and the down
  input ``4eI``, and the experts' offsets ``4E``: for Mixtral ``eTh + T(4E + 12k + 4) + kT(28 + 2eh + 4eI) + 4E``;
- Qwen3's per-head RMSNorm of q and k: ``(4 + e)T(a + k')d + 4T(a + k')`` (k' kv-heads).

So a pure-bf16 SDPA layer with k = a saves ``T(24h + 8i + 4a + 8)`` bytes: for LLaMA-7B at 2,048 tokens,
~0.38 GB per layer. The head adds the final norm, the lm_head input and the fp32 log-probabilities of the
loss (``4TV``); the loss also makes short-lived copies of the logits: forward ``eTV`` (16-bit logits) +
``4TV`` (fp32 upcast), backward ``8TV`` (the fp32 gradients of the nll and of the log-softmax, next to the
saved log-probabilities; the 16-bit gradient of the logits appears once those are freed). With
``gradient_checkpointing`` (HF's per-decoder-layer checkpointing) each layer keeps only its input
``rTh`` and one layer is recomputed at a time during backward (its full activations).

With the lean loss (:mod:`lowrank_opt.loss`, ``lean_loss=True``) no tensor of T x V exists: the head saves the
lm_head input ``eTh`` and ``16T`` (labels, weights, log-sum-exp); the loss forward works on one fp32 tile
``4·Ct·Cv`` (Ct = min(token chunk, T), Cv the vocabulary chunk) plus, for 16-bit inputs, fp32 copies of a token
chunk ``4·Ct·h`` and of a weight block ``4·Cv·h``; its backward on the tile, the fp32 ``grad_h`` accumulator
``4Th``, the 16-bit ``grad_h`` it returns ``eTh`` and, for 16-bit inputs, the token chunk and two fp32 weight
blocks ``4·Ct·h + 8·Cv·h`` (the docstring of :mod:`lowrank_opt.loss` derives them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .dtypes import _DTYPES, _canonical_dtype


@dataclass
class ActivationBreakdown:
    """Bytes saved for backward (per GPU, one micro-batch)."""

    per_layer: int  # a decoder layer's saved tensors without checkpointing
    per_layer_kept: int  # what each layer keeps until its backward (its input with checkpointing)
    layers: int
    head: int  # final norm + lm_head input + fp32 log-probabilities of the loss
    base: int  # rotary cos/sin, token ids, labels
    logits_forward: int  # short-lived: 16-bit logits and their fp32 upcast
    logits_backward: int  # short-lived: gradients of the log-probabilities and logits
    recompute: int  # with checkpointing: one layer's full activations during its backward

    @property
    def peak(self) -> int:
        return self.base + self.layers * self.per_layer_kept + max(
            self.head + max(self.logits_forward, self.logits_backward), self.recompute)


def _moe(text) -> "tuple[int, int, int] | None":
    """(experts, experts per token, expert intermediate size) of a MoE config whose every layer is sparse, None for
    a dense one; other MoE layouts are refused rather than estimated as something else."""
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) \
        or getattr(text, "n_routed_experts", None)
    if not experts:
        return None
    unsupported = [name for name, value in (
        ("shared experts", getattr(text, "n_shared_experts", None) or getattr(text, "shared_expert_intermediate_size", None)),
        ("dense layers (mlp_only_layers)", getattr(text, "mlp_only_layers", None)),
        ("dense layers (first_k_dense_replace)", getattr(text, "first_k_dense_replace", None)),
        ("sparse every n-th layer (decoder_sparse_step)", (getattr(text, "decoder_sparse_step", 1) or 1) != 1),
    ) if value]
    if unsupported:
        raise NotImplementedError(f"activation memory of {type(text).__name__} with {', '.join(unsupported)} is not "
                                  "modelled: the estimator models MoE models whose every layer routes to experts "
                                  "without shared ones (Mixtral, Qwen3-MoE)")
    inter = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    return int(experts), int(text.num_experts_per_tok), int(inter)


def activation_bytes(config, *, batch_size: int, seq_len: int, dtype: str = "bf16", autocast: bool = False,
                     gradient_checkpointing: bool = False, attn_implementation: str = "sdpa",
                     lean_loss: bool = False, loss_chunks: tuple[int, int] = (2048, 2048)) -> ActivationBreakdown:
    """Activation memory of a LLaMA-style decoder (the module docstring derives every term).

    ``dtype`` is the matmul activation dtype; ``autocast`` means fp32 weights and residual stream with
    16-bit matmuls (torch autocast, the HF Trainer's ``--bf16`` on an fp32 model). ``lean_loss``: the chunked
    cross-entropy with (token, vocabulary) chunks ``loss_chunks``."""
    dtype = _canonical_dtype(dtype)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(text.hidden_size)
    a = int(text.num_attention_heads)
    kv = int(getattr(text, "num_key_value_heads", None) or a)
    d = int(getattr(text, "head_dim", None) or h // a)
    i = int(getattr(text, "intermediate_size", None) or 4 * h)
    n_layers = int(text.num_hidden_layers)
    vocab = int(text.vocab_size)
    b, s = int(batch_size), int(seq_len)
    tokens = b * s
    e = _DTYPES[dtype]
    r = 4 if (e == 4 or autocast) else e
    norm = (4 + r) * tokens * h + 4 * tokens
    attn_in = (3 if autocast else 1) * e * tokens * h
    mlp_in = (2 if autocast else 1) * e * tokens * h
    if attn_implementation == "eager":
        core = 3 * e * tokens * a * d + (4 + (e if e != 4 else 0)) * a * s * s * b
    elif attn_implementation in ("sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"):
        core = e * tokens * (a * d + 2 * kv * d) + 4 * a * tokens
    else:
        raise ValueError(f"attn_implementation must be sdpa, eager or flash_attention_2, got {attn_implementation!r}")
    o_in = e * tokens * a * d
    moe = _moe(text)
    if moe is None:
        mlp = mlp_in + 4 * e * tokens * i
    else:
        experts, k, inter = moe
        weight = 4 if getattr(text, "model_type", "") == "mixtral" else e  # Mixtral keeps the routing weights fp32
        mlp = e * tokens * h + tokens * (4 * experts + 12 * k + 4) + k * tokens * (24 + weight + 2 * e * h + 4 * e * inter) \
            + 4 * experts
    per_layer = 2 * norm + attn_in + core + o_in + mlp
    if getattr(text, "model_type", "") in ("qwen3", "qwen3_moe"):  # RMSNorm of every head of q and k
        per_layer += (4 + e) * tokens * (a + kv) * d + 4 * tokens * (a + kv)
    head = norm + e * tokens * h + 4 * tokens * vocab
    base = 2 * s * d * r + 16 * tokens + 4
    upcast = 4 * tokens * vocab if e != 4 else 0
    logits_forward = e * tokens * vocab + upcast
    # The loss backward's peak: the fp32 gradients of the nll and of the log-softmax, next to the saved
    # log-probabilities (in ``head``); the 16-bit gradient of the logits comes after those two are freed.
    logits_backward = 8 * tokens * vocab
    if lean_loss:
        ct, cv = min(int(loss_chunks[0]), tokens), min(int(loss_chunks[1]), vocab)
        half = e != 4
        head = norm + e * tokens * h + 16 * tokens
        logits_forward = 4 * ct * cv + (4 * ct * h + 4 * cv * h if half else 0)
        logits_backward = 4 * ct * cv + 4 * tokens * h + e * tokens * h + (4 * ct * h + 8 * cv * h if half else 0)
    kept = r * tokens * h if gradient_checkpointing else per_layer
    return ActivationBreakdown(per_layer=per_layer, per_layer_kept=kept, layers=n_layers, head=head, base=base,
                               logits_forward=logits_forward, logits_backward=logits_backward,
                               recompute=per_layer if gradient_checkpointing else 0)

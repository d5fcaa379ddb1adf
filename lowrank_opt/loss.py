"""A lean causal-LM loss: cross-entropy of ``hidden @ weight.T`` without the full logits.

The usual path (Hugging Face's ``ForCausalLMLoss``) materialises the logits (tokens x vocabulary), upcasts them
to fp32, keeps the log-probabilities for backward and then builds their gradient: at 2,048 tokens and a
32,000 vocabulary that is several 262 MB fp32 tensors alive at once, more than all checkpointed layers of
LLaMA-7B together. Here the logits only ever exist as one tile of ``token_chunk_size x vocab_chunk_size`` fp32
values; backward recomputes each tile instead of saving it.

Algorithm (T tokens, H hidden, V vocabulary; every tile in fp32, whatever the input dtype):

1. Forward, for each vocabulary block ``W[v0:v1]`` (upcast to fp32 once per block) and each token chunk that
   holds at least one counted label: ``z = h[t0:t1] @ W[v0:v1].T (+ b)``; fold the tile into a running
   log-sum-exp per token (running max ``m`` and ``s = sum exp(z - m)``) and pick the target logit when the
   target falls in the block. Loss = ``sum_t w_t (lse_t - z_t[y_t])`` with ``w_t = 1/denominator`` for a
   counted token and 0 for an ignored one. Saved for backward: ``lse`` (T floats) and the inputs (no tile).
2. Backward, the same loops: recompute ``z``, ``p = softmax = exp(z - lse)``, subtract 1 at the target,
   scale row t by ``w_t * grad_output``: that is ``dL/dz`` for the tile. Then ``grad_h[t] += dz @ W_block``
   (an fp32 T x H accumulator), ``grad_W_block += dz.T @ h[t]`` (an fp32 block, written to the weight's
   gradient once per block, so a bf16 gradient is rounded once, not once per token chunk), ``grad_b_block +=
   dz.sum(0)``. Token chunks whose labels are all ignored contribute nothing and are skipped.

Memory beyond the inputs and the gradients themselves (bytes; Ct, Cv the chunk sizes, fp32 = 4 bytes):
about ``16*T`` (labels, per-token weights, log-sum-exp) + ``4*Ct*Cv`` (the one tile: every element-wise step
works in place on it) and, for half-precision inputs only, ``4*T*H`` (fp32 ``grad_h`` accumulator, backward;
for fp32 inputs the accumulator is the returned gradient itself) + ``4*Ct*H`` (fp32 copy of a token chunk) +
``4*Cv*H`` (fp32 weight block) + ``4*Cv*H`` (fp32 weight-gradient block, backward). Measured:
``benchmarks/lean_loss.py``. Nothing is of size T x V, nor of size V x H in fp32. The gradients
themselves (``grad_W`` V x H and ``grad_h`` T x H in the inputs' dtypes) are what the plain path returns too.

Numerics: the GEMMs run in fp32 on fp32 copies (also for bf16 inputs), so the result is the fp32 computation
on the upcast inputs, rounded once to the input dtype at the end; the Hugging Face path instead rounds the
logits to bf16 before its fp32 softmax. On a GPU that means fp32 (or, if the user enables it, TF32) GEMMs for
the LM head: 4 GEMMs of 2*T*V*H flops per step instead of 3 in bf16.

Limitations: the weight is read directly (``model.lm_head.weight``), outside the head module's forward, so
DeepSpeed ZeRO-3 / FSDP parameters that are gathered in a forward pre-hook are not supported (a clear error);
no double backward; no label smoothing or class weights.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = [
    "DEFAULT_TOKEN_CHUNK",
    "DEFAULT_VOCAB_CHUNK",
    "linear_cross_entropy",
    "causal_lm_loss",
    "causal_lm_loss_from_model",
    "shift_labels",
]

DEFAULT_TOKEN_CHUNK = 2048
DEFAULT_VOCAB_CHUNK = 2048
IGNORE_INDEX = -100


def _check_chunk(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_weight(weight: torch.Tensor) -> None:
    if hasattr(weight, "ds_shape") or hasattr(weight, "ds_numel"):
        raise NotImplementedError(
            "linear_cross_entropy reads the LM head weight outside its module's forward, where a DeepSpeed ZeRO-3 "
            f"partitioned weight is an empty placeholder (full shape {tuple(getattr(weight, 'ds_shape', ()))}); "
            "use the model's own loss under ZeRO-3")
    if weight.numel() > 1 and 0 in weight.stride():
        raise ValueError(
            f"the LM head weight (shape {tuple(weight.shape)}, strides {weight.stride()}) holds no values of its own "
            "(an int8 layer's gradient carrier?); the lean loss needs a float LM head")
    if type(weight).__name__ == "DTensor" or hasattr(weight, "device_mesh"):
        raise NotImplementedError(
            "linear_cross_entropy does not support a sharded (DTensor / FSDP2) LM head weight; use the model's "
            "own loss there")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of ``w_t * CE(h_t @ W.T + b, y_t)``; see the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, token_weight, chunk_tokens, chunk_vocab, has_labels):
        # hidden (T, H), weight (V, H), bias (V,) or None, labels (T,) int64 already clamped to [0, V),
        # token_weight (T,) fp32: 1/denominator for a counted token, 0 for an ignored one.
        # has_labels: per token chunk, whether any token of it is counted (host list).
        num_tokens = hidden.shape[0]
        vocab = weight.shape[0]
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            run_max = torch.full((num_tokens,), float("-inf"), dtype=torch.float32, device=hidden.device)
            run_sum = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
            target_logit = torch.zeros(num_tokens, dtype=torch.float32, device=hidden.device)
            for v0 in range(0, vocab, chunk_vocab):
                v1 = min(v0 + chunk_vocab, vocab)
                w_block = weight[v0:v1].float()
                b_block = None if bias is None else bias[v0:v1].float()
                for index, t0 in enumerate(range(0, num_tokens, chunk_tokens)):
                    if not has_labels[index]:
                        continue
                    t1 = min(t0 + chunk_tokens, num_tokens)
                    z = _fp32(hidden[t0:t1]) @ w_block.T
                    if b_block is not None:
                        z += b_block
                    y = labels[t0:t1]
                    inside = (y >= v0) & (y < v1)
                    picked = z.gather(1, (y - v0).clamp_(0, v1 - v0 - 1)[:, None]).squeeze(1)
                    target_logit[t0:t1] += torch.where(inside, picked, 0.0)
                    # Online log-sum-exp: rescale the running sum to the new running max. In place on the
                    # tile, so one tile is all the scratch there is.
                    new_max = torch.maximum(run_max[t0:t1], z.amax(dim=1))
                    run_sum[t0:t1] *= torch.exp(run_max[t0:t1] - new_max)
                    run_sum[t0:t1] += z.sub_(new_max[:, None]).exp_().sum(dim=1)
                    run_max[t0:t1] = new_max
                    del z
            lse = run_max + torch.log(run_sum)
            # Ignored tokens have weight 0 (and lse -inf where their chunk was skipped): mask, not multiply.
            per_token = torch.where(token_weight != 0, lse - target_logit, 0.0)
            loss = (per_token * token_weight).sum()
        ctx.save_for_backward(hidden, weight, bias, labels, token_weight, lse)
        ctx.chunks = (chunk_tokens, chunk_vocab, has_labels)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, token_weight, lse = ctx.saved_tensors
        chunk_tokens, chunk_vocab, has_labels = ctx.chunks
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        num_tokens = hidden.shape[0]
        vocab = weight.shape[0]
        grad_h = grad_w = grad_b = None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            scale = token_weight * grad_loss.float()  # dL/dz row factor
            grad_h32 = torch.zeros(num_tokens, hidden.shape[1], dtype=torch.float32, device=hidden.device) \
                if need_h else None
            if need_w:
                grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format)
            if need_b:
                grad_b = torch.empty_like(bias, memory_format=torch.contiguous_format)
            for v0 in range(0, vocab, chunk_vocab):
                v1 = min(v0 + chunk_vocab, vocab)
                w_block = weight[v0:v1].float()
                b_block = None if bias is None else bias[v0:v1].float()
                # Accumulate the block's weight gradient in fp32 (in place when the gradient is fp32 itself).
                gw_block = None
                if need_w:
                    gw_block = grad_w[v0:v1] if grad_w.dtype == torch.float32 else \
                        torch.empty(v1 - v0, weight.shape[1], dtype=torch.float32, device=weight.device)
                    gw_block.zero_()
                gb_block = torch.zeros(v1 - v0, dtype=torch.float32, device=weight.device) if need_b else None
                for index, t0 in enumerate(range(0, num_tokens, chunk_tokens)):
                    if not has_labels[index]:
                        continue
                    t1 = min(t0 + chunk_tokens, num_tokens)
                    h32 = _fp32(hidden[t0:t1])
                    z = h32 @ w_block.T
                    if b_block is not None:
                        z += b_block
                    # dL/dz = w_t * (softmax(z) - onehot(y)), built in the tile's own storage.
                    dz = z.sub_(lse[t0:t1, None]).exp_()
                    y = labels[t0:t1]
                    inside = (y >= v0) & (y < v1)
                    # -1 at the target where it falls in this block (a scatter, not a host-side index: no sync)
                    column = (y - v0).clamp_(0, v1 - v0 - 1)
                    dz.scatter_add_(1, column[:, None], inside.to(torch.float32).neg_()[:, None])
                    dz *= scale[t0:t1, None]
                    if need_h:
                        grad_h32[t0:t1].addmm_(dz, w_block)
                    if need_w:
                        gw_block.addmm_(dz.T, h32)
                    if need_b:
                        gb_block += dz.sum(dim=0)
                    del z, dz, h32
                if need_w and gw_block.data_ptr() != grad_w[v0:v1].data_ptr():
                    grad_w[v0:v1].copy_(gw_block)
                if need_b:
                    grad_b[v0:v1].copy_(gb_block)
                del w_block, gw_block
            if need_h:
                grad_h = grad_h32 if hidden.dtype == torch.float32 else grad_h32.to(hidden.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    token_chunk_size: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T + bias`` against ``labels``, computed in tiles (see the module
    docstring); equal to ``F.cross_entropy(F.linear(hidden.float(), weight.float(), bias), labels, ...)``.

    Args:
        hidden: ``(..., H)`` float tensor (fp32, bf16 or fp16).
        weight: ``(V, H)`` LM head weight; ``bias``: ``(V,)`` or None.
        labels: ``hidden.shape[:-1]`` int64 class indices, aligned with ``hidden`` (no shift here; see
            :func:`causal_lm_loss`); ``ignore_index`` marks tokens that do not count.
        reduction: ``"mean"`` (over counted tokens; NaN when none counts, like torch) or ``"sum"``.
        num_items_in_batch: Hugging Face's gradient-accumulation normaliser: when given (int or tensor), the
            loss is the sum divided by it, whatever ``reduction`` says would be the mean (``reduction`` must
            then be ``"mean"``), as ``transformers``' ``fixed_cross_entropy`` does.
        token_chunk_size, vocab_chunk_size: tile shape; the result does not depend on them beyond fp32
            rounding.

    Returns the loss as an fp32 scalar.
    """
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"weight must be a (vocab, hidden) matrix, got shape {tuple(getattr(weight, 'shape', ()))}")
    _check_weight(weight)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor, got {getattr(labels, 'dtype', type(labels))}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden.shape[:-1] {tuple(hidden.shape[:-1])}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError("num_items_in_batch replaces the mean's denominator; it needs reduction='mean', "
                         f"got {reduction!r}")
    chunk_tokens = _check_chunk(token_chunk_size, "token_chunk_size")
    chunk_vocab = _check_chunk(vocab_chunk_size, "vocab_chunk_size")

    vocab = weight.shape[0]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    flat = labels.reshape(-1).to(hidden.device)
    counted = flat != ignore_index
    bad = counted & ((flat < 0) | (flat >= vocab))
    if bool(bad.any()):
        value = int(flat[bad][0])
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}, found {value}")
    safe_labels = torch.where(counted, flat, 0)
    if num_items_in_batch is not None:
        denominator = torch.as_tensor(num_items_in_batch, device=hidden.device).to(torch.float32)
    elif reduction == "mean":
        denominator = counted.sum().to(torch.float32)  # 0 -> NaN loss, as F.cross_entropy(reduction='mean')
    else:
        denominator = torch.ones((), dtype=torch.float32, device=hidden.device)
    token_weight = counted.to(torch.float32) / denominator
    num_tokens = hidden2d.shape[0]
    # One host sync: which token chunks count at all (an all-ignored chunk is skipped in both passes).
    padded = torch.zeros(-(-num_tokens // chunk_tokens) * chunk_tokens, dtype=torch.bool, device=flat.device)
    padded[:num_tokens] = counted
    has_labels = padded.view(-1, chunk_tokens).any(dim=1).tolist()
    if not any(has_labels):
        # Nothing counts: the loss is 0 / denominator (NaN for a plain mean, as torch's), with zero gradients
        # (torch's too): the quotient is a constant, the inputs enter only through a zero-gradient term.
        zero = (hidden2d.sum() * 0.0).float() + (weight.sum() * 0.0).float()
        if bias is not None:
            zero = zero + (bias.sum() * 0.0).float()
        return zero + torch.zeros((), device=hidden.device) / denominator
    return _LinearCrossEntropy.apply(hidden2d, weight, bias, safe_labels, token_weight, chunk_tokens,
                                     chunk_vocab, has_labels)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Hugging Face's causal shift: position t is scored against ``labels[..., t + 1]``, the last position
    against ``ignore_index`` (``ForCausalLMLoss``: pad right with ``ignore_index``, drop the first)."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


def causal_lm_loss(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    lm_head_bias: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    shifted_labels: Optional[torch.Tensor] = None,
    token_chunk_size: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """``transformers``' ``ForCausalLMLoss`` (fp32 cross-entropy, labels shifted by one, ``ignore_index``,
    ``num_items_in_batch``) on the final hidden states ``(batch, seq, H)`` and the LM head, without the
    logits. Give ``labels`` (unshifted, as the model takes them) or ``shifted_labels`` (already aligned, HF's
    ``shift_labels`` keyword), not both."""
    if (labels is None) == (shifted_labels is None):
        raise ValueError("give exactly one of labels (unshifted) and shifted_labels (already aligned)")
    targets = shift_labels(labels, ignore_index) if shifted_labels is None else shifted_labels
    return linear_cross_entropy(hidden_states, lm_head_weight, targets.to(hidden_states.device), lm_head_bias,
                                ignore_index=ignore_index, num_items_in_batch=num_items_in_batch,
                                token_chunk_size=token_chunk_size, vocab_chunk_size=vocab_chunk_size)


# Config attributes of Hugging Face models that change the logits after the LM head; the lean loss does not
# model them, so such a model is refused rather than trained on a different loss.
_UNSUPPORTED_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / accelerate / torch.compile wrappers keep the model in .module or ._orig_mod.
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def causal_lm_loss_from_model(
    model: nn.Module,
    inputs: dict,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    token_chunk_size: int = DEFAULT_TOKEN_CHUNK,
    vocab_chunk_size: int = DEFAULT_VOCAB_CHUNK,
) -> torch.Tensor:
    """The loss ``model(**inputs).loss`` of a Hugging Face causal LM (e.g. ``LlamaForCausalLM``), computed
    from the decoder's last hidden state and the LM head without materialising logits: a drop-in for the body
    of a ``Trainer.compute_loss`` override::

        class LeanLossTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return causal_lm_loss_from_model(model, inputs, num_items_in_batch)

    ``inputs`` holds ``labels`` (or ``shift_labels``) and whatever the decoder takes (``input_ids``,
    ``attention_mask``, ...). The decoder is called directly (``model.get_decoder()``), so a DDP wrapper's
    forward is bypassed: use it where updates are local (one process, layer-wise), or route the call through
    the wrapper. Models whose logits are transformed after the head (soft-capping, logit scales) are refused.
    """
    core = _unwrap(model)
    config = getattr(core, "config", None)
    for name in _UNSUPPORTED_LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(core).__name__} transforms its logits ({name}={value!r}); the lean loss does not, use the "
                "model's own loss")
    head = core.get_output_embeddings() if hasattr(core, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the model's output embedding must be an nn.Linear, got {type(head).__name__}")
    decoder = core.get_decoder() if hasattr(core, "get_decoder") else None
    if not isinstance(decoder, nn.Module) or decoder is core:
        raise TypeError(f"cannot find the decoder of {type(core).__name__} (get_decoder())")
    kwargs = dict(inputs)
    labels = kwargs.pop("labels", None)
    shifted = kwargs.pop("shift_labels", None)
    kwargs.pop("num_items_in_batch", None)
    kwargs.pop("logits_to_keep", None)
    outputs = decoder(**kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return causal_lm_loss(hidden, head.weight, labels, lm_head_bias=head.bias, ignore_index=ignore_index,
                          num_items_in_batch=num_items_in_batch, shifted_labels=shifted,
                          token_chunk_size=token_chunk_size, vocab_chunk_size=vocab_chunk_size)

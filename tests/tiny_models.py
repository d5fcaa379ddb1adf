"""Tiny models of the transformers families the MoE tests cover, built from config (no hub).

Hidden 32, 4 heads, head_dim 8, dense intermediate 48, expert intermediate 24 (so no expert matrix is square and
every orientation shows), 4 experts, top-2, vocabulary 128, 2 layers; no dropout (runs repeat exactly).
"""

from __future__ import annotations

import torch

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
GQA = dict(num_key_value_heads=2, head_dim=8)
MOE = dict(num_experts_per_tok=2)
ATTN = r"self_attn\.(q|k|v|o)_proj\.weight"

# model_type -> (config kwargs, regex of the parameter names that must be low-rank, number of experts or 0)
FAMILIES = {
    "llama": (dict(COMMON, **GQA, intermediate_size=48), rf"{ATTN}|mlp\.(gate|up|down)_proj\.weight", 0),
    "gpt2": (dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, bos_token_id=1,
                  eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), r"attn\.c_(attn|proj)\.weight|mlp\.c_(fc|proj)\.weight", 0),
    "gpt_neox": (dict(COMMON, intermediate_size=48),
                 r"attention\.(query_key_value|dense)\.weight|mlp\.dense_(h_to_4h|4h_to_h)\.weight", 0),
    "phi3": (dict(COMMON, num_key_value_heads=2, intermediate_size=48, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2), r"self_attn\.(qkv|o)_proj\.weight|mlp\.(gate_up|down)_proj\.weight", 0),
    "falcon": (dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_hidden_size=48),
               r"self_attention\.(query_key_value|dense)\.weight|mlp\.dense_(h_to_4h|4h_to_h)\.weight", 0),
    "mixtral": (dict(COMMON, **GQA, **MOE, intermediate_size=24, num_local_experts=4),
                rf"{ATTN}|mlp\.experts\.(gate_up|down)_proj$", 4),
    "qwen2_moe": (dict(COMMON, num_key_value_heads=2, **MOE, intermediate_size=48, moe_intermediate_size=24,
                       shared_expert_intermediate_size=40, num_experts=4, decoder_sparse_step=1),
                  rf"{ATTN}|mlp\.experts\.(gate_up|down)_proj$|mlp\.shared_expert\.(gate|up|down)_proj\.weight", 4),
    "qwen3_moe": (dict(COMMON, **GQA, **MOE, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                       decoder_sparse_step=1), rf"{ATTN}|mlp\.experts\.(gate_up|down)_proj$", 4),
    "deepseek_v3": (dict(COMMON, num_key_value_heads=4, **MOE, intermediate_size=48, moe_intermediate_size=24,
                         n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                         kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         head_dim=8),
                    r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)\.weight"
                    r"|layers\.0\.mlp\.(gate|up|down)_proj\.weight|mlp\.experts\.(gate_up|down)_proj$"
                    r"|mlp\.shared_experts\.(gate|up|down)_proj\.weight", 4),
    "gpt_oss": (dict(COMMON, **GQA, **MOE, intermediate_size=24, num_local_experts=4, sliding_window=8),
                rf"{ATTN}|mlp\.experts\.(gate_up|down)_proj$", 4),
    "olmoe": (dict(COMMON, num_key_value_heads=2, **MOE, intermediate_size=24, num_experts=4, eos_token_id=2),
              rf"{ATTN}|mlp\.experts\.(gate_up|down)_proj$", 4),
    "llama4_text": (dict(COMMON, **GQA, **MOE, intermediate_size=24, intermediate_size_mlp=48, num_local_experts=4,
                         interleave_moe_layer_step=1, attention_chunk_size=8),
                    rf"{ATTN}|feed_forward\.experts\.(gate_up|down)_proj$"
                    r"|feed_forward\.shared_expert\.(gate|up|down)_proj\.weight", 4),
}


def build(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised causal LM of ``model_type`` (see :data:`FAMILIES`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type][0])
    return AutoModelForCausalLM.from_config(config).to(dtype)


class Experts(torch.nn.Module):
    """Fused experts as transformers stores them: (E, out, in) parameters, ``is_transposed=False``; a token's output
    is the mixture of every expert's by the router's ``weights`` (soft routing: the tests' gradients stay smooth)."""

    is_transposed = False

    def __init__(self, experts: int = 3, width: int = 6, hidden: int = 11):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(0.3 * torch.randn(experts, hidden, width))  # 11 x 6 each: right
        self.down_proj = torch.nn.Parameter(0.3 * torch.randn(experts, width, hidden))  # 6 x 11 each: left

    def forward(self, x, weights):
        h = torch.tanh(torch.einsum("bd,ehd->beh", x, self.gate_up_proj))
        return (torch.einsum("beh,edh->bed", h, self.down_proj) * weights.unsqueeze(-1)).sum(1)

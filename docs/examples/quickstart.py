"""Quickstart: train a small character-level transformer on CPython's own docs with APOLLO vs AdamW.

    python docs/examples/quickstart.py [--steps 150]

Runs on a laptop CPU in about a minute, needs no network, and prints each optimizer's loss and its
optimizer-state size.
"""

import argparse
import time

import torch
from pydoc_data.topics import topics
from torch import nn

from lowrank_opt import Apollo, apollo_mini, lowrank_param_groups


class CharLM(nn.Module):
    def __init__(self, vocab: int, dim: int = 128, layers: int = 2, context: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        block = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.lm_head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        return self.lm_head(self.blocks(h, mask=self.mask[: tokens.shape[1], : tokens.shape[1]], is_causal=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    text = "".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text[:400_000]])
    optimizers = {
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0),
        "apollo (rank 32)": lambda m: Apollo(lowrank_param_groups(m, "all-linear", rank=32), lr=3e-3),
        "apollo-mini": lambda m: apollo_mini(lowrank_param_groups(m, "all-linear"), lr=3e-3),
    }
    for name, make in optimizers.items():
        torch.manual_seed(0)
        model = CharLM(len(chars))
        opt = make(model)
        batches = torch.Generator().manual_seed(0)
        start = time.time()
        for step in range(args.steps):
            idx = torch.randint(0, len(data) - 65, (16,), generator=batches)
            window = torch.stack([data[i : i + 65] for i in idx])
            logits = model(window[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, len(chars)), window[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == args.steps - 1:
                print(f"{name:>17} step {step:4d}  loss {loss.item():.3f}")
        state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        print(f"{name:>17} done in {time.time() - start:.0f}s, optimizer state {state_bytes / 2**20:.2f} MiB\n")


if __name__ == "__main__":
    main()

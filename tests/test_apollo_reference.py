"""Our Apollo against the published APOLLO (apollo-torch, CC-BY-NC: used here as an oracle only).

Both optimizers are fed the same gradients and, through a patch of the oracle's matrix generator, the same
projection matrices (ours, taken from ``Apollo.projection_matrix``). Everything else is each side's own code.
"""

import pytest
import torch

from lowrank_opt import Apollo

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch.random_projector import GradientProjector  # noqa: E402

SHAPES = {"tall": (24, 10), "wide": (9, 30), "square": (16, 16)}


def _make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES.values()]
    bias = torch.randn(7, generator=g, dtype=torch.float64)
    return weights, bias


class _SharedProjection:
    """Replaces GradientProjector.get_orthogonal_matrix so the oracle uses our P for each refresh."""

    def __init__(self, ours: Apollo, params_by_seed: dict, gap: int):
        self.ours, self.params_by_seed, self.gap = ours, params_by_seed, gap
        self.owner = {}  # projector -> [param, refreshes so far]

    def __call__(self, projector, weights, rank, type, seed):
        entry = self.owner.get(id(projector))
        if entry is None:
            entry = self.owner[id(projector)] = [self.params_by_seed[seed], 0]
        param, refresh = entry
        entry[1] += 1
        proj = self.ours.projection_matrix(param, step=refresh * self.gap).to(weights.dtype)
        assert proj.shape[0] == rank
        return proj if type == "right" else proj.T


@pytest.mark.parametrize("scale_type,scale", [("channel", 1.0), ("tensor", 128.0), ("channel", 4.0)])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_apollo_torch_with_same_projection(monkeypatch, scale_type, scale, weight_decay):
    gap, steps, rank, lr = 20, 50, 4, 1e-2
    weights, bias = _make_params()
    ours_w = [w.clone().requires_grad_() for w in weights]
    ours_b = bias.clone().requires_grad_()
    ref_w = [w.clone().requires_grad_() for w in weights]
    ref_b = bias.clone().requires_grad_()

    ours = Apollo(
        [{"params": ours_w}, {"params": [ours_b], "rank": None}],
        lr=lr, weight_decay=weight_decay, rank=rank, scale_type=scale_type, scale=scale, update_proj_gap=gap,
    )
    ref = apollo_torch.APOLLOAdamW(
        [
            {"params": ref_w, "rank": rank, "proj": "random", "scale_type": scale_type, "scale": scale,
             "update_proj_gap": gap, "proj_type": "std"},
            {"params": [ref_b]},
        ],
        lr=lr, weight_decay=weight_decay,
    )
    # The oracle seeds parameters 1, 2, ... in order; map each seed to our matching parameter.
    shared = _SharedProjection(ours, {i + 1: p for i, p in enumerate(ours_w)}, gap)
    monkeypatch.setattr(GradientProjector, "get_orthogonal_matrix", lambda self, w, r, type, seed: shared(self, w, r, type, seed))

    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for a, b in zip(ours_w + [ours_b], ref_w + [ref_b]):
            grad = torch.randn(a.shape, generator=g, dtype=torch.float64)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    for p0, a, b in zip(weights + [bias], ours_w + [ours_b], ref_w + [ref_b]):
        torch.testing.assert_close(a.detach() - p0, b.detach() - p0, rtol=1e-6, atol=1e-12)
    # Three refreshes (steps 0, 20, 40) per matrix happened on the oracle's side.
    assert sorted(entry[1] for entry in shared.owner.values()) == [3, 3, 3]

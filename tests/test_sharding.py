"""The sharded APOLLO math equals the unsharded one, without DeepSpeed or a process group.

Threads stand in for ranks (an all-reduce over a barrier, summing in rank order so every rank gets the same
bits). Each rank's ``Apollo`` is built on the full parameters, exactly as a user builds it; the harness then
does to its param groups what DeepSpeed does (ZeRO 1/2: the group's trainable parameters concatenated, padded
to a multiple of 2 x world size and split; ZeRO 3: every parameter split on its own into ceil(numel / world)
elements, a sub-group's partitions concatenated, the flat tensor tagged with ``ds_id``) and calls ``step()``
as DeepSpeed does (once per group, or per sub-group). The weights rebuilt from the shards must equal an
unsharded ``Apollo`` fed the same gradients. Real DeepSpeed and FSDP2 runs on two processes are in
tests/test_deepspeed.py and tests/test_fsdp.py.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from lowrank_opt import Apollo
from lowrank_opt.integrations.deepspeed import deepspeed_param_groups
from lowrank_opt.sharding import ShardLayout, zero_flat_pieces

TOL = 1e-6


# ----------------------------------------------------------------------------------------------------------
# Layouts


def test_layout_blocks_and_cut_rows():
    # 19 x 5 split over 2 ranks in shards of 48: rank 0 has rows 0-8 and 3 columns of row 9.
    lay0 = ShardLayout.build((19, 5), 48, 0, 2)
    lay1 = ShardLayout.build((19, 5), 48, 1, 2)
    assert lay0.cut_rows == lay1.cut_rows == (9,)
    assert [(b.row, b.nrows, b.col, b.ncols, b.offset) for b in lay0.blocks] == [(0, 9, 0, 5, 0), (9, 1, 0, 3, 45)]
    assert [(b.row, b.nrows, b.col, b.ncols, b.offset) for b in lay1.blocks] == [(9, 1, 3, 2, 0), (10, 9, 0, 5, 2)]
    assert (lay1.start, lay1.valid) == (48, 47)  # the last element of the shard is padding
    assert lay0.owns_first_row and not lay1.owns_first_row
    # A shard inside one row (row spans 3 ranks): one partial block; boundaries at 4 and 8 cut row 0.
    mid = ShardLayout.build((2, 10), 4, 1, 5)
    assert [(b.row, b.col, b.ncols) for b in mid.blocks] == [(0, 4, 4)]
    assert mid.cut_rows == (0, 1)
    # A rank holding only padding.
    empty = ShardLayout.build((3, 1), 1, 3, 4)
    assert empty.valid == 0 and empty.blocks == () and empty.num_rows == 0
    with pytest.raises(RuntimeError, match="cannot hold"):
        ShardLayout.build((19, 5), 40, 0, 2)
    rows = ShardLayout.rows((7, 5), 4, 3)  # FSDP2: whole rows 4-6
    assert rows.cut_rows == () and [(b.row, b.nrows, b.ncols) for b in rows.blocks] == [(4, 3, 5)]
    assert ShardLayout.full((7, 5)).is_full and not rows.is_full


def test_zero12_pieces_of_a_concatenated_group():
    # (4, 3) = 12 elements, (5,) bias, (2, 6) = 12: 29 elements, padded to 32 over 2 ranks: shards of 16.
    shapes, trainable = [(4, 3), (5,), (2, 6)], [True, True, True]
    flat = torch.zeros(16)
    p0 = zero_flat_pieces(flat, shapes, trainable, [None] * 3, 0, 2)
    p1 = zero_flat_pieces(flat, shapes, trainable, [None] * 3, 1, 2)
    assert [(p.index, p.offset, p.start, p.numel, p.shared) for p in p0] == [
        (0, 0, 0, 12, False), (1, 12, 0, 4, True), (2, 0, 0, 0, False)]
    assert [(p.index, p.offset, p.start, p.numel, p.shared) for p in p1] == [
        (0, 0, 0, 0, False), (1, 0, 4, 1, True), (2, 1, 0, 12, False)]
    assert p0[1].cuts == p1[1].cuts == (4,)
    # A frozen parameter is not in DeepSpeed's flat group.
    p = zero_flat_pieces(torch.zeros(12), [(4, 3), (5,)], [True, False], [None] * 2, 0, 1)
    assert [(q.index, q.numel) for q in p] == [(0, 12)]
    with pytest.raises(RuntimeError, match="cannot hold"):
        zero_flat_pieces(torch.zeros(10), shapes, trainable, [None] * 3, 0, 2)


def test_zero3_pieces_of_a_sub_group():
    a, b, c = (torch.zeros(1) for _ in range(3))
    for k, t in enumerate((a, b, c)):
        t.ds_id = 10 + k
    flat = torch.zeros(6 + 3)  # ceil(12 / 2) + ceil(5 / 2): parameters 1 and 2 of the group (b, c)
    flat.ds_id = "11_12"
    pieces = zero_flat_pieces(flat, [(4, 3), (2, 6), (5,)], [True] * 3, [a, b, c], 1, 2)
    assert [(p.index, p.offset, p.start, p.numel, p.cuts) for p in pieces] == [(1, 0, 6, 6, (6,)), (2, 6, 3, 2, (3,))]
    flat.ds_id = "11_99"
    with pytest.raises(RuntimeError, match="does not belong"):
        zero_flat_pieces(flat, [(4, 3), (2, 6), (5,)], [True] * 3, [a, b, c], 1, 2)


# ----------------------------------------------------------------------------------------------------------
# Threads as ranks


class _Group:
    def __init__(self, world_size):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots = [None] * world_size


class ThreadComm:
    """all_reduce (sum, in rank order, so every rank gets the same bits) between threads."""

    def __init__(self, group, rank):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_reduce_(self, tensor):
        g = self.group
        g.slots[self.rank] = tensor.clone()
        g.barrier.wait()
        total = g.slots[0].clone()
        for other in g.slots[1:]:
            total += other
        g.barrier.wait()
        tensor.copy_(total)


MATRICES = [(13, 7), (6, 19), (5, 3, 3, 3), (6, 6), (40, 3), (3, 40), (1, 9), (9, 1)]
VECTORS = [(7,), (3,), (11,)]


def _make_groups(params, layout_groups, **options):
    named = [(f"w{i}", p) for i, p in enumerate(params)]
    low = [(n, p) for n, p in named if p.ndim >= 2]
    dense = [(n, p) for n, p in named if p.ndim < 2]
    groups = [g for g in ({"params": low}, {"params": dense, "rank": None}) if g["params"]]
    if layout_groups == "per_matrix":
        groups = deepspeed_param_groups(groups)
    elif layout_groups == "mixed":  # matrices and vectors in one low-rank group (1-D ones get AdamW)
        groups = [{"params": [x for pair in zip(low, dense) for x in pair] + low[len(dense):]}]
    return groups


def _zero12_flat(tensors, world_size, rank):
    total = sum(t.numel() for t in tensors)
    align = 2 * world_size
    shard = -(-total // align) * align // world_size
    padded = torch.zeros(shard * world_size, dtype=tensors[0].dtype)
    padded[:total] = torch.cat([t.reshape(-1) for t in tensors])
    return padded[rank * shard:(rank + 1) * shard].clone()


def _zero3_flat(tensors, world_size, rank):
    parts = []
    for t in tensors:
        part = -(-t.numel() // world_size)
        padded = torch.zeros(part * world_size, dtype=t.dtype)
        padded[:t.numel()] = t.reshape(-1)
        parts.append(padded[rank * part:(rank + 1) * part])
    return torch.cat(parts).clone()


def _unflatten(layout, flats_per_rank, tensors_per_group, world_size):
    """Rebuild full tensors (per group, per sub-group) from every rank's flat shards."""
    out = []
    for g, (sub_tensors, flats) in enumerate(zip(tensors_per_group, flats_per_rank)):
        if layout == "stage12":
            whole = torch.cat(flats)
            pos = 0
            for t in sub_tensors:
                out.append(whole[pos:pos + t.numel()].view(t.shape))
                pos += t.numel()
        else:
            offset = 0
            for t in sub_tensors:
                part = -(-t.numel() // world_size)
                whole = torch.cat([f[offset:offset + part] for f in flats])[:t.numel()]
                out.append(whole.view(t.shape))
                offset += part
    return out


def simulate(world_size, layout="stage12", groups="concat", steps=12, shapes=None, grads_fn=None,
             sub_group_size=None, dtype=torch.float32, **options):
    """(max |diff| vs unsharded Apollo, per-rank comm bytes of the last step, per-rank optimizers).

    ``layout``: "stage12" or "stage3"; ``groups``: "concat" (a low-rank group of every matrix and an AdamW group
    of the vectors, as lowrank_param_groups makes), "per_matrix" (deepspeed_param_groups) or "mixed" (one group
    with matrices and vectors interleaved). ``sub_group_size``: ZeRO 3 sub-groups of at most this many
    parameters, each stepped on its own."""
    shapes = shapes if shapes is not None else MATRICES + VECTORS
    torch.manual_seed(0)
    full = [torch.randn(s, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, dtype=dtype) for s in shapes] for _ in range(steps)]
    if grads_fn is not None:
        grads = grads_fn(grads)
    ref_params = [nn.Parameter(f.clone()) for f in full]
    ref = Apollo(_make_groups(ref_params, groups), **options)
    for t in range(steps):
        for p, g in zip(ref_params, grads[t]):
            p.grad = g.clone()
        ref.step()
    comm_group = _Group(world_size)
    results, errors = [None] * world_size, [None] * world_size

    def rank_main(rank):
        try:
            params = [nn.Parameter(f.clone()) for f in full]
            index = {id(p): k for k, p in enumerate(params)}
            opt = Apollo(_make_groups(params, groups), comm=ThreadComm(comm_group, rank), **options)
            # What DeepSpeed does to the groups: (group index, [param indices], flat shard) per (sub-)group.
            units = []
            for gi, group in enumerate(opt.param_groups):
                members = [index[id(p)] for p in group["params"]]
                if layout == "stage12":
                    units.append((gi, members))
                else:
                    size = sub_group_size or len(members)
                    units.extend((gi, members[s:s + size]) for s in range(0, len(members), size))
            for k, p in enumerate(params):
                p.ds_id = k  # what zero.Init gives every parameter (ZeRO 3's sub-groups name their first and last)
            flats = []
            for gi, members in units:
                tensors = [params[k].detach() for k in members]
                if layout == "stage12":
                    flat = _zero12_flat(tensors, world_size, rank)
                else:
                    flat = _zero3_flat(tensors, world_size, rank)
                    flat.ds_id = f"{members[0]}_{members[-1]}"
                flats.append(flat.requires_grad_(True))
            original_groups = list(opt.param_groups)
            for t in range(steps):
                for (gi, members), flat in zip(units, flats):
                    tensors = [grads[t][k] for k in members]
                    flat.grad = (_zero12_flat if layout == "stage12" else _zero3_flat)(tensors, world_size, rank)
                for (gi, members), flat in zip(units, flats):  # DeepSpeed steps one (sub-)group at a time
                    group = original_groups[gi]
                    group["params"] = [flat]
                    opt.param_groups = [group] if layout == "stage12" else original_groups
                    if layout == "stage3":
                        for other in original_groups:
                            if other is not group:
                                other["params"] = []
                    opt.step()
                    opt.param_groups = original_groups
            results[rank] = ([f.detach() for f in flats], opt, units)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors[rank] = exc
            comm_group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if real or any(errors):
        raise (real or [e for e in errors if e is not None])[0]
    units = results[0][2]
    diff = 0.0
    for u, (gi, members) in enumerate(units):
        rebuilt = _unflatten(layout, [[results[r][0][u] for r in range(world_size)]],
                             [[full[k] for k in members]], world_size)
        for k, tensor in zip(members, rebuilt):
            diff = max(diff, float((tensor - ref_params[k].detach()).abs().max()))
    optimizers = [results[r][1] for r in range(world_size)]
    return diff, [o.comm_bytes_last_step for o in optimizers], optimizers


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("layout,groups", [("stage12", "concat"), ("stage12", "per_matrix"), ("stage12", "mixed"),
                                           ("stage3", "concat"), ("stage3", "per_matrix")])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_sharded_equals_unsharded(world_size, layout, groups, scale_type):
    diff, comm, opts = simulate(world_size, layout, groups, rank=2, scale_type=scale_type, lr=1e-2, update_proj_gap=5,
                                weight_decay=0.05)
    assert diff < TOL
    if world_size == 1:
        assert comm == [0]
    else:
        assert all(c > 0 for c in comm)


@pytest.mark.parametrize("options", [
    dict(norm_growth_limit=None, scale=4.0, weight_decay=0.1),
    dict(sort_dims=False, scale_type="tensor"),
    dict(rank=0.5, correct_bias=False, cache_projection=True),
    dict(state_dtype="bfloat16", update_proj_gap=3),
    dict(rank=lambda d: max(1, math.isqrt(d)), scale_type="tensor", scale=128.0),
])
def test_sharded_equals_unsharded_options(options):
    options = {"rank": 2, "lr": 1e-2, "update_proj_gap": 4, **options}
    diff, _, _ = simulate(3, "stage12", "concat", **options)
    assert diff < TOL


def test_zero3_sub_groups_and_float64():
    diff, _, _ = simulate(3, "stage3", "concat", sub_group_size=3, rank=3, lr=1e-2, update_proj_gap=5)
    assert diff < TOL
    diff, _, _ = simulate(2, "stage12", "concat", dtype=torch.float64, rank=3, lr=1e-2, update_proj_gap=5)
    assert diff < 1e-12


def test_comm_bytes_match_what_must_cross():
    # 19 x 5 (right, r=3) on 2 ranks, one group per matrix: [raise, flag], one cut row (3 numbers), ||U||^2.
    _, comm, _ = simulate(2, "stage12", "per_matrix", steps=2, shapes=[(19, 5)], rank=3)
    assert comm == [(2 + 3 + 1) * 4] * 2
    # 6 x 6 (right) split on a row edge: still a shared matrix (flags and ||U||^2), no cut row.
    _, comm, _ = simulate(2, "stage12", "per_matrix", steps=2, shapes=[(6, 6)], rank=3)
    assert comm == [(2 + 1) * 4] * 2
    # 6 x 19 (left, r=3): [raise, flag, n column norms^2], then the r x n partial sums.
    _, comm, _ = simulate(2, "stage12", "per_matrix", steps=2, shapes=[(6, 19)], rank=3)
    assert comm == [(2 + 19 + 3 * 19) * 4] * 2
    # tensor scaling, right: [raise, flag, ||G||^2], a cut row, then ||R~||^2 and ||R||^2.
    _, comm, _ = simulate(2, "stage12", "per_matrix", steps=2, shapes=[(19, 5)], rank=3, scale_type="tensor")
    assert comm == [(3 + 3 + 2) * 4] * 2
    # Concatenated groups: 4 x (4, 4) = 64 elements in shards of 32, two matrices whole on each rank: a matrix
    # held whole by one rank crosses nothing.
    _, comm, _ = simulate(2, "stage12", "concat", steps=2, shapes=[(4, 4), (4, 4), (4, 4), (4, 4)], rank=2)
    assert comm == [0, 0]
    # one rank: nothing crosses.
    _, comm, _ = simulate(1, "stage12", "per_matrix", steps=2, shapes=[(19, 5)], rank=3)
    assert comm == [0]


def test_nonfinite_is_decided_on_every_rank():
    def poison(grads):  # a NaN on the second rank's half of the first matrix, at step 1
        grads[1][0].view(-1)[-1] = float("nan")
        return grads

    with pytest.raises(RuntimeError, match="non-finite"):
        simulate(2, "stage12", "per_matrix", steps=3, shapes=[(13, 7)], grads_fn=poison, rank=2)
    _, _, opts = simulate(2, "stage12", "per_matrix", steps=3, shapes=[(13, 7)], grads_fn=poison, rank=2,
                          nonfinite="skip")
    assert [o.skipped_tensors for o in opts] == [1, 1]
    for o in opts:
        (state,) = o.state.values()
        assert {s["step"] for s in state["shard_state"].values()} == {2}

    def poison_local(grads):  # a NaN in a matrix that sits whole on rank 1: rank 0 must raise too
        grads[1][1].view(-1)[0] = float("nan")
        return grads

    with pytest.raises(RuntimeError, match="non-finite"):
        simulate(2, "stage12", "concat", steps=3, shapes=[(4, 4), (4, 4)], grads_fn=poison_local, rank=2)


def test_unrecognised_layout_raises_instead_of_training_something_else():
    a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3, 4))
    opt = Apollo([{"params": [a, b], "rank": 2}])
    two_d = torch.zeros(3, 3, requires_grad=True)
    two_d.grad = torch.ones(3, 3)
    opt.param_groups[0]["params"] = [two_d, two_d]
    with pytest.raises(RuntimeError, match="does not recognise"):
        opt.step()
    flat = torch.zeros(5, requires_grad=True)  # too small for 24 elements on one rank
    flat.grad = torch.ones(5)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="cannot hold"):
        opt.step()


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed's stage-0 set-up call (bf16/fp16): fp32 copies, all-zero gradients, no state yet


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.down = nn.Linear(6, 3)
        self.norm = nn.LayerNorm(3)


def _groups(model):
    from lowrank_opt import lowrank_param_groups

    return lowrank_param_groups(model, ["up", "down"], rank=2)


def test_setup_step_on_copies_changes_nothing():
    torch.manual_seed(0)
    model, ref_model = Tiny(), Tiny()
    ref_model.load_state_dict(model.state_dict())
    opt = Apollo(_groups(model), lr=1e-2, weight_decay=0.1)
    ref = Apollo(_groups(ref_model), lr=1e-2, weight_decay=0.1)
    # What FP16_UnfusedOptimizer does: replace each group's parameters by fp32 copies, step with zero grads.
    copies = []
    for group in opt.param_groups:
        group["params"] = [p.detach().clone().float().requires_grad_(True) for p in group["params"]]
        copies.extend(group["params"])
    before = [c.detach().clone() for c in copies]
    for c in copies:
        c.grad = torch.zeros_like(c)
    opt.step()
    assert opt.init_steps_skipped == 1 and len(opt.state) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, copies))  # not even weight decay
    ref_params = [p for g in ref.param_groups for p in g["params"]]
    for step in range(5):
        torch.manual_seed(step)
        for c, q in zip(copies, ref_params):
            c.grad = torch.randn_like(c)
            q.grad = c.grad.clone()
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(copies, ref_params))
    assert {s["step"] for s in opt.state.values()} == {5}
    for c in copies:  # once state exists, zero gradients are ordinary gradients
        c.grad = torch.zeros_like(c)
    opt.step()
    assert {s["step"] for s in opt.state.values()} == {6}


def test_zero_gradients_on_the_real_parameters_are_a_real_step():
    model = Tiny()
    opt = Apollo(_groups(model), weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.init_steps_skipped == 0 and {s["step"] for s in opt.state.values()} == {1}


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("layout,groups", [("stage12", "concat"), ("stage12", "per_matrix"), ("stage3", "concat")])
@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_sharded_stacked_experts_equal_unsharded(world_size, layout, groups, scale_type):
    """Fused experts (E, m, n) cut anywhere by flat shards (inside an expert's row, between experts): each rank
    updates what it holds, per expert, and the result is the unsharded one."""
    shapes = [(3, 7, 5), (4, 5, 9), (2, 6, 6), (7,), (5, 4, 3)]
    diff, comm, _ = simulate(world_size, layout, groups, shapes=shapes, stacked=True, rank=2, scale_type=scale_type,
                             lr=1e-2, update_proj_gap=4, weight_decay=0.05)
    assert diff < TOL
    assert any(c > 0 for c in comm)

"""
Evolving Subnetwork Training (EST, arXiv 2406.06962): each training step runs a random sub-network of the model,
in three stages of growing size, so that the early steps cost fewer FLOPs. train.py --est=True uses it.

    stage 1, iters [0, stage1_end * max_iters): some blocks run, each with some of its heads and SwiGLU units
    stage 2, until stage2_end * max_iters:       every block runs, still with some of its heads and units
    stage 3, until the end:                      the full model

model.py has the hook: a Block runs the rows of its weights that set_subnetwork gives it (Block.est_q_rows,
est_kv_rows, est_units; sliced, so that the matmuls really shrink), scaled by 1/p like dropout, or is skipped
(Block.est_skip); forward_flops counts what runs. The results are in docs/est.md.
"""
import math

import torch

from model import Block, RecurrentBlock


def set_subnetwork(model, subnet):
    """Run only part of the model from now on, until the next call.
    subnet: None for the dense model, or one entry per block of model.blocks(): None skips that block (the residual
    passes through), (groups, units) runs it with only these KV groups (each with all its query heads; with plain
    multi-head attention a group is one head) and these SwiGLU hidden units, LongTensors. Scorers, upsampling and
    bypasses of SUBLLM levels always run. See sample_subnetwork."""
    blocks = model.blocks()
    if subnet is not None and any(isinstance(m, RecurrentBlock) for m in model.modules()):
        raise ValueError("EST sub-networks are not implemented for recurrent blocks ('R' in the structure): "
                         "train this structure without est")
    if subnet is None:
        subnet = [(None, None)] * len(blocks)
    if len(subnet) != len(blocks):
        raise ValueError(f"the sub-network has {len(subnet)} entries but the model has {len(blocks)} blocks: "
                         f"give one per block of model.blocks()")
    cfg = model.config
    head_dim, q_per_group = cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head
    for block, entry in zip(blocks, subnet):
        block.est_skip = entry is None
        groups, units = (None, None) if entry is None else entry
        if groups is None:  # dense (or skipped: then the rows are never used)
            block.est_q_rows = block.est_kv_rows = block.est_units = None
            continue
        device = block.attn.wq.weight.device
        groups, units = torch.as_tensor(groups, device=device), torch.as_tensor(units, device=device)
        for name, idx, n in (('KV groups', groups, cfg.n_kv_head), ('units', units, cfg.ffn_hidden)):
            if idx.dim() != 1 or idx.numel() == 0 or idx.unique().numel() != idx.numel() or \
                    idx.min() < 0 or idx.max() >= n:
                raise ValueError(f"sub-network {name} {idx.tolist()}: give distinct indices in [0, {n})")
        dims = torch.arange(head_dim, device=device)
        heads = (groups[:, None] * q_per_group + torch.arange(q_per_group, device=device)).flatten()
        block.est_q_rows = (heads[:, None] * head_dim + dims).flatten()  # (kept heads * D,)
        block.est_kv_rows = (groups[:, None] * head_dim + dims).flatten()  # (kept groups * D,)
        block.est_units = units


def est_kept(p, n):
    """How many of n things a sampling rate p keeps: p * n rounded half up, at least 1."""
    return max(1, min(n, math.floor(p * n + 0.5)))


def sample_subnetwork(model, p_heads, p_units, p_layers, generator):
    """A random sub-network for set_subnetwork: est_kept(p_layers, n) of the n blocks run (more if the rules need
    more: the first and last block always run, and in SUBLLM at least one block directly inside every level, so no
    level degenerates to its bypass), and each running block keeps est_kept(p_heads) of its KV groups and
    est_kept(p_units) of its SwiGLU units, all uniformly at random. Everything comes from `generator`: the same
    generator state gives the same sub-network (DDP ranks, resumed runs). Loops over blocks and levels: a few."""
    cfg, blocks = model.config, model.blocks()
    n = len(blocks)
    position = {id(b): i for i, b in enumerate(blocks)}
    running = {0, n - 1}
    for level in model.levels():
        inside = [position[id(b)] for b in level.inner.layers if isinstance(b, Block)]
        if not running & set(inside):
            running.add(inside[torch.randint(len(inside), (), generator=generator).item()])
    others = [i for i in torch.randperm(n, generator=generator).tolist() if i not in running]
    running |= set(others[:max(0, est_kept(p_layers, n) - len(running))])
    n_groups, n_units = est_kept(p_heads, cfg.n_kv_head), est_kept(p_units, cfg.ffn_hidden)
    subnet = []
    for i in range(n):
        groups = torch.randperm(cfg.n_kv_head, generator=generator)[:n_groups].sort().values
        units = torch.randperm(cfg.ffn_hidden, generator=generator)[:n_units].sort().values
        subnet.append((groups, units) if i in running else None)
    return subnet


def est_stage(it, max_iters, stage1_end, stage2_end):
    """The stage (1, 2 or 3) of iteration it; stage1_end and stage2_end are fractions of max_iters."""
    return 1 if it < stage1_end * max_iters else 2 if it < stage2_end * max_iters else 3


def est_plan(max_iters, stage1_end, stage2_end, p_heads, p_units, p_layers):
    """The stages of a run of max_iters, in one line."""
    stage1, stage2 = math.ceil(stage1_end * max_iters), math.ceil(stage2_end * max_iters)
    return (f"EST: stage 1 iters [0, {stage1}) with heads x{p_heads:g}, units x{p_units:g}, blocks x{p_layers:g}; "
            f"stage 2 [{stage1}, {stage2}) all blocks; stage 3 [{stage2}, {max_iters}) full model")


def subnetwork_at(model, it, seed, stage, p_heads, p_units, p_layers):
    """The sub-network of iteration it in this stage (None in stage 3: the full model). It depends on (seed, it)
    only, not on the rank or on any random state: every DDP rank and every micro-step of the step, and a resumed
    run, use the same one."""
    if stage == 3:
        return None
    generator = torch.Generator().manual_seed(seed * 1_000_003 + it)
    return sample_subnetwork(model, p_heads, p_units, p_layers if stage == 1 else 1.0, generator)

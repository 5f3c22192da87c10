"""
Evolving Subnetwork Training (EST, arXiv 2406.06962): each training step runs a random sub-network of the model,
in three stages of growing size, so that the early steps cost fewer FLOPs. train.py --est=True uses it.

    stage 1, iters [0, stage1_end * max_iters): some blocks run, each with some of its heads and SwiGLU units
    stage 2, until stage2_end * max_iters:       every block runs, still with some of its heads and units
    stage 3, until the end:                      the full model

model.py has the hook: a Block is skipped (Block.est_skip), or runs subnetwork_forward (Block.est_forward) with
the rows of its weights that set_subnetwork gives it (sliced, so that the matmuls really shrink), scaled by 1/p like
dropout; forward_flops counts what runs. The results are in docs/est.md.
"""
import math

import torch
import torch.nn.functional as F

from model import Block, RecurrentBlock, apply_rope


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
        block.est_forward = None if groups is None else subnetwork_forward
        if groups is None:  # dense (or skipped: then the rows are never used)
            for name in ('est_q_rows', 'est_kv_rows', 'est_units'):
                block.register_buffer(name, None, persistent=False)
            continue
        device = block.attn.wq.weight.device
        groups, units = torch.as_tensor(groups, device=device), torch.as_tensor(units, device=device)
        for name, idx, n in (('KV groups', groups, cfg.n_kv_head), ('units', units, cfg.ffn_hidden)):
            if idx.dim() != 1 or idx.numel() == 0 or idx.unique().numel() != idx.numel() or \
                    idx.min() < 0 or idx.max() >= n:
                raise ValueError(f"sub-network {name} {idx.tolist()}: give distinct indices in [0, {n})")
        dims = torch.arange(head_dim, device=device)
        heads = (groups[:, None] * q_per_group + torch.arange(q_per_group, device=device)).flatten()
        # buffers: they follow .to(device), and torch.compile takes them as inputs (no recompile per sub-network)
        block.register_buffer('est_q_rows', (heads[:, None] * head_dim + dims).flatten(), persistent=False)  # wq rows
        block.register_buffer('est_kv_rows', (groups[:, None] * head_dim + dims).flatten(), persistent=False)
        block.register_buffer('est_units', units, persistent=False)  # SwiGLU hidden units (rows of gate and up)


def subnetwork_forward(block, x, cos, sin):
    """Block.forward of a sub-network: its heads and units only (rows of wq, wk, wv, gate and up; columns of wo and
    down), each branch scaled by 1/p like dropout, p the fraction it runs."""
    attn, mlp = block.attn, block.mlp
    p_heads, p_units = est_fractions(block)
    h = block.attn_norm(x)
    B, T, _ = h.shape
    q = F.linear(h, attn.wq.weight[block.est_q_rows]).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, h, T, D)
    k = F.linear(h, attn.wk.weight[block.est_kv_rows]).view(B, T, -1, attn.head_dim).transpose(1, 2)
    v = F.linear(h, attn.wv.weight[block.est_kv_rows]).view(B, T, -1, attn.head_dim).transpose(1, 2)
    y = attn.attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v).transpose(1, 2).reshape(B, T, -1)
    x = x + block.dropout(F.linear(y, attn.wo.weight[:, block.est_q_rows]) / p_heads)
    h = block.mlp_norm(x)
    units = block.est_units
    u = F.silu(F.linear(h, mlp.gate.weight[units])) * F.linear(h, mlp.up.weight[units])
    return x + block.dropout(F.linear(u, mlp.down.weight[:, units]) / p_units)


def est_fractions(block):
    """(p_heads, p_units): the fractions of its attention heads and SwiGLU units that a block runs (1, 1: dense)."""
    if block.est_forward is None:
        return 1, 1
    return (block.est_q_rows.numel() / block.attn.wq.weight.size(0),
            block.est_units.numel() / block.mlp.gate.weight.size(0))


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
    """The stages of a run of max_iters, in one line; settings out of range are one line too (SystemExit)."""
    if not 0 <= stage1_end <= stage2_end <= 1:
        raise SystemExit(f"EST stages need 0 <= est_stage1_end <= est_stage2_end <= 1, got {stage1_end} and "
                         f"{stage2_end} (fractions of max_iters)")
    if not all(0 < p <= 1 for p in (p_heads, p_units, p_layers)):
        raise SystemExit(f"est_p_heads, est_p_units and est_p_layers must be in (0, 1], got {p_heads}, {p_units} "
                         f"and {p_layers}")
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

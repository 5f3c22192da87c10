"""
Growing a trained model into a deeper one: Transformer Layer Injection (TLI, arXiv 2410.11654) and the Depth
Up-Scaling baseline (DUS, SOLAR, arXiv 2312.15166). train.py --init_from=grow uses it; docs/growth.md has the
experiment (grow_checkpoint reads and grows a run's checkpoint for it). The structure string places every block of
the grown model, so a SUBLLM's levels grow with it.
"""
import os
from dataclasses import replace

import torch

from model import SubLLM, parse_structure
from run_dir import load_checkpoint, model_from


def tli_structure(structure, k):
    """Transformer Layer Injection (arXiv 2410.11654): a new block right after every k-th block, counted over the
    whole string, in the same level as the block it copies. 'TT(TT)TT', k=2 -> 'TTT(TTT)TTT'.
    Returns the new string and, per block of it in order, (index of the old block it copies, injected?)."""
    chars, sources, n = [], [], 0
    for ch in structure:
        chars.append(ch)
        if ch == 'T':
            sources.append((n, False))
            n += 1
            if n % k == 0:
                chars.append('T')
                sources.append((n - 1, True))
    return ''.join(chars), sources


def dus_structure(structure, m):
    """Depth Up-Scaling (SOLAR, arXiv 2312.15166): copy A without its last m blocks, then copy B without its first m.
    A keeps the ')' right after its last block, B the '(' right before its first. Each half must be a whole structure
    (no level cut in half), so that every level of the result is one level of the old model, at the same depth.
    Returns the new string, (old block index, False) per new block, and the old level index per new level."""
    positions = [i for i, ch in enumerate(structure) if ch == 'T']
    n, n_levels = len(positions), structure.count('(')
    end_a, start_b = positions[n - m - 1] + 1, positions[m]
    while end_a < len(structure) and structure[end_a] == ')':
        end_a += 1
    while structure[start_b - 1:start_b] == '(':
        start_b -= 1
    half_a, half_b = structure[:end_a], structure[start_b:]
    for half in (half_a, half_b):
        try:
            parse_structure(half)
        except ValueError:
            raise ValueError(f"DUS with m={m} cuts a level of {structure!r} in half ({half_a!r} + {half_b!r}): "
                             f"try another m, or grow the LLaMA baseline (no levels)") from None
    blocks = [(i, False) for i in list(range(n - m)) + list(range(m, n))]
    levels = list(range(half_a.count('('))) + list(range(n_levels - half_b.count('('), n_levels))
    return half_a + half_b, blocks, levels


@torch.no_grad()
def grow(model, method='tli', k=2, init='copy_zero', m=2):
    """A new, deeper SubLLM built from copies of a trained model's weights (the model itself is left as it is).
    method 'tli': a block injected after every k-th block (n -> n + n // k blocks); 'dus': the Depth Up-Scaling
    baseline, 2 * (n - m) blocks. The structure string places every block; each level keeps its scorer, bypass and
    running score offset, and its depth (so its keep ratio). init, for the injected TLI blocks: 'copy_zero' copies
    the block before and zeroes its attention output (wo) and MLP down projections, so the block starts as the
    identity and the grown model computes exactly the old function (LLaMA Pro's trick; the zeroed matrices still get
    a gradient, their inputs are not zero); 'copy' is a plain copy. DUS copies blocks as they are (SOLAR)."""
    blocks, levels = model.blocks(), model.levels()
    n = len(blocks)
    if 'R' in model.config.structure:
        raise ValueError("growing is for structures of T blocks and levels; a recurrent block ('R') cannot be grown")
    if init not in ('copy_zero', 'copy'):
        raise ValueError(f"init must be 'copy_zero' or 'copy', got {init!r}")
    if method == 'tli':
        if not 1 <= k <= n:
            raise ValueError(f"k={k}: TLI injects a block after every k-th of the model's {n} blocks; "
                             f"give 1 <= k <= {n}")
        structure, block_sources = tli_structure(model.config.structure, k)
        level_sources = range(len(levels))
    elif method == 'dus':
        if not 1 <= m < n:
            raise ValueError(f"m={m}: DUS drops m of the {n} blocks from each copy; give 1 <= m < {n}")
        structure, block_sources, level_sources = dus_structure(model.config.structure, m)
    else:
        raise ValueError(f"method must be 'tli' (Transformer Layer Injection) or 'dus' (Depth Up-Scaling), "
                         f"got {method!r}")
    param = model.lm_head.weight
    grown = SubLLM(replace(model.config, structure=structure)).to(param.device, param.dtype)
    for name in ('tok_embeddings', 'norm', 'lm_head'):
        getattr(grown, name).load_state_dict(getattr(model, name).state_dict())
    for new, (i, injected) in zip(grown.blocks(), block_sources, strict=True):
        new.load_state_dict(blocks[i].state_dict())
        if injected and init == 'copy_zero':
            new.attn.wo.weight.zero_()
            new.mlp.down.weight.zero_()
    for new, i in zip(grown.levels(), level_sources, strict=True):
        new.scorer.load_state_dict(levels[i].scorer.state_dict())
        new.bypass.load_state_dict(levels[i].bypass.state_dict())
        new.score_offset.copy_(levels[i].score_offset)
    return grown.train(model.training)


def grow_checkpoint(out_dir, method, k, init, m, say=print):
    """train.py --init_from=grow: the model of out_dir's checkpoint (ckpt_prev.pt if ckpt.pt is damaged), grown (on
    the CPU, in train mode); a problem ends the run with one line."""
    path = os.path.join(out_dir, 'ckpt.pt')
    missing = f"init_from=grow needs --grow_from=OUT_DIR of a trained model: no checkpoint at {path}"
    if not out_dir:
        raise SystemExit(missing)
    source, path = load_checkpoint(out_dir, ('model', 'model_args', 'iter_num'), missing=missing, say=say)
    base = model_from(source, path)
    try:
        grown = grow(base, method=method, k=k, init=init, m=m)
    except ValueError as e:
        raise SystemExit(f"cannot grow {path}: {e}") from None
    how = f"TLI k={k}, {init}" if method == 'tli' else f"DUS m={m}"
    say(f"grown ({how}) from {path} (iter {source['iter_num']}): {len(base.blocks())} blocks "
        f"{base.config.structure} -> {len(grown.blocks())} blocks {grown.config.structure}")
    return grown

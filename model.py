"""
SUBLLM (arXiv 2406.06571): a LLaMA-style decoder whose middle blocks run on a learned subset of tokens. Bypass and
Balancer come from Zipformer; the reference is SUBLLM.md.

A structure string describes the model: `T` is a transformer block, `(` opens a subsampled level and `)` closes
it. "TT(TT(TT)TT)TT" has two nested levels; "TTTTTTTTTT" is the LLaMA baseline, the same class. A level scores
every token, keeps a subset (subsample), runs its blocks on the short sequence, scatters the result back
(upsample) and mixes it with the skipped path through a learned per-channel gate (bypass). `R` is a recurrent
block (recurrent.py), at the top level only.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

from recurrent import RecurrentBlock  # structure character 'R': one block applied over windows of tokens

# torch.compile: a number read from a tensor (.item(): the eval forward's short length, subsample_eval) stays in the
# graph as a size unknown until run time, instead of ending the graph there and recompiling for each new value
torch._dynamo.config.capture_scalar_outputs = True


@dataclass
class SubLLMConfig:
    vocab_size: int = 50304
    block_size: int = 1024          # longest sequence the model accepts (RoPE table size)
    n_embd: int = 768
    n_head: int = 12
    n_kv_head: int = None           # grouped-query attention: None means n_head (plain multi-head)
    ffn_hidden: int = None          # SwiGLU hidden size; None: LLaMA's rule, 2/3 * 4 * n_embd rounded up to 256
    structure: str = "TTT(TT(TT)TT)TTT"
    keep_ratio: float = 0.64        # fraction of the parent's tokens a level keeps: one float, or a tuple per depth
    selection: str = 'topk'         # training-time selection: 'topk' (the paper) or 'threshold' (score > 0, causal)
    capacity_slack: float = 0.25    # threshold: a level has room for keep * T * (1 + slack) tokens (static shapes)
    # Three choices of ours that the paper does not make (README, deviations), switchable for the quality ablations
    scorer_norm: bool = True        # the scorer reads rms_norm(x); False: the raw residual stream x (the paper)
    balancer: str = 'centred'       # 'spec': Zipformer's, gain 0.04; 'centred': and the task gradient's common
                                    # mode removed; 'strong': centred, count gain 10
    running_cut: str = 'batch'      # subtract a running average of the top-k cut: of the 'batch', the mean of its
                                    # 'rows' (what earlier runs used), or 'off' (Level.track_cut)
    rope_theta: float = 10000.0
    rope_scaling: dict = None       # Llama 3's long-context RoPE (rope_frequencies); None: plain RoPE
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    # Training schedules (SUBLLM.md §6, §7), in steps of a ~100k-step run; set_step scales them to shorter runs.
    bypass_schedule_steps: int = 20000    # bypass lower limit c_min goes 0.9 -> 0.2
    balancer_schedule_steps: int = 8000   # balancer probability goes 1.0 -> 0.25
    # Recurrent blocks ('R' in the structure, see RecurrentBlock)
    rec_window: int = 16            # w: tokens per window; a step attends over 2w positions (state + new tokens)
    rec_alpha: float = 0.0          # 0: forget variant; > 0: accumulate, adding alpha * (previous readout) to a step
    rec_learn_alpha: bool = False   # learn alpha (one per R block, starting at rec_alpha, clamped to [0, 1])

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.ffn_hidden is None:
            self.ffn_hidden = 256 * math.ceil(int(8 * self.n_embd / 3) / 256)
        if isinstance(self.keep_ratio, list):
            self.keep_ratio = tuple(self.keep_ratio)
        if isinstance(self.running_cut, bool):  # checkpoints before running_cut had a scope: True was 'rows'
            self.running_cut = 'rows' if self.running_cut else 'off'
        depth = max_depth(parse_structure(self.structure))
        ratios = self.keep_ratio if isinstance(self.keep_ratio, tuple) else (self.keep_ratio,) * depth
        head_size = self.n_embd // self.n_head
        for ok, message in [
                (self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"),
                (self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} must be divisible by n_kv_head"),
                (head_size % 2 == 0, f"head size n_embd/n_head={head_size} must be even for RoPE"),
                (len(ratios) >= depth, f"keep_ratio {self.keep_ratio} has {len(ratios)} values for {depth} nested "
                                       f"levels: give one float, or one per level"),
                (all(0.0 < r <= 1.0 for r in ratios), f"keep_ratio {self.keep_ratio} must be in (0, 1]"),
                (self.selection in ('topk', 'threshold'), "selection must be 'topk' or 'threshold'"),
                (self.balancer in ('spec', 'centred', 'strong'), "balancer must be 'spec', 'centred' or 'strong'"),
                (self.running_cut in ('batch', 'rows', 'off'), "running_cut must be 'batch', 'rows' or 'off'"),
                (self.capacity_slack >= 0, f"capacity_slack must be >= 0, got {self.capacity_slack}"),
                (self.rec_window >= 1, f"rec_window={self.rec_window} must be at least 1"),
                (0.0 <= self.rec_alpha <= 1.0, f"rec_alpha={self.rec_alpha} must be in [0, 1]")]:
            if not ok:
                raise ValueError(message)

    def keep_ratio_at(self, depth):
        """Keep ratio of a level at nesting depth 1, 2, ..."""
        return self.keep_ratio[depth - 1] if isinstance(self.keep_ratio, tuple) else self.keep_ratio


def parse_structure(structure):
    """'TT(T(T)T)T' -> ['T', 'T', ['T', ['T'], 'T'], 'T']: a list of blocks ('T', 'R') and levels (nested lists)."""
    stack = [[]]
    for i, ch in enumerate(structure):
        where = f"structure {structure!r}: {ch!r} at position {i}"
        if ch == 'T' or (ch == 'R' and len(stack) == 1):
            stack[-1].append(ch)
        elif ch == 'R':
            raise ValueError(f"{where} is inside a subsampled level; a recurrent block works only at the top level")
        elif ch == '(':
            stack.append([])
        elif ch == ')' and len(stack) == 1:
            raise ValueError(f"{where} closes no level")
        elif ch == ')':
            if 'T' not in stack[-1]:
                raise ValueError(f"{where} closes a level that has no 'T' block")
            level = stack.pop()
            stack[-1].append(level)
        else:
            raise ValueError(f"{where}: unknown character (use T, R, '(' and ')')")
    if len(stack) != 1:
        raise ValueError(f"structure {structure!r}: {len(stack) - 1} '(' never closed")
    if not stack[0]:
        raise ValueError("structure is empty: give at least one 'T'")
    return stack[0]


def max_depth(items):
    return max([1 + max_depth(it) for it in items if isinstance(it, list)], default=0)


def llama_twin(config):
    """The LLaMA baseline of a SUBLLM or recurrent config: same dims, same blocks, no subsampled levels, and each
    recurrent block 'R' a plain block 'T'."""
    return replace(config, structure=config.structure.replace('(', '').replace(')', '').replace('R', 'T'))

# -----------------------------------------------------------------------------
# LLaMA building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_float.type_as(x) * self.weight


def rope_frequencies(config):
    """(D/2,) the rotation frequency of each pair of a head's channels: theta^(-2i/D). With Llama 3's rope_scaling
    (Hugging Face's rope_type 'llama3': factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    the long wavelengths are stretched by factor, the short ones kept, those between blended smoothly."""
    head_dim = config.n_embd // config.n_head
    freqs = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if config.rope_scaling is None:
        return freqs
    s = config.rope_scaling
    factor, low, high, old_len = (s['factor'], s['low_freq_factor'], s['high_freq_factor'],
                                  s['original_max_position_embeddings'])
    wavelen = 2 * math.pi / freqs
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)  # 0: wavelength past old_len / low, 1: below / high
    return (1 - smooth) * freqs / factor + smooth * freqs


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of each head by the angle of the token's position. x (B, H, T, D); cos, sin (B, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2), broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one block for decoding (gpt-fast style). Each batch row writes at its own
    slots, and a step may touch only some rows: those whose token entered the block's level."""

    def __init__(self, batch_size, max_len, n_kv_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, rows, slots, k, v):
        """Write k, v (b, Hkv, K, D) of cache rows `rows` (b,) at their slots (b, K)."""
        index = (rows[:, None, None], torch.arange(k.size(1), device=k.device)[None, :, None], slots[:, None, :])
        self.k[index], self.v[index] = k.to(self.k.dtype), v.to(self.v.dtype)

    def read(self, rows, length, dtype):
        """The first `length` slots of rows `rows` (a slice): views (b, Hkv, length, D), no copy."""
        return self.k[rows, :, :length].to(dtype), self.v[rows, :, :length].to(dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.wq = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.dropout = config.dropout
        self.kv_cache = None  # set by SubLLM.setup_cache for decoding

    def forward(self, x, cos, sin, cache_ctx=None, q_rows=None, kv_rows=None):
        """q_rows, kv_rows: an EST sub-network's heads (est.py), sliced out of the weights; None: every head."""
        B, T, _ = x.shape
        wq, wk, wv, wo = self.wq.weight, self.wk.weight, self.wv.weight, self.wo.weight
        if q_rows is not None:
            wq, wk, wv, wo = wq[q_rows], wk[kv_rows], wv[kv_rows], wo[:, q_rows]
        q = F.linear(x, wq).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = F.linear(x, wk).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = F.linear(x, wv).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v) if cache_ctx is None else self.attend_cached(q, k, v, cache_ctx)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, C)
        return F.linear(y, wo)

    def attend(self, q, k, v, mask=None, is_causal=True):
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each K/V head among n_head/n_kv_head queries
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=self.dropout if self.training else 0.0)

    def attend_cached(self, q, k, v, cache_ctx):
        """Append k, v to the cache rows of q's rows, and attend over everything those rows cached (Stack.cache_context
        gives the rows, the slots, the mask, and each row's cache length after this chunk)."""
        rows, slots, mask, row_list, ends = cache_ctx
        self.kv_cache.write(rows, slots, k, v)
        if len(row_list) == self.kv_cache.k.size(0):  # every row, in order: one call over views of the caches
            return self.attend(q, *self.kv_cache.read(slice(None), max(ends), q.dtype), mask, is_causal=mask is None)
        # Some rows (those entering a level): each attends over views of its own slots (copying them out cost 3x the
        # attention at batch 64). One query (a decoding step) sees its row's every slot: no mask.
        T = q.size(2)
        return torch.cat([self.attend(q[i:i + 1], *self.kv_cache.read(slice(r, r + 1), end, q.dtype),
                                      None if T == 1 or mask is None else mask[i:i + 1, :, :, :end],
                                      is_causal=T > 1 and mask is None)
                          for i, (r, end) in enumerate(zip(row_list, ends))])


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x, units=None):  # units: an EST sub-network's hidden units (est.py), sliced; None: all
        if units is None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        gate, up, down = self.gate.weight[units], self.up.weight[units], self.down.weight[:, units]
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class Block(nn.Module):
    """Pre-norm LLaMA block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        # The hook of Evolving Subnetwork Training (est.py): skip the block, or run these rows of the weights (None:
        # the dense block). Buffers, so that they follow .to(device) and torch.compile sees them as inputs.
        self.est_skip = False
        self.register_buffer('est_q_rows', None, persistent=False)   # rows of wq (columns of wo): kept heads
        self.register_buffer('est_kv_rows', None, persistent=False)  # rows of wk and wv
        self.register_buffer('est_units', None, persistent=False)    # SwiGLU hidden units (rows of gate and up)

    def forward(self, x, cos, sin, cache_ctx=None):
        if self.est_q_rows is None:  # the dense block
            x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache_ctx))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        # an EST sub-network: fractions p of the heads and units, each branch scaled by 1/p like dropout
        p_heads, p_units = est_fractions(self)
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, None, self.est_q_rows, self.est_kv_rows) / p_heads)
        return x + self.dropout(self.mlp(self.mlp_norm(x), self.est_units) / p_units)


def est_fractions(block):
    """(p_heads, p_units): the fractions of its attention heads and SwiGLU units that a block runs (EST)."""
    if block.est_q_rows is None:
        return 1, 1
    return (block.est_q_rows.numel() / block.attn.wq.weight.size(0),
            block.est_units.numel() / block.mlp.gate.weight.size(0))

# -----------------------------------------------------------------------------
# SUBLLM pieces: Balancer, subsample, upsample, Bypass, Level


# The Balancer's gains. Module constants, not class attributes: torch.compile cannot read an attribute of an
# autograd.Function's class inside its backward (a graph break).
BALANCER_COUNT_GAIN = 10.0  # 'strong': push per unit of error in the positive fraction (0.05 off: half the mean |g|)
BALANCER_SIZE_GAIN = 0.04  # the spec's gain, for keeping mean |score| in [1, 4]


class Balancer(torch.autograd.Function):
    """Identity forward. Backward corrects the score gradient so that (a) the fraction of positive scores tracks
    keep_ratio and (b) the mean |score| stays in [1, 4] (SUBLLM.md §7), with probability `prob` (set_step). 'spec':
    Zipformer's (gain 0.04). 'centred', the default: the spec's, with the task gradient's common mode removed: the
    running cut cancels a shift of every score, and chasing the one the task gradient makes it lag (docs/quality.md).
    'strong' (centred, the count pushed with BALANCER_COUNT_GAIN) let |score| sink below 1, where soft weights damp
    the levels."""

    @staticmethod
    def forward(ctx, scores, keep_ratio, prob, valid=None, mode='spec'):  # valid (B, T): real tokens, or None
        ctx.save_for_backward(scores, prob, valid)
        ctx.keep_ratio, ctx.mode = keep_ratio, mode
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        scores, prob, valid = ctx.saved_tensors
        keep = ctx.keep_ratio
        real = torch.ones_like(scores) if valid is None else valid.float()  # padding is neither counted nor pushed
        n_real = real.sum().clamp(min=1)
        positive = (scores > 0).float() * real
        frac_positive, mean_abs = positive.sum() / n_real, (scores.abs() * real).sum() / n_real
        g = BALANCER_SIZE_GAIN
        if ctx.mode != 'strong':  # Zipformer: linear in the distance outside [keep - 0.05, keep + 0.05], at most g
            lo, hi = keep - 0.05, keep + 0.05  # a band that reaches 0 or 1 has no side there
            too_few = (lo - frac_positive).clamp(min=0) / lo if lo > 0 else 0.0
            too_many = (frac_positive - hi).clamp(min=0) / (1 - hi) if hi < 1 else 0.0
            count_push = g * (too_few - too_many)
        else:
            count_push = ((keep - frac_positive) * BALANCER_COUNT_GAIN).clamp(-1, 1)  # > 0: too few positive scores
        size_push = ((1.0 - mean_abs) * g).clamp(0, g) - ((mean_abs - 4.0) * g / 4.0).clamp(0, g)  # |s| into [1, 4]
        direction = (count_push + size_push * (positive - 0.5)) * real  # (B, T), > 0 means: make this score larger
        reached = (grad != 0).float()  # tokens the task gradient reaches (near the top-k cut)
        n_reached = reached.sum().clamp(min=1)
        grad_size = grad.abs().sum() / n_reached
        if ctx.mode != 'spec':
            grad = grad - grad.sum() / n_reached * reached  # the task gradient, without its common mode
        apply = (torch.rand((), device=grad.device) < prob).float()
        return grad - apply * direction * grad_size, None, None, None, None


class LimitParamValue(torch.autograd.Function):
    """Zipformer's soft clamp: identity forward; backward flips the sign of a gradient that would push the parameter
    further outside [lo, hi], on a random ~60% of steps. The forward always uses the raw value."""

    @staticmethod
    def forward(ctx, param, lo, hi):
        ctx.save_for_backward(param, lo)
        ctx.hi = hi
        return param.view_as(param)

    @staticmethod
    def backward(ctx, grad):
        param, lo = ctx.saved_tensors
        outward = ((param < lo) & (grad > 0)) | ((param > ctx.hi) & (grad < 0))  # descent would step further out
        flip = outward & (torch.rand((), device=grad.device) < 0.6)
        return torch.where(flip, -grad, grad), None, None


class Bypass(nn.Module):
    """out = x + (u - x) * c with a learned per-channel c (init 0.5), softly held in [c_min, 1] while training."""

    def __init__(self, n_embd):
        super().__init__()
        self.c = nn.Parameter(torch.full((n_embd,), 0.5))
        self.register_buffer('c_min', torch.tensor(0.9), persistent=False)  # set_step moves it 0.9 -> 0.2

    def forward(self, x, u):
        c = LimitParamValue.apply(self.c, self.c_min, 1.0) if self.training else self.c
        return x + (u - x) * c


def gather_tokens(x, idx):
    """x (B, T, ...) , idx (B, K) -> (B, K, ...): the rows of x at idx, per batch row."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def subsample_topk(scores, keep_ratio):
    """Training-time selection (SUBLLM.md §4.2): the top k = ceil(keep * T) scores of each row, kept in causal order,
    with soft weights w_i = clamp(s_(i), 0, 1) - clamp(s_(i+k), 0, 1) so a token near the cut weighs little and the
    scorer gets a gradient. Static shapes: k depends only on T. scores (B, T) -> idx (B, k), weights (B, k)."""
    T = scores.size(1)
    k = math.ceil(keep_ratio * T)
    top, order = scores.topk(min(2 * k, T), dim=1)      # (B, min(2k, T)) sorted descending
    clamped = top.clamp(0, 1)
    below = F.pad(clamped[:, k:], (0, 2 * k - clamped.size(1)))  # s_(i+k); missing entries count as 0
    weights = clamped[:, :k] - below                     # (B, k) in descending-score order
    idx, perm = order[:, :k].sort(dim=1)                 # ascending positions: the short sequence stays causal
    return idx, weights.gather(1, perm)


def subsample_threshold(scores, valid, capacity=None):
    """Eval-time selection (SUBLLM.md §4.3): keep the tokens whose score > 0, token by token (causal). Kept tokens go
    first, in order; rows are right-padded to the longest with skipped tokens of weight 0, which causal attention
    keeps out of the kept ones. With a capacity (training with selection='threshold') K is fixed instead (static
    shapes, no host sync) and a positive token after the row's first K takes the skip path (causal overflow).
    Returns idx, weights, kept (B, K), counts (ints per row; None with a capacity), selected (B, T) bool."""
    selected = scores > 0
    if valid is not None:
        selected = selected & valid
    if capacity is None:
        counts = selected.sum(1)
        counts_list = counts.tolist()  # host sync: the short length K is data dependent in eval
        K = max(counts_list)
    else:
        selected = selected & (selected.cumsum(1) <= capacity)  # overflow: past the first `capacity`, skip
        counts, counts_list, K = selected.sum(1), None, capacity
    idx = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :K]  # kept first, then the rest, in order
    kept = torch.arange(K, device=scores.device)[None, :] < counts[:, None]
    weights = gather_tokens(scores, idx).clamp(0, 1) * kept
    return idx, weights, kept, counts_list, selected


def subsample_eval(scores, valid):
    """Eval-time selection of a whole sequence: subsample_threshold's, its short length K the longest row's count.
    One read of a number from the device (K); under torch.compile an unbacked size (capture_scalar_outputs), so that
    one graph serves every K. Returns idx, weights, kept (B, K)."""
    selected = scores > 0 if valid is None else (scores > 0) & valid
    K = selected.sum(1).max().clamp(min=1).item()  # at least 1: where no token enters, one of weight 0 (out = x)
    torch._check(K >= 1)
    torch._check(K <= scores.size(1))
    idx, weights, kept, _, _ = subsample_threshold(scores, valid, capacity=K)  # no row has more than K: no overflow
    return idx, weights, kept


def upsample(x, y, idx, weights):
    """Scatter the short sequence back to full length (SUBLLM.md §5): at a kept position p the result is
    w_p * y_p + (1 - w_p) * x_p, elsewhere x_p. x (B, T, C), y (B, K, C), idx and weights (B, K)."""
    w = weights[..., None].to(y.dtype)
    mixed = w * y + (1 - w) * gather_tokens(x, idx)
    # Not x.scatter(1, idx, mixed): torch 2.13's inductor (CPU) fused the bypass after it into a kernel that read x
    # before the scatter wrote it. Scattering into zeros and selecting gives eager's values and compiles right
    kept = torch.zeros_like(x[..., 0], dtype=torch.bool).scatter(1, idx, True)[..., None]  # (B, T, 1)
    return torch.where(kept, torch.zeros_like(x).scatter(1, idx[..., None].expand_as(y), mixed), x)


class Stack(nn.Module):
    """A sequence of blocks and nested levels that all see the same tokens. Keeps the decode-cache length of its
    tokens, one per batch row (rows keep different numbers of tokens inside levels)."""

    def __init__(self, config, items, depth):
        super().__init__()
        self.layers = nn.ModuleList([Block(config) if it == 'T' else RecurrentBlock(Block(config), config)
                                     if it == 'R' else Level(config, it, depth + 1) for it in items])
        self.cache_lens = None  # list of ints per row while decoding with a cache

    def forward(self, x, pos, rope, valid=None, counts=None, rows=None):
        """x (B, T, C); pos (B or 1, T) original positions; valid (B, T) bool or None (no padding); counts: real
        tokens per row (ints), where the caller synced them; rows: which batch rows of the caches x's rows are
        (ints; None: all), while decoding."""
        cos, sin = rope[0][pos], rope[1][pos]  # (B or 1, T, D/2): angles of the original positions
        cache_ctx = None
        if self.cache_lens is not None:
            rows = list(range(x.size(0))) if rows is None else rows
            cache_ctx = self.cache_context(x.size(1), counts or [x.size(1)] * x.size(0), rows, x.device)
        for layer in self.layers:
            if isinstance(layer, Block):
                if not layer.est_skip:  # EST switches whole blocks off for a step: the residual passes through
                    x = layer(x, cos, sin, cache_ctx)
            elif isinstance(layer, RecurrentBlock):
                x = layer(x, rope)  # window-local positions, its own decoding state
            else:
                x = layer(x, pos, rope, valid, rows)
        return x

    def cache_context(self, K, counts, rows, device):
        """For K new tokens in each of these cache rows: the rows (a tensor), each token's slot after what its row
        cached, the mask over max(ends) slots (a key slot is visible to a query at or after it; None: causal), the
        rows (ints) and each row's slots to attend over, its cache length plus K (ints)."""
        lens = [self.cache_lens[r] for r in rows]
        rows_lens = torch.tensor([rows, lens], device=device)  # one host-to-device copy per stack and step
        slots = rows_lens[1][:, None] + torch.arange(K, device=device)  # (B, K); padding writes past the end, unused
        mask = None
        if max(lens) > 0:
            mask = torch.arange(max(lens) + K, device=device)[None, None, None, :] <= slots[:, None, :, None]
        for r, c in zip(rows, counts):
            self.cache_lens[r] += c
        return rows_lens[0], slots, mask, rows, [n + K for n in lens]


class Level(nn.Module):
    """One subsampled level: score -> Balancer -> subsample -> inner Stack -> upsample -> Bypass."""

    def __init__(self, config, items, depth):
        super().__init__()
        self.depth, self.keep_ratio, self.config = depth, config.keep_ratio_at(depth), config
        self.scorer = nn.Linear(config.n_embd, 1, bias=False)
        self.register_buffer('balancer_prob', torch.tensor(1.0), persistent=False)  # set_step: 1.0 -> 0.25
        self.register_buffer('score_offset', torch.tensor(0.0))  # running top-k cut, saved: inference needs it
        self.inner = Stack(config, items, depth)
        self.bypass = Bypass(config.n_embd)
        # Counters for the logs (a tensor: torch.compile does not recompile as it grows). Eval: tokens offered, kept.
        # Training: offered, selected as eval's `score > 0` would, positive but skipped (below the cut, or overflow).
        self.register_buffer('stats', torch.zeros(5, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def track_cut(self, scores, valid=None, momentum=0.05):
        """Move score_offset towards the top-k cut, like BatchNorm's running mean, so that eval's `score > 0` keeps
        about keep_ratio (with the Balancer alone it swung between 0.46 and 0.96). It moves after the selection, the
        same for every token: top-k is unchanged and nothing leaks. 'batch': the score between the ceil(keep * n)
        largest of the batch's n real tokens and the rest, the one threshold that keeps keep_ratio of them. 'rows':
        the mean of each row's cut, which keeps less once rows differ in score level (docs/quality.md)."""
        B, T = scores.shape
        if self.config.running_cut == 'batch':
            scores, valid = scores.reshape(1, -1), None if valid is None else valid.reshape(1, -1)
            B, T = scores.shape
        if valid is None:  # T real tokens in every row: k is top-k's own math.ceil (float32 rounds 0.6 * 25 to 16)
            n = torch.full((B,), T, device=scores.device)
            k = torch.full((B,), math.ceil(self.keep_ratio * T), device=scores.device)
        else:  # (B,) real tokens; float64 like math.ceil, but MPS has none
            n = valid.sum(1)
            k = torch.ceil(self.keep_ratio * n.to(torch.float32 if n.device.type == 'mps' else torch.float64)).long()
        ranked = scores if valid is None else scores.masked_fill(~valid, -math.inf)
        ranked = ranked.sort(dim=1, descending=True).values  # (B, T)
        above = ranked.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)  # the k-th largest, kept
        below = ranked.gather(1, k.clamp(max=T - 1)[:, None]).squeeze(1)   # the (k+1)-th, skipped
        rows = (k > 0) & (k < n)  # rows with a cut
        cut = torch.where(rows, (above + below) / 2, 0.0)
        self.score_offset.add_(momentum * cut.sum() / rows.sum().clamp(min=1))

    def training_length(self, T):
        """The short sequence's length in training, for T tokens in (static). Top-k: ceil(keep * T). Threshold: a
        capacity of keep * T * (1 + slack), added at depth 1 only (an inner level's input carries it already)."""
        if self.config.selection == 'topk':
            return math.ceil(self.keep_ratio * T)
        slack = self.config.capacity_slack if self.depth == 1 else 0.0
        return min(T, math.ceil(self.keep_ratio * T * (1 + slack)))

    def score(self, x):
        """(B, T): one score per token, centred by the running offset on the top-k cut, so that `score > 0` keeps
        ~keep_ratio. Scoring rms_norm(x) changes no sign, only the scale: scores start near |s| ~ 1 whatever the
        residual stream's size, where the soft weights and the Balancer work."""
        scores = self.scorer(F.rms_norm(x, (x.size(-1),)) if self.config.scorer_norm else x).squeeze(-1).float()
        return scores - self.score_offset

    def forward(self, x, pos, rope, valid=None, rows=None):
        cfg = self.config
        scores = self.score(x)  # (B, T)
        if self.training:
            if cfg.running_cut != 'off':
                self.track_cut(scores, valid)
            scores = Balancer.apply(scores, self.keep_ratio, self.balancer_prob, valid, cfg.balancer)
            if cfg.selection == 'topk':
                idx, weights = subsample_topk(scores, self.keep_ratio)  # (B, k), k = ceil(keep * T)
                kept, counts = None, None
                selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)
            else:  # threshold: `score > 0` as in decoding (causal), in a fixed capacity
                idx, weights, kept, counts, selected = subsample_threshold(scores, valid, self.training_length(x.size(1)))
            real = torch.ones_like(selected) if valid is None else valid
            positive = (scores > 0) & real
            self.stats[2:] += torch.stack([real.sum(), ((selected == positive) & real).sum(), (positive & ~selected).sum()])
        else:  # eval: `score > 0`, token by token
            if self.inner.cache_lens is None:  # a whole sequence: one graph under torch.compile whatever K is
                (idx, weights, kept), counts = subsample_eval(scores, valid), None
            else:  # decoding with the cache: which rows enter decides the code path, so the counts come to the host
                idx, weights, kept, counts, _ = subsample_threshold(scores, valid)
            self.stats[0] += x.size(0) * x.size(1) if valid is None else valid.sum()
            self.stats[1] += kept.sum()
            entering = list(range(x.size(0))) if counts is None else [i for i, c in enumerate(counts) if c > 0]
            if len(entering) < x.size(0):  # a row that no token enters takes the skip path (out = x): run the
                if not entering:           # inner blocks for the others only (decoding at batch > 1)
                    return x
                sub = torch.argsort((~kept[:, 0]).to(torch.int8), stable=True)[:len(entering)]  # (b,) no host sync
                K = max(counts[i] for i in entering)
                rows = [i if rows is None else rows[i] for i in entering]
                pos = pos if pos.size(0) == 1 else pos[sub]
                part = self.run_inner(x[sub], pos, rope, idx[sub, :K], weights[sub, :K], kept[sub, :K],
                                      [counts[i] for i in entering], rows)
                return x.index_copy(0, sub, part)
        return self.run_inner(x, pos, rope, idx, weights, kept, counts, rows)

    def run_inner(self, x, pos, rope, idx, weights, kept, counts, rows):
        """The level's tokens idx (B, k) through the inner blocks, scattered back and mixed by the bypass."""
        if counts is not None and min(counts) == x.size(1):  # every token enters (decoding): idx is 0, 1, ..., so
            y = self.inner(x, pos, rope, kept, counts, rows)  # no gather, and upsample without its scatter
            w = weights[..., None].to(y.dtype)
            return self.bypass(x, w * y + (1 - w) * x)
        x_short = gather_tokens(x, idx)                                # (B, k, C)
        pos_short = gather_tokens(pos.expand(x.size(0), -1), idx)     # (B, k): original positions, for RoPE
        y = self.inner(x_short, pos_short, rope, kept, counts, rows)  # (B, k, C)
        return self.bypass(x, upsample(x, y, idx, weights))

# -----------------------------------------------------------------------------
# The model


class SubLLM(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        self.stack = Stack(config, parse_structure(config.structure), depth=0)
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.tok_embeddings.weight = self.lm_head.weight
        # real cos/sin tables (not complex): they survive NCCL broadcast and torch.compile
        freqs = rope_frequencies(config)
        rope_len = max(config.block_size, 2 * config.rec_window)  # a recurrent step spans 2 * rec_window positions
        angles = torch.outer(torch.arange(rope_len).float(), freqs)  # (rope_len, D/2)
        self.register_buffer('rope_cos', angles.cos(), persistent=False)
        self.register_buffer('rope_sin', angles.sin(), persistent=False)
        self.apply(self._init_weights)
        for level in self.levels():  # unit-variance scores at init (the scorer sees RMS-normalised tokens)
            torch.nn.init.normal_(level.scorer.weight, mean=0.0, std=config.n_embd ** -0.5)
        n_layer = len(self.blocks())
        for name, p in self.named_parameters():  # GPT-2 scaled init of the projections into the residual stream
            if name.endswith('wo.weight') or name.endswith('down.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def blocks(self):
        return [m for m in self.modules() if isinstance(m, Block)]

    def levels(self):
        return [m for m in self.modules() if isinstance(m, Level)]

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are one parameter, counted once

    def describe(self):
        """What this model is, in one line: SUBLLM (its levels), recurrent, or the LLaMA baseline."""
        c, levels = self.config, self.levels()
        if levels:
            return (f"SUBLLM, structure {c.structure}, keep ratio per level (depth): "
                    + ', '.join(f"{lv.keep_ratio:g} (d{lv.depth})" for lv in levels))
        if 'R' in c.structure:
            return (f"recurrent, structure {c.structure}, window {c.rec_window}, alpha {c.rec_alpha:g}"
                    + (" (learned)" if c.rec_learn_alpha else " (forget)" if c.rec_alpha == 0 else ""))
        return f"LLaMA baseline, structure {c.structure} (no subsampled levels)"

    def set_step(self, step, max_steps=None):
        """Advance the training schedules: bypass c_min 0.9 -> 0.2, balancer probability 1.0 -> 0.25, linearly.
        Their lengths are for a ~100k-step run; a run of max_steps < 100k shrinks them in proportion."""
        scale = 1.0 if max_steps is None else min(1.0, max_steps / 100_000)
        bypass_done = min(1.0, step / max(1.0, self.config.bypass_schedule_steps * scale))
        balancer_done = min(1.0, step / max(1.0, self.config.balancer_schedule_steps * scale))
        for level in self.levels():
            level.bypass.c_min.fill_(0.9 - 0.7 * bypass_done)
            level.balancer_prob.fill_(1.0 - 0.75 * balancer_done)

    def forward(self, idx, targets=None):
        """idx (B, T) token ids -> (logits, loss). With targets: logits at every position and the mean
        cross-entropy; without: logits of the last position only. After setup_cache, idx is the next chunk of
        the sequence and is appended to the caches (eval mode)."""
        B, T = idx.shape
        start = 0 if self.stack.cache_lens is None else self.stack.cache_lens[0]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)[None]  # (1, T)
        x = self.dropout(self.tok_embeddings(idx))  # (B, T, C)
        x = self.stack(x, pos, (self.rope_cos, self.rope_sin))
        x = self.norm(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None  # only the last position is needed to sample
        return logits, loss

    # -- optimizer ----------------------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; matrices are decayed, norms and bypass gates are not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    # -- decoding ----------------------------------------------------------------

    def setup_cache(self, batch_size, max_len):
        """Allocate a KV cache in every block (None frees them). Each level's blocks hold only its tokens.
        Under autocast the cache takes the autocast dtype (bf16 keys and values: half the memory of fp32)."""
        param = self.lm_head.weight
        device_type = param.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else param.dtype
        for stack in [m for m in self.modules() if isinstance(m, Stack)]:
            stack.cache_lens = None if batch_size is None else [0] * batch_size
            for layer in stack.layers:
                if isinstance(layer, Block):
                    attn = layer.attn
                    attn.kv_cache = None if batch_size is None else KVCache(
                        batch_size, max_len, attn.n_kv_head, attn.head_dim, dtype, param.device)
                elif isinstance(layer, RecurrentBlock):  # no KV cache: it carries its last window state instead
                    layer.decoding, layer.state, layer.pending = batch_size is not None, None, None

    def reset_level_stats(self):
        for level in self.levels():
            level.stats.zero_()

    def level_stats(self):
        """Per level, in eval mode since the last reset: (depth, tokens offered, tokens kept)."""
        return [(level.depth, *level.stats[:2].tolist()) for level in self.levels()]

    @torch.no_grad()
    def calibrate_cuts(self, batches):
        """Set each level's running cut, depth by depth, to the cut that keeps keep_ratio of the tokens reaching it
        in eval mode on `batches` (token ids (B, T), training text), as BatchNorm's statistics are re-estimated
        after training. The running cut follows training's top-k; an inner level's eval-mode input differs from it
        (level 2 kept 0.56 for keep 0.64, docs/quality.md). train.py calls this at the end of training."""
        was_training = self.training
        self.eval()
        for depth in sorted({level.depth for level in self.levels()}):
            scores = {level: [] for level in self.levels() if level.depth == depth}
            def record(level, args):  # args: x (B, T, C), pos, rope, valid (B, T) or None, rows
                s, valid = level.score(args[0]), args[3]
                scores[level].append(s.flatten() if valid is None else s[valid])
            hooks = [level.register_forward_pre_hook(record) for level in scores]
            for idx in batches:
                self(idx)
            for hook in hooks:
                hook.remove()
            for level, s in scores.items():  # the cut of every token offered, as one row: momentum 1 sets it
                level.track_cut(torch.cat(s)[None], momentum=1.0)
        self.train(was_training)

    def selection_stats(self):
        """Per level, in training since the last reset: (depth, tokens offered, tokens whose selection agrees with
        eval's `score > 0`, positive tokens the training selection skipped)."""
        return [(level.depth, *level.stats[2:].tolist()) for level in self.levels()]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True):
        """Sample max_new_tokens after idx (B, T), in eval mode. With use_cache, the prompt fills every level's
        KV cache and each new token runs only the levels its scores let it into; use_cache=False recomputes the
        full eval forward every step (the reference)."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} tokens is "
                             f"longer than block_size={self.config.block_size}: shorten one of them")
        was_training = self.training
        self.eval()
        if use_cache:
            self.setup_cache(B, T + max_new_tokens)
        try:
            logits, _ = self(idx)  # with a cache: the prefill
            for i in range(max_new_tokens):
                logits = logits[:, -1, :] / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float('Inf')
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
                idx = torch.cat((idx, idx_next), dim=1)
                if i < max_new_tokens - 1:
                    logits, _ = self(idx_next if use_cache else idx)
        finally:
            if use_cache:
                self.setup_cache(None, None)
            self.train(was_training)
        return idx

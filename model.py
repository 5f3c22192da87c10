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
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F

from recurrent import RecurrentBlock  # structure character 'R': one block applied over windows of tokens

# torch.compile: a number read from a tensor (.item(): the eval forward's short length, subsample_eval) stays in the
# graph as a size unknown until run time, instead of ending the graph there and recompiling for each new value. Set
# through dynamo's environment variable where dynamo is not imported yet: importing it costs seconds, in every process
if 'torch._dynamo' in sys.modules:
    torch._dynamo.config.capture_scalar_outputs = True
else:
    os.environ['TORCHDYNAMO_CAPTURE_SCALAR_OUTPUTS'] = '1'


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
                                    # 'rows', or 'off' (Level.track_cut)
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
        self.kv_cache = None  # a generate.KVCache while decoding

    def forward(self, x, cos, sin, cache=None):
        """cache: while decoding, a generate.CacheContext: it writes k, v into self.kv_cache and attends there."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v) if cache is None else cache.attend(self, q, k, v)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)

    def attend(self, q, k, v, mask=None):
        """Causal attention, or under a mask. Grouped-query attention shares each K/V head among n_head/n_kv_head
        query heads without copying it (enable_gqa)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              dropout_p=self.dropout if self.training else 0.0,
                                              enable_gqa=self.n_kv_head != self.n_head)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm LLaMA block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)
        # Evolving Subnetwork Training (est.py) skips the block in a step, or runs part of its weights
        self.est_skip, self.est_forward = False, None

    def forward(self, x, cos, sin, cache=None):
        if self.est_forward is not None:
            return self.est_forward(self, x, cos, sin)
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


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
    running cut cancels a shift of every score, and chasing the one the task gradient makes it lag. 'strong':
    centred, the count pushed with BALANCER_COUNT_GAIN (docs/quality.md compares the three)."""

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



def gather_tokens(x, index):
    """x (B, T, ...) , index (B, K) -> (B, K, ...): the rows of x at index, per batch row."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


def subsample_topk(scores, keep_ratio):
    """Training-time selection (SUBLLM.md §4.2): the top k = ceil(keep * T) scores of each row, kept in causal order,
    with soft weights w_i = clamp(s_(i), 0, 1) - clamp(s_(i+k), 0, 1) so a token near the cut weighs little and the
    scorer gets a gradient. Static shapes: k depends only on T. scores (B, T) -> index (B, k), weights (B, k)."""
    T = scores.size(1)
    k = math.ceil(keep_ratio * T)
    top, order = scores.topk(min(2 * k, T), dim=1)      # (B, min(2k, T)) sorted descending
    clamped = top.clamp(0, 1)
    below = F.pad(clamped[:, k:], (0, 2 * k - clamped.size(1)))  # s_(i+k); missing entries count as 0
    weights = clamped[:, :k] - below                     # (B, k) in descending-score order
    index, perm = order[:, :k].sort(dim=1)               # ascending positions: the short sequence stays causal
    return index, weights.gather(1, perm)


def subsample_threshold(scores, valid, capacity):
    """Eval-time selection (SUBLLM.md §4.3): keep the tokens whose score > 0, token by token (causal), in a short
    sequence of `capacity` slots: the kept tokens first, in order, then skipped tokens of weight 0 as padding, which
    causal attention keeps out of the kept ones. A positive token after the row's first `capacity` takes the skip
    path (causal overflow: training with selection='threshold' has a fixed capacity, static shapes).
    scores, valid (B, T) -> index, weights, inner_valid (B, K): the slots that hold a kept token; selected (B, T)."""
    selected = scores > 0 if valid is None else (scores > 0) & valid
    selected = selected & (selected.cumsum(1) <= capacity)
    index = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :capacity]  # kept first, in order
    inner_valid = torch.arange(capacity, device=scores.device)[None, :] < selected.sum(1)[:, None]
    weights = gather_tokens(scores, index).clamp(0, 1) * inner_valid
    return index, weights, inner_valid, selected


def subsample_eval(scores, valid):
    """Eval-time selection of a whole sequence: subsample_threshold's, its short length K the longest row's count.
    One read of a number from the device (K); under torch.compile an unbacked size (capture_scalar_outputs), so that
    one graph serves every K. Returns index, weights, inner_valid (B, K)."""
    selected = scores > 0 if valid is None else (scores > 0) & valid
    K = selected.sum(1).max().clamp(min=1).item()  # at least 1: where no token enters, one of weight 0 (out = x)
    torch._check(K >= 1)
    torch._check(K <= scores.size(1))
    return subsample_threshold(scores, valid, K)[:3]  # no row has more than K: no overflow


def upsample(x, y, index, weights):
    """Scatter the short sequence back to full length (SUBLLM.md §5): at a kept position p the result is
    w_p * y_p + (1 - w_p) * x_p, elsewhere x_p. x (B, T, C), y (B, K, C), index and weights (B, K)."""
    w = weights[..., None].to(y.dtype)
    mixed = w * y + (1 - w) * gather_tokens(x, index)
    # scattered into zeros, then selected: x.scatter(1, ...) met an inductor bug (docs/bench_cpu.md)
    kept = torch.zeros_like(x[..., 0], dtype=torch.bool).scatter(1, index, True)[..., None]  # (B, T, 1)
    return torch.where(kept, torch.zeros_like(x).scatter(1, index[..., None].expand_as(y), mixed), x)


class Stack(nn.Module):
    """A sequence of blocks and nested levels that all see the same tokens."""

    def __init__(self, config, items, depth):
        super().__init__()
        self.layers = nn.ModuleList([Block(config) if it == 'T' else RecurrentBlock(Block(config), config)
                                     if it == 'R' else Level(config, it, depth + 1) for it in items])

    def forward(self, x, pos, rope, valid=None):
        """x (B, T, C); pos (B or 1, T) original positions; valid (B, T) bool or None (no padding)."""
        cos, sin = rope[0][pos], rope[1][pos]  # (B or 1, T, D/2): angles of the original positions
        for layer in self.layers:
            if isinstance(layer, Level):
                x = layer(x, pos, rope, valid)
            elif isinstance(layer, RecurrentBlock):
                x = layer(x, rope)  # window-local positions, its own decoding state
            elif not layer.est_skip:  # EST switches whole blocks off for a step: the residual passes through
                x = layer(x, cos, sin)
        return x


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
        about keep_ratio (the Balancer alone does not hold it: docs/quality.md). It moves after the selection, the
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
        has_cut = (k > 0) & (k < n)  # rows that keep some tokens and skip some
        cut = torch.where(has_cut, (above + below) / 2, 0.0)
        self.score_offset.add_(momentum * cut.sum() / has_cut.sum().clamp(min=1))

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

    def forward(self, x, pos, rope, valid=None):
        cfg = self.config
        scores = self.score(x)  # (B, T)
        if self.training:
            if cfg.running_cut != 'off':
                self.track_cut(scores, valid)
            scores = Balancer.apply(scores, self.keep_ratio, self.balancer_prob, valid, cfg.balancer)
            if cfg.selection == 'topk':
                index, weights = subsample_topk(scores, self.keep_ratio)  # (B, k), k = ceil(keep * T)
                inner_valid = None
                selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True)
            else:  # threshold: `score > 0` as in decoding (causal), in a fixed capacity
                index, weights, inner_valid, selected = subsample_threshold(scores, valid,
                                                                            self.training_length(x.size(1)))
            real = torch.ones_like(selected) if valid is None else valid
            positive = (scores > 0) & real
            agree, missed = ((selected == positive) & real).sum(), (positive & ~selected).sum()
            self.stats[2:] += torch.stack([real.sum(), agree, missed])
        else:  # eval: `score > 0`, token by token
            index, weights, inner_valid = subsample_eval(scores, valid)
            self.stats[0] += x.size(0) * x.size(1) if valid is None else valid.sum()
            self.stats[1] += inner_valid.sum()
        x_short = gather_tokens(x, index)                              # (B, k, C)
        pos_short = gather_tokens(pos.expand(x.size(0), -1), index)    # (B, k): original positions, for RoPE
        y = self.inner(x_short, pos_short, rope, inner_valid)          # (B, k, C)
        return self.bypass(x, upsample(x, y, index, weights))

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
        cross-entropy; without: logits of the last position only. (Decoding with KV caches: generate.py.)"""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        x = self.dropout(self.tok_embeddings(idx))  # (B, T, C)
        x = self.stack(x, torch.arange(T, device=idx.device)[None], (self.rope_cos, self.rope_sin))
        return self.head(x, targets)

    def head(self, x, targets=None):
        x = self.norm(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, -1:, :]), None  # only the last position is needed to sample
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; matrices are decayed, norms and bypass gates are not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    # -- the levels' counters and cuts --------------------------------------------

    def reset_level_stats(self):
        for level in self.levels():
            level.stats.zero_()

    def level_stats(self):
        """Per level, in eval mode since the last reset: (depth, tokens offered, tokens kept)."""
        return [(level.depth, *level.stats[:2].tolist()) for level in self.levels()]

    def selection_stats(self):
        """Per level, in training since the last reset: (depth, tokens offered, tokens whose selection agrees with
        eval's `score > 0`, positive tokens the training selection skipped)."""
        return [(level.depth, *level.stats[2:].tolist()) for level in self.levels()]

    @torch.no_grad()
    def calibrate_cuts(self, batches):
        """Set each level's running cut, depth by depth, to the cut that keeps keep_ratio of the tokens reaching it
        in eval mode on `batches` (token ids (B, T), training text), as BatchNorm's statistics are re-estimated
        after training: the running cut follows training's top-k, and an inner level's eval-mode input differs
        from training's (docs/quality.md). train.py calls this at the end of training."""
        was_training = self.training
        self.eval()
        for depth in sorted({level.depth for level in self.levels()}):
            scores = {level: [] for level in self.levels() if level.depth == depth}
            def record(level, args):  # args: x (B, T, C), pos, rope, valid (B, T) or None
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

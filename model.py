"""
SUBLLM: a LLaMA-style decoder whose middle blocks run on a learned subset of tokens.
(SUBLLM, arXiv 2406.06571; Bypass and Balancer from Zipformer.) Reference: SUBLLM.md.

A model is described by a structure string: `T` is a transformer block, `(` opens a subsampled level and `)`
closes it. "TT(TT(TT)TT)TT" has two nested levels; "TTTTTTTTTT" is the plain LLaMA baseline, the same class.
One level = score every token, keep a subset (subsample), run the inner blocks on the short sequence, scatter the
result back to full length (upsample) and mix it with the skipped path through a learned per-channel gate (bypass).
`R` is a recurrent block (Kausik, arXiv 2402.14746; see RecurrentBlock): one block applied over windows of
rec_window tokens, at the top level only. "R" alone is a 1-block recurrent model, "TRT" puts one between blocks.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.nn import functional as F


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
    balancer: str = 'strong'        # 'strong': count gain 10, task gradient's common mode removed; 'spec': gain 0.04
    running_cut: bool = True        # subtract a running average of the top-k cut from the scores (Level.track_cut)
    rope_theta: float = 10000.0
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
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"head size n_embd/n_head={self.n_embd // self.n_head} must be even for RoPE")
        depth = max_depth(parse_structure(self.structure))
        ratios = self.keep_ratio if isinstance(self.keep_ratio, tuple) else (self.keep_ratio,) * depth
        if len(ratios) < depth:
            raise ValueError(f"keep_ratio {self.keep_ratio} has {len(ratios)} values but the structure has "
                             f"{depth} nested levels: give one float, or one per level")
        for r in ratios:
            if not 0.0 < r <= 1.0:
                raise ValueError(f"keep_ratio {r} must be in (0, 1]")
        if self.selection not in ('topk', 'threshold'):
            raise ValueError(f"selection must be 'topk' or 'threshold', got {self.selection!r}")
        if self.balancer not in ('strong', 'spec'):
            raise ValueError(f"balancer must be 'strong' or 'spec', got {self.balancer!r}")
        if self.capacity_slack < 0:
            raise ValueError(f"capacity_slack must be >= 0, got {self.capacity_slack}")
        if self.rec_window < 1:
            raise ValueError(f"rec_window={self.rec_window} must be at least 1")
        if not 0.0 <= self.rec_alpha <= 1.0:
            raise ValueError(f"rec_alpha={self.rec_alpha} must be in [0, 1] (0 is the forget variant)")

    def keep_ratio_at(self, depth):
        """Keep ratio of a level at nesting depth 1, 2, ..."""
        return self.keep_ratio[depth - 1] if isinstance(self.keep_ratio, tuple) else self.keep_ratio


def parse_structure(structure):
    """'TT(T(T)T)T' -> ['T', 'T', ['T', ['T'], 'T'], 'T']: a list of blocks ('T', 'R') and levels (nested lists)."""
    stack = [[]]
    for i, ch in enumerate(structure):
        if ch == 'T':
            stack[-1].append('T')
        elif ch == 'R':
            if len(stack) > 1:
                raise ValueError(f"structure {structure!r}: 'R' at position {i} is inside a subsampled level; a "
                                 f"recurrent block works only at the top level (outside all parentheses)")
            stack[-1].append('R')
        elif ch == '(':
            stack.append([])
        elif ch == ')':
            if len(stack) == 1:
                raise ValueError(f"structure {structure!r}: ')' at position {i} closes no level")
            level = stack.pop()
            if 'T' not in level:
                raise ValueError(f"structure {structure!r}: the level closed at position {i} has no 'T' block")
            stack[-1].append(level)
        else:
            raise ValueError(f"structure {structure!r}: unknown character {ch!r} at position {i} "
                             f"(use T, R, '(' and ')')")
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


def apply_rope(x, cos, sin):
    """Rotate pairs (x1, x2) of each head by the angle of the token's position. x (B, H, T, D); cos, sin (B, T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2), broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys and values of one block for decoding (gpt-fast style); each row writes at its own slots."""

    def __init__(self, batch_size, max_len, n_kv_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v, length):
        """slots (B, K): where each new token goes; k, v (B, Hkv, K, D). Returns the first `length` slots."""
        index = slots[:, None, :, None].expand_as(k)
        self.k.scatter_(2, index, k.to(self.k.dtype))
        self.v.scatter_(2, index, v.to(self.v.dtype))
        return self.k[:, :, :length].to(k.dtype), self.v[:, :, :length].to(v.dtype)


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
        """q_rows, kv_rows: an EST sub-network's heads, as rows of wq (columns of wo) and of wk/wv. They are sliced
        out of the weights, so the matmuls really shrink (masking would save nothing); None: every head."""
        B, T, _ = x.shape
        wq, wk, wv, wo = self.wq.weight, self.wk.weight, self.wv.weight, self.wo.weight
        if q_rows is not None:
            wq, wk, wv, wo = wq[q_rows], wk[kv_rows], wv[kv_rows], wo[:, q_rows]
        q = F.linear(x, wq).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = F.linear(x, wk).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = F.linear(x, wv).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, is_causal = None, True
        if cache_ctx is not None:
            slots, length, mask = cache_ctx
            k, v = self.kv_cache.update(slots, k, v, length)  # (B, Hkv, length, D): everything this level cached
            is_causal = mask is None  # first chunk into an empty cache is plain causal attention
        if self.n_kv_head != self.n_head:  # grouped-query attention: share each K/V head among n_head/n_kv_head queries
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, C)
        return F.linear(y, wo)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.up = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)

    def forward(self, x, units=None):
        """units: an EST sub-network's hidden units (rows of gate and up, columns of down), sliced; None: all."""
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
        # EST sub-network (SubLLM.set_subnetwork): skip the block, or run only these rows of the weights.
        # None = the dense block. Buffers, so that they follow .to(device) and torch.compile sees them as inputs.
        self.est_skip = False
        self.register_buffer('est_q_rows', None, persistent=False)   # rows of wq (columns of wo): kept heads
        self.register_buffer('est_kv_rows', None, persistent=False)  # rows of wk and wv
        self.register_buffer('est_units', None, persistent=False)    # SwiGLU hidden units (rows of gate and up)

    def forward(self, x, cos, sin, cache_ctx=None):
        if self.est_q_rows is None:  # the dense block
            x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache_ctx))
            return x + self.dropout(self.mlp(self.mlp_norm(x)))
        # an EST sub-network: some heads and units, each branch scaled by 1/p like dropout, so that its output keeps
        # the dense block's size in expectation; unsampled rows get a zero gradient
        if cache_ctx is not None:
            raise ValueError("a sub-network is for training: call set_subnetwork(None) before decoding with a cache")
        p_heads, p_units = self.est_fractions()
        attn = self.attn(self.attn_norm(x), cos, sin, None, self.est_q_rows, self.est_kv_rows)
        x = x + self.dropout(attn * (1 / p_heads))
        return x + self.dropout(self.mlp(self.mlp_norm(x), self.est_units) * (1 / p_units))

    def est_fractions(self):
        """(fraction of the attention heads, fraction of the SwiGLU units) the block runs: p_heads and p_units."""
        if self.est_q_rows is None:
            return 1, 1
        heads = self.est_q_rows.numel() / self.attn.wq.weight.size(0)
        return heads, self.est_units.numel() / self.mlp.gate.weight.size(0)

# -----------------------------------------------------------------------------
# Recurrent block (Kausik, "Scaling Efficient LLMs", arXiv 2402.14746): structure character 'R'


class RecurrentBlock(nn.Module):
    """One Block T applied recurrently over windows of w = rec_window tokens, so that its cost grows linearly with
    the sequence length. With X_0, X_1, ... the windows of the input (the last one may be shorter):

        H_0 = T(X_0)                                              the first window alone
        [Y_{k-1}; H_k] = T([H_{k-1} + a_{k-1}; X_k + a_{k-1}])    causal attention over the 2w positions
        Y_last = T(H_last + a_last)                               the last window's readout
        a_0 = 0, a_k = alpha * Y_{k-1}                            alpha = 0: forget (the default); > 0: accumulate

    The output at the tokens of window k is Y_k; the state carried from window to window is H_k (w vectors).
    Because attention is causal, the first half of a step's output depends on the state half only, so it *is* the
    readout of the previous window, Y_{k-1} = T(H_{k-1} + a_{k-1}): every step returns one readout, and only the last
    window needs a call of its own. In all, each token goes through T twice (once as input, once as state), 2T token
    passes for T tokens. (The batched readout suggested for alpha = 0, a loop for the H_k only and then all
    Y_k = T(H_k) in one call of shape (B * n, w, C), would compute every readout twice with a plain causal block. It
    pays only with a step that skips the state half's queries and MLP, and even then costs more FLOPs in all, as the
    readout recomputes the state half's keys and values; what it buys is a shorter sequential chain.)
    Two choices differ from the author's code: a_0 = 0 (the code adds alpha * X_0 at the first step), and the last
    window's readout gets its a_last like every other (the code leaves it out), so that a window's output does not
    depend on whether more windows follow, which cached decoding needs.

    RoPE positions are local to the window (the 2026 code adds absolute position embeddings; the June 2025 note's
    variant without them was slightly better): the state half at 0..w-1, the new tokens at w..2w-1 (the first window
    too, as after an empty state), the readout at 0..w-1. No absolute position enters: the model sees at most 2w
    positions, which is why it runs on any length. A short last window needs no padding: causality makes the result
    the same as for a padded one. Gradients flow through the whole chain of windows (backpropagation through time).

    Decoding (setup_cache) keeps, per batch row, the state (H_k, a_k) of the last complete window and the inputs of
    the window still open; a new token reruns that window from the state: T on at most 2w positions, then its readout
    on at most w. That is O(w) per token whatever the length of the prefix; the prompt goes through the same code."""

    def __init__(self, config):
        super().__init__()
        self.block = Block(config)
        self.window = config.rec_window
        self.accumulate = config.rec_alpha > 0 or config.rec_learn_alpha
        self.alpha = nn.Parameter(torch.tensor(config.rec_alpha)) if config.rec_learn_alpha else config.rec_alpha
        self.decoding, self.state, self.pending = False, None, None  # set by SubLLM.setup_cache

    def forward(self, x, rope):
        """x (B, T, C) -> (B, T, C); rope: the (cos, sin) tables. While decoding, x continues the sequence."""
        if not self.decoding:
            return self.recur(x, None, rope)[0]
        inputs = x if self.pending is None else torch.cat([self.pending, x], dim=1)  # (B, j + T, C): the open window
        y, self.state, n_done = self.recur(inputs, self.state, rope)
        self.pending = inputs[:, n_done:]  # inputs of the window still open (fewer than w)
        return y[:, -x.size(1):]

    def recur(self, x, state, rope):
        """The recurrence over x (B, L, C), after the window whose state is `state` ((H, a), or None at the start).
        Returns the outputs at x's positions (B, L, C), the state after x's last complete window, and the number of
        x's tokens in complete windows."""
        w, L = self.window, x.size(1)
        cos, sin = rope[0][None, :2 * w], rope[1][None, :2 * w]  # (1, 2w, D/2): window-local positions
        alpha = self.alpha.clamp(0.0, 1.0) if isinstance(self.alpha, nn.Parameter) else self.alpha
        outputs, done_state, n_done = [], state, 0
        for x_k in x.split(w, dim=1):  # the method's sequential part: one step per window (L/w), not per token
            n = x_k.size(1)  # w, or fewer for the last window
            if state is None:
                h, a = self.block(x_k, cos[:, w:w + n], sin[:, w:w + n]), None  # H_0; a_0 = 0
            else:
                h_prev, a = state
                inp = torch.cat([h_prev, x_k], dim=1)  # (B, w + n, C): [state; new tokens]
                if a is not None:  # accumulate: alpha * the previous readout, added to both halves
                    inp = inp + torch.cat([a, a[:, :n]], dim=1)
                out = self.block(inp, cos[:, :w + n], sin[:, :w + n])  # causal over the w + n positions
                outputs.append(out[:, :w])  # Y of the previous window
                h, a = out[:, w:], alpha * out[:, :w] if self.accumulate else None
            state = (h, a)
            if n == w:
                done_state, n_done = state, n_done + w
        h, a = state
        n = h.size(1)
        outputs.append(self.block(h if a is None else h + a[:, :n], cos[:, :n], sin[:, :n]))  # the last readout
        # a run that continues from a state first re-emits that state window's readout: keep x's positions only
        return torch.cat(outputs, dim=1)[:, -L:], done_state, n_done


# -----------------------------------------------------------------------------
# SUBLLM pieces: Balancer, subsample, upsample, Bypass, Level


class Balancer(torch.autograd.Function):
    """Identity forward. Backward corrects the score gradient so that during training (a) the fraction of positive
    scores tracks keep_ratio and (b) the mean |score| stays in [1, 4] (SUBLLM.md §7). That is what makes eval-time
    `score > 0` keep about as many tokens as train-time top-k. Applied with probability `prob` (set_step's schedule).

    Two measured deviations from the spec's "gain about 0.04" (toy runs of test_model.py's keep-fraction test,
    without Level's running offset: with 0.04 the positive fraction ends at 0.53-0.57 for keep 0.75 and 0.22-0.35 for
    keep 0.4; with the below, 6 seeds all end within 0.035 of both; in longer real runs it still swings, which the
    running offset of Level.track_cut fixes):
    - The task gradient only reaches the scores near the top-k cut, and it tends to pull them all below 0 where the
      soft weight's clamp gives no gradient back. So we remove its mean over the tokens it reaches (the task decides
      *which* tokens go in, the balancer decides *how many*), and
    - the count push is strong: COUNT_GAIN * (keep_ratio - positive fraction) times the mean |task gradient|,
      clamped to once that mean."""
    COUNT_GAIN = 10.0  # push per unit of error in the positive fraction (0.05 off -> half the mean |gradient|)
    SIZE_GAIN = 0.04  # the spec's gain, for keeping mean |score| in [1, 4]

    @staticmethod
    def forward(ctx, scores, keep_ratio, prob, valid=None, spec=False):
        """valid (B, T) bool or None: the real tokens, where a level's input is padded (threshold selection).
        spec: the spec's Balancer instead (Zipformer's: count push up to SIZE_GAIN outside keep +- 0.05, the task
        gradient as it is), for the quality ablation."""
        ctx.save_for_backward(scores, prob, valid)
        ctx.keep_ratio, ctx.spec = keep_ratio, spec
        return scores.view_as(scores)

    @staticmethod
    def backward(ctx, grad):
        scores, prob, valid = ctx.saved_tensors
        keep = ctx.keep_ratio
        real = torch.ones_like(scores) if valid is None else valid.float()  # padding is neither counted nor pushed
        n_real = real.sum().clamp(min=1)
        positive = (scores > 0).float() * real
        frac_positive, mean_abs = positive.sum() / n_real, (scores.abs() * real).sum() / n_real
        g = Balancer.SIZE_GAIN
        if ctx.spec:  # Zipformer: linear in the distance outside [keep - 0.05, keep + 0.05], at most g
            lo, hi = max(keep - 0.05, 1e-3), min(keep + 0.05, 1 - 1e-3)
            count_push = g * ((lo - frac_positive).clamp(min=0) / lo - (frac_positive - hi).clamp(min=0) / (1 - hi))
        else:
            count_push = ((keep - frac_positive) * Balancer.COUNT_GAIN).clamp(-1, 1)  # > 0: too few positive scores
        size_push = ((1.0 - mean_abs) * g).clamp(0, g) - ((mean_abs - 4.0) * g / 4.0).clamp(0, g)  # |s| into [1, 4]
        direction = (count_push + size_push * (positive - 0.5)) * real  # (B, T), > 0 means: make this score larger
        reached = (grad != 0).float()  # tokens the task gradient reaches (near the top-k cut)
        n_reached = reached.sum().clamp(min=1)
        grad_size = grad.abs().sum() / n_reached
        if not ctx.spec:
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
    """Eval-time selection (SUBLLM.md §4.3): keep tokens whose score > 0, decided token by token (causal).
    Rows keep different counts: kept tokens go first, in order, and rows are right-padded to the longest.
    With a capacity (training with selection='threshold') the short length is that fixed K instead, so shapes
    are static and there is no host sync, and the overflow rule is causal: a positive token that comes after the
    row's first K positive ones takes the skip path. The padding slots hold skipped tokens; they come after
    every kept one, so causal attention keeps them out of the kept tokens' outputs, and their weight is 0.
    Returns idx (B, K), weights (B, K) (0 on padding), kept (B, K) bool, counts (list of ints per row, or None with
    a capacity) and selected (B, T) bool: which tokens went in."""
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


def upsample(x, y, idx, weights):
    """Scatter the short sequence back to full length (SUBLLM.md §5): at a kept position p the result is
    w_p * y_p + (1 - w_p) * x_p, elsewhere x_p. x (B, T, C), y (B, K, C), idx and weights (B, K)."""
    w = weights[..., None].to(y.dtype)
    mixed = w * y + (1 - w) * gather_tokens(x, idx)
    return x.scatter(1, idx[..., None].expand_as(y), mixed)


class Stack(nn.Module):
    """A sequence of blocks and nested levels that all see the same tokens. Keeps the decode-cache length of its
    tokens, one per batch row (rows keep different numbers of tokens inside levels)."""

    def __init__(self, config, items, depth):
        super().__init__()
        self.layers = nn.ModuleList([Block(config) if it == 'T' else RecurrentBlock(config) if it == 'R'
                                     else Level(config, it, depth + 1) for it in items])
        self.cache_lens = None  # list of ints per row while decoding with a cache

    def forward(self, x, pos, rope, valid=None, counts=None):
        """x (B, T, C); pos (B or 1, T) original positions; valid (B, T) bool or None (no padding);
        counts: real tokens per row (list of ints), known where the caller already synced it."""
        cos, sin = rope[0][pos], rope[1][pos]  # (B or 1, T, D/2): angles of the original positions
        cache_ctx = None
        if self.cache_lens is not None:
            cache_ctx = self.cache_context(x.size(1), counts or [x.size(1)] * x.size(0), x.device)
        for layer in self.layers:
            if isinstance(layer, Block):
                if not layer.est_skip:  # EST switches whole blocks off for a step: the residual passes through
                    x = layer(x, cos, sin, cache_ctx)
            elif isinstance(layer, RecurrentBlock):
                x = layer(x, rope)  # window-local positions, its own decoding state
            else:
                x = layer(x, pos, rope, valid)
        return x

    def cache_context(self, K, counts, device):
        """Slots for K new tokens per row, after what each row already cached, and the attention mask over them."""
        lens = torch.tensor(self.cache_lens, device=device)
        slots = lens[:, None] + torch.arange(K, device=device)  # (B, K); padding writes past the row's end, unused
        length = max(self.cache_lens) + K
        mask = None
        if max(self.cache_lens) > 0:  # a key slot is visible to a query if it is at or before the query's slot
            mask = torch.arange(length, device=device)[None, None, None, :] <= slots[:, None, :, None]
        self.cache_lens = [n + c for n, c in zip(self.cache_lens, counts)]
        return slots, length, mask


class Level(nn.Module):
    """One subsampled level: score -> Balancer -> subsample -> inner Stack -> upsample -> Bypass."""

    def __init__(self, config, items, depth):
        super().__init__()
        self.depth, self.keep_ratio = depth, config.keep_ratio_at(depth)
        self.selection, self.capacity_slack = config.selection, config.capacity_slack
        self.scorer_norm, self.balancer_spec, self.running_cut = (config.scorer_norm, config.balancer == 'spec',
                                                                  config.running_cut)
        self.scorer = nn.Linear(config.n_embd, 1, bias=False)
        self.register_buffer('balancer_prob', torch.tensor(1.0), persistent=False)  # set_step: 1.0 -> 0.25
        self.register_buffer('score_offset', torch.tensor(0.0))  # running top-k cut, saved: inference needs it
        self.inner = Stack(config, items, depth)
        self.bypass = Bypass(config.n_embd)
        # Counters for logs and sample.py; tensors, so that torch.compile does not recompile as they grow.
        # Eval mode: tokens offered and kept. Training: tokens offered, tokens whose selection agrees with eval's
        # `score > 0`, and positive tokens the training selection skipped (below top-k's cut, or past the capacity).
        for name in ('tokens_in', 'tokens_kept', 'train_tokens_in', 'train_tokens_agree', 'train_tokens_dropped'):
            self.register_buffer(name, torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def track_cut(self, scores, valid=None, momentum=0.05):
        """Move score_offset towards the score that separates the top k = ceil(keep * n) of each row's n real tokens
        from the rest (like BatchNorm's running mean). The Balancer alone, a push on the gradient, let the eval-time
        kept fraction swing between 0.46 and 0.96 in config/parity_subllm.py (Adam's momentum makes it overshoot);
        with the offset it stays within 0.07 of the keep ratio from iter 300 on and ends at 0.636 / 0.619 for keep
        0.64. Top-k is unchanged by it. With momentum 0.05 the offset follows a drifting scorer ~20 steps late.
        It is the same for every token of a batch and moves after the batch's selection, so it leaks nothing."""
        B, T = scores.shape
        n = torch.full((B,), T, device=scores.device) if valid is None else valid.sum(1)  # (B,) real tokens
        k = torch.ceil(self.keep_ratio * n).long()
        ranked = scores if valid is None else scores.masked_fill(~valid, -math.inf)
        ranked = ranked.sort(dim=1, descending=True).values  # (B, T)
        above = ranked.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)  # the k-th largest, kept
        below = ranked.gather(1, k.clamp(max=T - 1)[:, None]).squeeze(1)   # the (k+1)-th, skipped
        rows = (k > 0) & (k < n)  # rows with a cut
        cut = torch.where(rows, (above + below) / 2, 0.0)
        self.score_offset.add_(momentum * cut.sum() / rows.sum().clamp(min=1))

    def training_length(self, T):
        """The short sequence's length in training, for an input of T tokens (static: it depends on T only).
        Top-k: ceil(keep * T). Threshold: a fixed capacity of keep * T * (1 + slack), padding included. The slack is
        added once, at depth 1: an inner level's input is its parent's capacity, which carries it already."""
        if self.selection == 'topk':
            return math.ceil(self.keep_ratio * T)
        slack = self.capacity_slack if self.depth == 1 else 0.0
        return min(T, math.ceil(self.keep_ratio * T * (1 + slack)))

    @torch.no_grad()
    def count_training_selection(self, scores, selected, valid):
        real = torch.ones_like(selected) if valid is None else valid
        positive = (scores > 0) & real
        self.train_tokens_in += real.sum()
        self.train_tokens_agree += ((selected == positive) & real).sum()
        self.train_tokens_dropped += (positive & ~selected).sum()

    def forward(self, x, pos, rope, valid=None):
        # (B, T): one score per token. Scoring the RMS-normalised x changes no sign (so no selection), only the
        # scale: the scores start near |s| ~ 1 whatever the size of the residual stream, where the soft weights and
        # the Balancer work, instead of ~0.01 after a 0.02-std embedding.
        # The running offset (below) centres the scores on the top-k cut, so `score > 0` keeps ~keep_ratio.
        # With selection='threshold' training keeps `score > 0` too, in a fixed capacity: causal, like decoding.
        scorer_input = F.rms_norm(x, (x.size(-1),)) if self.scorer_norm else x
        scores = self.scorer(scorer_input).squeeze(-1).float() - self.score_offset
        if self.training:
            if self.running_cut:
                self.track_cut(scores, valid)
            scores = Balancer.apply(scores, self.keep_ratio, self.balancer_prob, valid, self.balancer_spec)
            if self.selection == 'topk':
                idx, weights = subsample_topk(scores, self.keep_ratio)  # (B, k), k = ceil(keep * T)
                kept, counts = None, None
                selected = torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)
            else:
                idx, weights, kept, counts, selected = subsample_threshold(scores, valid, self.training_length(x.size(1)))
            self.count_training_selection(scores, selected, valid)
        else:
            idx, weights, kept, counts, _ = subsample_threshold(scores, valid)
            self.tokens_in += x.size(0) * x.size(1) if valid is None else valid.sum()
            self.tokens_kept += kept.sum()
            if idx.size(1) == 0:  # no token of any row entered: the level is the skip path, out = x
                return x
        x_short = gather_tokens(x, idx)                         # (B, k, C)
        pos_short = gather_tokens(pos.expand(x.size(0), -1), idx)  # (B, k): original positions, for RoPE
        y = self.inner(x_short, pos_short, rope, kept, counts)  # (B, k, C)
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
        head_dim = config.n_embd // config.n_head
        freqs = 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
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

    # -- optimizer and FLOPs ---------------------------------------------------

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; matrices are decayed, norms and bypass gates are not."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
                  {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
        fused = device_type == 'cuda'
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def forward_flops(self, T, keep=None):
        """Forward FLOPs for one sequence of T tokens, counting for each block the tokens it really sees
        (SUBLLM.md §9). keep: a keep fraction per level depth (list); default what training runs: top-k's
        ceil(keep * T), or the fixed capacity of threshold selection. With an EST sub-network set
        (set_subnetwork), only what it runs. Matmuls 2 * tokens * weights; causal attention 2 * T^2 * C."""
        cfg = self.config
        kv_dim = cfg.n_kv_head * (cfg.n_embd // cfg.n_head)
        attn_weights = 2 * cfg.n_embd * cfg.n_embd + 2 * cfg.n_embd * kv_dim
        mlp_weights = 3 * cfg.n_embd * cfg.ffn_hidden

        def block_flops(t, heads=1, units=1):  # heads, units: the fractions an EST sub-network runs
            return 2 * t * (heads * attn_weights + units * mlp_weights) + heads * 2 * t * t * cfg.n_embd

        def stack_flops(stack, t):
            total = 0.0
            for layer in stack.layers:
                if isinstance(layer, Block):
                    if not layer.est_skip:  # with an EST sub-network: only the heads and units it runs
                        total += block_flops(t, *layer.est_fractions())  # fractions 1, 1 for the dense block
                elif isinstance(layer, RecurrentBlock):  # the block on each window as RecurrentBlock.recur runs it
                    w = layer.window
                    sizes = [min(w, t - start) for start in range(0, t, w)]  # the windows; the last may be shorter
                    total += block_flops(sizes[0])                                 # H_0 = T(X_0)
                    total += sum(block_flops(w + n) for n in sizes[1:])            # [Y; H] = T([H; X]): w + n wide
                    total += block_flops(sizes[-1])                                # the last window's readout
                else:
                    t_inner = layer.training_length(t) if keep is None else keep[layer.depth - 1] * t
                    total += 2 * t * cfg.n_embd + stack_flops(layer.inner, t_inner)  # scorer + inner blocks
            return total
        return stack_flops(self.stack, T) + 2 * T * cfg.n_embd * cfg.vocab_size

    def estimate_mfu(self, fwdbwd_per_iter, dt, peak_flops=None):
        """Model FLOPs utilization: achieved FLOP/s (fwd + bwd = 3x fwd, over sequences of block_size) over the
        device's peak. Returns None when the peak is unknown (CPU, unlisted GPU)."""
        peak_flops = peak_flops or gpu_peak_flops()
        if peak_flops is None:
            return None
        return 3 * self.forward_flops(self.config.block_size) * fwdbwd_per_iter / dt / peak_flops

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
            for counter in (level.tokens_in, level.tokens_kept, level.train_tokens_in, level.train_tokens_agree,
                            level.train_tokens_dropped):
                counter.zero_()

    def level_stats(self):
        """Per level, in eval mode since the last reset: (depth, tokens offered, tokens kept)."""
        return [(level.depth, level.tokens_in.item(), level.tokens_kept.item()) for level in self.levels()]

    def selection_stats(self):
        """Per level, in training mode since the last reset: (depth, tokens offered, tokens whose selection agrees
        with eval's `score > 0`, positive tokens the training selection skipped)."""
        return [(level.depth, level.train_tokens_in.item(), level.train_tokens_agree.item(),
                 level.train_tokens_dropped.item()) for level in self.levels()]

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


    # -- Evolving Subnetwork Training (EST) --------------------------------------

    def set_subnetwork(self, subnet):
        """Run only part of the model from now on (EST, arXiv 2406.06962), until the next call.
        subnet: None for the dense model, or one entry per block of self.blocks(): None skips that block (the
        residual passes through), (groups, units) runs it with only these KV groups (each with all its query
        heads; with plain multi-head attention a group is one head) and these SwiGLU hidden units, LongTensors.
        Scorers, upsampling and bypasses of SUBLLM levels always run. See sample_subnetwork."""
        blocks = self.blocks()
        if subnet is not None and any(isinstance(m, RecurrentBlock) for m in self.modules()):
            raise ValueError("EST sub-networks are not implemented for recurrent blocks ('R' in the structure): "
                             "train this structure without est")
        if subnet is None:
            subnet = [(None, None)] * len(blocks)
        if len(subnet) != len(blocks):
            raise ValueError(f"the sub-network has {len(subnet)} entries but the model has {len(blocks)} blocks: "
                             f"give one per block of model.blocks()")
        cfg = self.config
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
    """A random EST sub-network for model.set_subnetwork: est_kept(p_layers, n) of the n blocks run (more if the
    rules need more: the first and last block always run, and in SUBLLM at least one block directly inside every
    level, so no level degenerates to its bypass), and each running block keeps est_kept(p_heads) of its KV groups
    and est_kept(p_units) of its SwiGLU units, all uniformly at random. Everything comes from `generator`: the same
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


# -----------------------------------------------------------------------------
# Growing a trained model (Transformer Layer Injection, Depth Up-Scaling)


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


def gpu_peak_flops():
    """Dense bf16 peak of the current CUDA device, from its name; None on CPU or for an unlisted GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in [('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
                       ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12), ('4090', 165e12), ('3090', 71e12)]:
        if key in name:
            return flops
    return None

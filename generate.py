"""
Decoding with KV caches, in gpt-fast's manner: the caches, a chunk of tokens through them, the prefill, one decode
step, the loop, and the compiled step. sample.py, eval.py and bench.py use it.

    from generate import generate
    out = generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=200)   # (B, T + 100)

How SUBLLM decodes. Every block keeps a KV cache, and a level's blocks cache only the tokens that entered it, at
their original positions (RoPE), so a level's rows hold different numbers of tokens. Each stack (the model's, and
each level's inside) counts them per row on the device, updated in place, and every cache write and attention is
one op over the rows (CacheContext), whatever their number; in a level, attention reads only the caches of the rows
that enter (eager on a CPU: sparse matmuls, attend_sparse; compiled: fused loops, attend_rows). A chunk (a prompt,
then one token per row per step) walks the model's decode program: blocks, level entries and exits, in the order a
token meets them. At a level's entry the host reads, once, how many rows enter (Decoder.route): none, and the level
is skipped (a batch-1 token whose score is not positive runs none of its blocks); otherwise its blocks run on the
rows that enter (compiled: padded to a bucket of a few fixed sizes, for static shapes). The work between two reads
is one segment: tensor code only, one graph when compiled (a CUDA graph on a GPU). The LLaMA baseline's step is one
segment and no read.
"""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Level, RecurrentBlock, gather_tokens, subsample_threshold, upsample

warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')  # attend_sparse's, once a process
CACHE_SLACK = 0.1  # a level's caches hold the tokens expected to enter it, plus 10%; they grow if a row needs more


class KVCache(nn.Module):
    """One block's keys and values, preallocated for `capacity` tokens per row, and a scratch slot at the end where
    padding tokens write: a write needs no mask, and never touches what a row has cached."""

    def __init__(self, batch_size, capacity, n_kv_head, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_head, capacity + 1, head_dim)
        self.register_buffer('k', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer('v', torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.flat()

    def flat(self):
        """Views of the caches as a slot a row, (B * Hkv * (capacity + 1), D), keys transposed (attend_sparse)."""
        self.k_flat_t, self.v_flat = self.k.view(-1, self.k.size(3)).t(), self.v.view(-1, self.v.size(3))

    def grow(self, capacity):
        """Room for `capacity` tokens per row: the cached slots copied into larger buffers."""
        for name in ('k', 'v'):
            old = getattr(self, name)
            new = old.new_zeros(old.size(0), old.size(1), capacity + 1, old.size(3))
            new[:, :, :old.size(2) - 1] = old[:, :, :-1]
            setattr(self, name, new)
        self.flat()

    def write(self, rows, slots, k, v):
        """k, v (b, Hkv, K, D) of cache rows `rows` (b,), at their slots (b, K)."""
        index = (rows[:, None, None], torch.arange(k.size(1), device=k.device)[None, :, None], slots[:, None, :])
        self.k[index], self.v[index] = k.to(self.k.dtype), v.to(self.v.dtype)


@dataclass
class CacheContext:
    """Where a chunk of K tokens per row goes in one stack's caches, and which slots each query sees; made once per
    stack and chunk (cache_context). Attention.forward calls attend."""
    rows: torch.Tensor   # (b,) the cache rows of the chunk's rows
    slots: torch.Tensor  # (b, K) where each token's key and value go; padding: the scratch slot
    mask: torch.Tensor   # (B, 1, K, capacity + 1) added to the scores: 0 where a query of cache row r sees a slot;
                         # None where the pattern holds it
    pattern: torch.Tensor = None  # eager on a CPU, some rows, a token each: the slots they read (sparse_pattern)

    def attend(self, attn, q, k, v):
        """Write the chunk's k, v (b, Hkv, K, D) into attn's cache, then its queries q (b, H, K, D) attend there."""
        attn.kv_cache.write(self.rows, self.slots, k, v)
        if self.pattern is not None:
            return attend_sparse(q, attn.kv_cache, self.pattern)
        keys, values = attn.kv_cache.k.to(q.dtype), attn.kv_cache.v.to(q.dtype)  # (B, Hkv, capacity + 1, D)
        if self.rows.size(0) == keys.size(0):  # every cache row, in order
            return attn.attend(q, keys, values, self.mask)
        if torch.compiler.is_compiling():  # compiled: one fused loop reads the b rows' caches where they are
            return attend_rows(q, keys, values, self.mask, self.rows)
        # Some rows, otherwise (a prompt's; bf16 on a CPU; a GPU, eagerly): attention over all B rows' caches, the
        # other rows' queries zero. Copying the b rows' caches out would read them three times; this reads B once
        q_all = q.new_zeros(keys.size(0), *q.shape[1:]).index_copy(0, self.rows, q)
        return attn.attend(q_all, keys, values, self.mask).index_select(0, self.rows)


def attend_sparse(q, cache, pattern):
    """Attention of one query per row, q (b, H, 1, D), over its row's slots of the cache, reading them where they
    are (eager, on a CPU): pattern, a sparse (b * H, cache slots) CSR matrix, holds the slots each row and head
    scores, with the mask as its values. A sampled matmul computes the scores there only (SDDMM), a softmax, and a
    sparse matmul the weighted sum of the values: the other rows' caches are not read."""
    b, H, _, D = q.shape
    scores = torch.sparse.sampled_addmm(pattern, q.view(b * H, D), cache.k_flat_t, alpha=D ** -0.5)
    weights = scores.values().view(b * H, -1)
    weights.copy_(torch.softmax(weights, dim=-1))  # scores becomes the attention weights
    return torch.mm(scores, cache.v_flat).view(b, H, 1, D)


def attend_rows(q, keys, values, mask, rows):
    """Attention of the queries q (b, H, K, D) of cache rows `rows` over those rows' caches keys, values (B, Hkv, L,
    D), under mask (B, 1, K, L), written as products and sums that the compiler fuses into loops reading the rows'
    caches in place (SDPA or a matmul would first copy them out). Eager, it would materialize the products: eager
    decoding uses attend_sparse on a CPU, elsewhere SDPA over all B rows (CacheContext.attend). fp32 scores and
    softmax, as SDPA's."""
    (b, H, K, D), dtype, Hkv = q.shape, q.dtype, keys.size(1)
    k, v = keys[rows].float()[:, :, None, None], values[rows].float()[:, :, None, None]  # (b, Hkv, 1, 1, L, D)
    q = q.float().view(b, Hkv, H // Hkv, K, 1, D)                                        # grouped-query heads
    scores = (q * k).sum(-1) * D ** -0.5 + mask[rows][:, :, None]                        # (b, Hkv, G, K, L)
    y = (torch.softmax(scores, -1)[..., None] * v).sum(-2)                               # (b, Hkv, G, K, D)
    return y.view(b, H, K, D).to(dtype)


def cache_context(lens, capacity, dtype, K, valid, rows, masked=True):
    """A chunk of K tokens per row for a stack whose rows have cached lens (B,) tokens (advanced in place here):
    valid (b, K) the real tokens (padding last; None: all of every row), rows (b,) their cache rows. Query i of cache
    row r sees slots 0 .. lens[r] + i: what its row cached, and the chunk up to itself (the mask, unless not
    `masked`: attend_sparse's pattern holds it)."""
    last_seen = lens[:, None] + torch.arange(K, device=lens.device)             # (B, K)
    mask = None
    if masked:
        unseen = torch.arange(capacity + 1, device=lens.device) > last_seen.view(-1, 1, K, 1)  # (B, 1, K, capacity+1)
        mask = torch.zeros(unseen.shape, dtype=dtype, device=lens.device).masked_fill(unseen, -math.inf)
    slots = last_seen if rows.size(0) == lens.size(0) else last_seen.index_select(0, rows)  # (b, K)
    if valid is None:
        lens.add_(K)
    else:
        slots = torch.where(valid, slots, capacity)  # padding: the scratch slot
        lens.index_add_(0, rows, valid.sum(1))
    return slots, mask


def decode_program(stack):
    """A stack's layers in the order a chunk meets them: ('block', layer), and for a level ('enter', level), its
    inner program, ('exit', level)."""
    ops = []
    for layer in stack.layers:
        if isinstance(layer, Level):
            ops += [('enter', layer), *decode_program(layer.inner), ('exit', layer)]
        else:
            ops.append(('block', layer))  # a Block, or a RecurrentBlock (its own window state instead of a cache)
    return ops


def bucket(n, rows):
    """Rows a compiled level runs when n of its `rows` enter: n rounded up to a power of two up to 8, then to a
    multiple of 8, at most `rows` and at least 2 (a graph serves sizes >= 2; size 1 would be one more). A few sizes:
    one CUDA graph each."""
    return min(rows, max(2, 1 << (n - 1).bit_length() if n <= 8 else 8 * math.ceil(n / 8)))


class Decoder:
    """A model's decoding state for batch_size rows of up to max_len tokens: each block's KV cache, and per stack
    (the model's, each level's inside) the tokens each row has cached (on the device) and the slots per row. A
    level's caches start with room for the tokens expected to enter it (its keep ratios' product, plus CACHE_SLACK)
    and grow when a row needs more. Under autocast the caches take its dtype (bf16: half the memory of fp32).
    decoder(idx) feeds the next chunk (B, T) of every row (eval mode) and returns forward's (logits, loss)."""

    def __init__(self, model, batch_size, max_len, compiled=False):
        self.model, self.batch_size, self.max_len, self.fed = model, batch_size, max_len, 0
        self.ops = [('embed', None), *decode_program(model.stack), ('head', None)]
        self.skip_to = {}  # the op after each level's exit: where a chunk goes on when no token enters the level
        for i, (kind, layer) in enumerate(self.ops):
            if kind == 'exit':
                self.skip_to[next(j for j, op in enumerate(self.ops) if op == ('enter', layer))] = i + 1
        param = model.lm_head.weight
        device_type = param.device.type
        self.dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else param.dtype
        stacks = {model.stack: 1.0, **{lv.inner: math.prod(model.config.keep_ratio_at(d) for d in
                                                           range(1, lv.depth + 1)) for lv in model.levels()}}
        self.keep = stacks  # stack -> the fraction of the model's tokens expected to reach it
        self.lens = {s: torch.zeros(batch_size, dtype=torch.long, device=param.device) for s in stacks}
        self.caches = {s: [] for s in stacks}  # stack -> its blocks' KVCaches
        for stack in stacks:
            capacity = self.capacity(stack, 0, 0)
            for layer in stack.layers:
                if isinstance(layer, RecurrentBlock):  # no KV cache: it carries its last window's state instead
                    layer.decoding, layer.state, layer.pending = True, None, None
                elif not isinstance(layer, Level):
                    attn = layer.attn
                    attn.kv_cache = KVCache(batch_size, capacity, attn.n_kv_head, attn.head_dim, self.dtype,
                                            param.device)
                    self.caches[stack].append(attn.kv_cache)
        self.pattern_base = {}  # slots a row: attend_sparse's slots of each head in cache row 0 (sparse_pattern)
        self.static = bool(compiled)  # updated in place: a CUDA graph reads the lengths and caches where they are
        self.buckets = bool(compiled)  # static shapes: a level runs its entering rows padded to a bucket size
        for t in [*self.lens.values(), *(c for caches in self.caches.values() for kv in caches for c in (kv.k, kv.v))]:
            self.mark_static(t)
        if compiled and any(isinstance(layer, RecurrentBlock) for layer in model.stack.layers):
            raise ValueError("compiled decoding does not support recurrent blocks ('R' in the structure): decode "
                             "this model without compile")
        self.run = compiled_segment(device_type, 'inductor' if compiled is True else compiled) if compiled else segment

    def capacity(self, stack, need, end):
        """Slots per row for a stack's caches: `need` (its longest row now), and the tokens expected to reach it
        between the model's first `end` tokens and max_len, plus CACHE_SLACK (all of them for the model's stack)."""
        return min(self.max_len, need + math.ceil(self.keep[stack] * (1 + CACHE_SLACK) * (self.max_len - end)))

    def __call__(self, idx, targets=None):
        """The next chunk idx (B, T) of every row through the caches: forward's (logits, loss). The host reads one
        set of numbers per level the chunk reaches (route); a prompt (T > 1) runs eagerly, a step as compiled."""
        B, T = idx.shape
        if self.fed + T > self.max_len:
            raise ValueError(f"sequence of {self.fed + T} tokens is longer than the caches' max_len={self.max_len}")
        self.fed += T
        run = self.run if T == 1 else segment
        if run is not segment:  # CUDA graphs: a new step, whose replays may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        frames, i, out = run(self, 0, None, None, (idx, targets))
        while i < len(self.ops):  # stopped at a level's entry; out: what to read, and what the entry needs after
            K, size = self.route(self.ops[i][1], out[0], frames[-1]['x'].size(0))
            if K == 0:  # no token enters: the level is the identity, go on after it
                frames, i, out = run(self, self.skip_to[i], frames, None, (idx, targets))
            else:
                frames, i, out = run(self, i, frames, (K, size, *out[1:]), (idx, targets))
        return out

    def route(self, level, info, rows):
        """The one host read at a level: info (the rows that enter, the longest cache after, and in a chunk of
        several tokens a row the most a row brings). Returns K (0: no token enters) and how many of the `rows`
        reaching the level to run (those that enter; compiled, a bucket). Grows the level's caches first if a row
        needs more slots than they have."""
        entering, need, *most = info.tolist()
        K, last = most[0] if most else min(entering, 1), self.fed - 1  # the chunk's last position
        stack = level.inner
        if need > self.caches[stack][0].k.size(2) - 1:
            capacity = self.capacity(stack, need, last + 1)
            for kv in self.caches[stack]:
                kv.grow(capacity)
                self.mark_static(kv.k)
                self.mark_static(kv.v)
        return K, bucket(entering, rows) if self.buckets else entering

    def mark_static(self, t):
        if self.static:  # compiled only: importing dynamo costs an eager process seconds
            torch._dynamo.mark_static_address(t)

    def cache_bytes(self):
        """Bytes the KV caches hold now."""
        return sum(t.numel() * t.element_size()
                   for caches in self.caches.values() for kv in caches for t in (kv.k, kv.v))

    def close(self):
        """Free the caches (the model decodes no more, or starts again with a new Decoder)."""
        for block in self.model.blocks():
            block.attn.kv_cache = None
        for layer in self.model.stack.layers:
            if isinstance(layer, RecurrentBlock):
                layer.decoding, layer.state, layer.pending = False, None, None
        self.caches = {}


def segment(decoder, start, frames, entry, chunk):
    """The decode program from op `start` up to the next level's entry, where it stops with what the host must read
    (Decoder.route), or to the end, with the logits. Tensor work only: torch.compile makes one graph of it.
    frames: the stacks the chunk is in, outermost first (dicts: x, its rows and positions, the cache context; for a
    level, how to put its rows back). entry: when `start` is a level's entry, the host's K and bucket size, and the
    weights and counts that the previous segment computed there."""
    model, ops = decoder.model, decoder.ops
    rope = (model.rope_cos, model.rope_sin)
    for i in range(start, len(ops)):
        kind, layer = ops[i]
        f = frames[-1] if frames else None
        if kind == 'embed':  # the model's stack: every row, its positions from the cache length (alike in all rows)
            idx = chunk[0]
            pos = decoder.lens[model.stack][:1, None] + torch.arange(idx.size(1), device=idx.device)  # (1, T)
            rows = torch.arange(idx.size(0), device=idx.device)
            frames = [open_stack(decoder, model.stack, model.tok_embeddings(idx), pos, None, rows, rope)]
        elif kind == 'block' and isinstance(layer, RecurrentBlock):
            f['x'] = layer(f['x'], rope)
        elif kind == 'block':
            f['x'] = layer(f['x'], f['cos'], f['sin'], f['cache'])
        elif kind == 'enter' and i > start:  # score the chunk here, and stop: the host decides the way on
            return frames, i, score_chunk(decoder, layer, f)
        elif kind == 'enter':
            frames.append(enter_level(decoder, layer, f, *entry, rope))
        elif kind == 'exit':
            exit_level(layer, frames.pop(), frames[-1])
        else:  # 'head'
            return frames, i + 1, model.head(f['x'], chunk[1])


def open_stack(decoder, stack, x, pos, valid, rows, rope, cos_sin=None):
    """A frame: the chunk x (b, K, C) of cache rows `rows` in a stack, with its cache context. cos_sin: the rotary
    tables at pos, when the frame it comes from has them."""
    caches = decoder.caches[stack]
    capacity = caches[0].k.size(2) - 1 if caches else 0
    # attend_sparse: a token per row, some rows, eagerly on a CPU in fp32 (the sparse kernels there; a GPU decodes
    # compiled: attend_rows)
    sparse = (x.size(1) == 1 and rows.size(0) < decoder.batch_size and x.device.type == 'cpu' and caches and
              decoder.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling())
    slots, mask = cache_context(decoder.lens[stack], capacity, decoder.dtype, x.size(1), valid, rows, not sparse)
    cache = CacheContext(rows, slots, mask, sparse_pattern(decoder, caches[0], rows, slots) if sparse else None)
    cos, sin = cos_sin or (rope[0][pos], rope[1][pos])
    return dict(x=x, pos=pos, valid=valid, rows=rows, cache=cache, cos=cos, sin=sin)


def sparse_pattern(decoder, cache, rows, slots):
    """attend_sparse's pattern for one token of each of the cache rows `rows` (b,), at their slots (b, 1): a CSR
    matrix whose row (i, h) holds the slots 0 .. capacity - 1 of row i's cache and KV head h // (H / Hkv), flat,
    with the mask as values (-inf past the token's own slot)."""
    B, Hkv, L, _ = cache.k.shape
    H, b = decoder.model.config.n_head, slots.size(0)
    if L not in decoder.pattern_base:  # for cache row 0: each head's slots, and their numbers (H, L - 1)
        slot = torch.arange(L - 1, device=slots.device).expand(H, -1)
        heads = torch.arange(H, device=slots.device) // (H // Hkv) * L
        decoder.pattern_base[L] = heads[:, None] + slot, slot
    base, slot = decoder.pattern_base[L]
    cols = (rows * (Hkv * L)).view(b, 1, 1) + base                                               # (b, H, L - 1)
    bias = torch.zeros((), dtype=decoder.dtype).masked_fill(slot > slots.view(b, 1, 1), -math.inf)  # (b, H, L - 1)
    crows = torch.arange(0, b * H * (L - 1) + 1, L - 1, device=slots.device)
    return torch.sparse_csr_tensor(crows, cols.view(-1), bias.view(-1), size=(b * H, cache.v_flat.size(0)),
                                   check_invariants=False)


def score_chunk(decoder, level, f):
    """A level's selection of the chunk in frame f, before the host read: (info to read, weights, counts)."""
    x, valid = f['x'], f['valid']
    scores = level.score(x)                                                  # (b, T)
    selected = scores > 0 if valid is None else (scores > 0) & valid
    weights = scores.clamp(0, 1) * selected                                  # > 0 exactly where a token enters
    counts = selected.sum(1)                                                 # (b,) tokens entering, per row
    filled = decoder.lens[level.inner].index_select(0, f['rows']) + counts   # (b,) each row's cache after
    offered, kept = counts.new_tensor(x.size(0) * x.size(1)) if valid is None else valid.sum(), counts.sum()
    level.stats[:2].add_(torch.stack([offered, kept]))  # tokens offered and kept, for the logs
    if x.size(1) == 1:  # a step: a row brings one token or none
        return torch.stack([kept, filled.max()]), weights, counts
    return torch.stack([(counts > 0).sum(), filled.max(), counts.max()]), weights, counts


def enter_level(decoder, level, f, K, size, weights, counts, rope):
    """Into a level after the host read: its rows (the `size` rows of a bucket, those that enter first), their
    tokens that enter (K per row at most), and a frame for its stack."""
    x, pos, rows, order = f['x'], f['pos'], f['rows'], None
    if size < x.size(0):
        order = counts.argsort(descending=True, stable=True)[:size]  # entering rows first
        x, weights, rows = x.index_select(0, order), weights.index_select(0, order), rows.index_select(0, order)
        pos = pos if pos.size(0) == 1 else pos.index_select(0, order)
    if x.size(1) == 1:  # one token per row (a decode step): it is the short sequence, or padding
        cos_sin = (f['cos'], f['sin']) if f['pos'].size(0) == 1 else None  # positions alike in all rows
        index, short = None, open_stack(decoder, level.inner, x, pos, weights > 0, rows, rope, cos_sin)
    else:  # weights as the scores: the same selection, and weights = clamp(s, 0, 1) for the kept tokens
        index, weights, inner_valid, _ = subsample_threshold(weights, None, K)  # (b, K)
        x_short, pos_short = gather_tokens(x, index), gather_tokens(pos.expand(x.size(0), -1), index)
        short = open_stack(decoder, level.inner, x_short, pos_short, inner_valid, rows, rope)
    return dict(short, x_in=x, order=order, index=index, weights=weights)


def exit_level(level, inner, f):
    """Out of a level: its rows' tokens scattered back (upsample) and mixed by the bypass, into frame f's x."""
    x, y, w = inner['x_in'], inner['x'], inner['weights']
    if inner['index'] is None:  # one token per row
        u = x + w[..., None].to(y.dtype) * (y - x)
    else:
        u = upsample(x, y, inner['index'], w)
    out = level.bypass(x, u)
    f['x'] = out if inner['order'] is None else f['x'].index_copy(0, inner['order'], out)


_compiled = {}


def compiled_segment(device_type, backend='inductor'):
    """segment under torch.compile, one per device type and backend (made once: every Decoder shares its graphs).
    fullgraph: a segment reads nothing to the host, so it is one graph; on CUDA a CUDA graph ('reduce-overhead').
    Static shapes: a graph per segment start, and per bucket size of each level open there (a few: bucket)."""
    if (device_type, backend) not in _compiled:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)  # segments x buckets
        mode = 'reduce-overhead' if device_type == 'cuda' and backend == 'inductor' else None
        _compiled[device_type, backend] = torch.compile(segment, fullgraph=True, dynamic=False, backend=backend,
                                                        mode=mode)
    return _compiled[device_type, backend]


# -----------------------------------------------------------------------------
# sampling


def sample(logits, temperature=1.0, top_k=None):
    """The next token of each row (B, 1) from the last position's logits (B, 1, V), without a host sync: an
    exponential race (argmax of p / E, E ~ Exp(1), picks token i with probability p_i) instead of multinomial."""
    logits = logits[:, -1, :] / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], -float('inf'))
    probs = F.softmax(logits, dim=-1)
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1, keepdim=True)


def prefill(decoder, idx, temperature=1.0, top_k=None):
    """The prompt idx (B, T) into the caches; the first new token (B, 1)."""
    return sample(decoder(idx)[0], temperature, top_k)


def decode_one_token(decoder, token, temperature=1.0, top_k=None):
    """One decode step: token (B, 1) through the caches, and the next one sampled (B, 1)."""
    return sample(decoder(token)[0], temperature, top_k)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, compiled=False):
    """Sample max_new_tokens after idx (B, T), in eval mode. With use_cache, the prompt fills the KV caches and each
    new token runs only the levels its scores let it into (compiled: the decode step as graphs); use_cache=False
    recomputes the full forward every step (the reference the caches must match)."""
    B, T = idx.shape
    if T + max_new_tokens > model.config.block_size:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} tokens is longer "
                         f"than block_size={model.config.block_size}: shorten one of them")
    if max_new_tokens <= 0:
        return idx
    was_training = model.training
    model.eval()
    tokens = [idx]
    try:
        if use_cache:
            decoder = Decoder(model, B, T + max_new_tokens - 1, compiled)  # the last token is never fed back
            tokens.append(prefill(decoder, idx, temperature, top_k))
            for _ in range(max_new_tokens - 1):
                tokens.append(decode_one_token(decoder, tokens[-1], temperature, top_k))
        else:
            for _ in range(max_new_tokens):
                tokens.append(sample(model(torch.cat(tokens, dim=1))[0], temperature, top_k))
    finally:
        if use_cache:
            decoder.close()
        model.train(was_training)
    return torch.cat(tokens, dim=1)

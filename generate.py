"""
Decoding with KV caches, in gpt-fast's manner: the caches, a chunk of tokens through them, the prefill, one decode
step, the loop, and the compiled step. sample.py, eval.py and bench.py use it.

    from generate import generate
    out = generate(model, prompt_ids, max_new_tokens=100, temperature=0.8, top_k=200)   # (B, T + 100)

How SUBLLM decodes. Every block keeps a KV cache, and a level's blocks cache only the tokens that entered it, at
their original positions (RoPE), so a level's rows hold different numbers of tokens: its caches are a pool of
pages that the rows are given as they need them (vLLM's paged attention), so that it holds about what entered, not
max_len a row (Pages). Each stack (the model's, and each level's inside) counts its tokens per row on the device,
updated in place, and every cache write and attention is one op over the rows (CacheContext), whatever their
number; in a level, attention reads only the pages of the rows that enter (eager on a CPU: sparse matmuls,
attend_sparse; compiled: fused loops, attend_rows). A chunk (a prompt,
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
PAGE_SIZE = 16     # slots per page of a level's caches (at most max_len / 8: a row's last pages are part empty)
CACHE_SLACK = 0.1  # a level's pool grows by the tokens expected to enter it until max_len, plus 10%


class KVCache(nn.Module):
    """One block's keys and values. The model's stack: (B, Hkv, max_len, D), LLaMA's dense cache, a row after row.
    A level's: a pool of pages of `size` slots, head-major, (Hkv, pages, size, D), which its stack's Pages give to
    the rows and which grows as they need more (head-major: a row whose pages are in order, as at batch 1, has each
    head's slots in one run, which attention reads in place, in_order). Kept flat, one slot a row (slots, D): a
    write is an index_put into the buffer itself, which the compiler does in place (into a view, it would copy the
    whole cache back)."""

    def __init__(self, pages, n_kv_head, size, head_dim, dtype, device, pool):
        super().__init__()
        self.shape, self.pool = (n_kv_head, pages, size, head_dim) if pool else (pages, n_kv_head, size, head_dim), pool
        self.register_buffer('k', torch.zeros(pages * n_kv_head * size, head_dim, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer('v', torch.zeros_like(self.k), persistent=False)
        self.k_t = self.k.t()  # attend_sparse's

    def grow(self, pages):
        """A pool with room for `pages` pages: the pages copied into larger buffers."""
        for name in ('k', 'v'):
            old = getattr(self, name).view(self.shape)
            new = old.new_zeros(old.size(0), pages, *old.shape[2:])
            new[:, :old.size(1)] = old
            setattr(self, name, new.view(-1, new.size(3)))
        self.shape, self.k_t = tuple(new.shape), self.k.t()

    def in_order(self, L):
        """Keys and values (B, Hkv, L, D) where each row's slots lie in order, as views: the model's caches; a
        pool's first L slots of each head, which are a batch-1 row's (its pages are given out in order)."""
        if not self.pool:
            return self.k.view(self.shape), self.v.view(self.shape)
        Hkv, D = self.shape[0], self.shape[3]
        return self.k.view(Hkv, -1, D)[None, :, :L], self.v.view(Hkv, -1, D)[None, :, :L]

    def pages(self, page):
        """Keys and values of the pages `page` (b, W) of a pool, each row's in order: (b, Hkv, W, size, D)."""
        return self.k.view(self.shape)[:, page].transpose(0, 1), self.v.view(self.shape)[:, page].transpose(0, 1)

    def write(self, index, k, v):
        """k, v (b, Hkv, K, D) at the flat slots index (b, Hkv, K)."""
        self.k[index], self.v[index] = k.to(self.k.dtype), v.to(self.v.dtype)


@dataclass
class Pages:
    """Which pages of a stack's caches hold each row's slots: slot s of cache row r is slot s % size of the page
    that starts at flat slot table[r, s // size], for KV head 0 (head h: kv_start[h] further). A row's entries past
    its own pages repeat its last: never seen by a query (masked), and they read only its own cache. On the device:
    table, count, used; on the host: the pool's pages, and the pages of a row that attention spans (width)."""
    table: torch.Tensor  # (B, pages a row can have) the flat first slot of each page of each row
    count: torch.Tensor  # (B,) pages each row has
    used: torch.Tensor   # () pages given out
    size: int            # slots a page
    n_head: int          # query heads (grouped-query heads share a KV head)
    dense: bool          # the model's stack: a page of max_len slots a row, page-major (B, Hkv, max_len, D)
    in_order: bool       # each row's pages lie in order (the model's stack; a level at batch 1)
    pool: int = 0        # pages the caches have room for (a level's: its KVCaches')
    width: int = 0       # pages of each row that attention spans (a level: at least the most any row has)

    @classmethod
    def make(cls, batch_size, max_len, size, n_kv_head, n_head, device):
        """A stack's pages: size = max_len, the model's stack, a page a row (row r's starts at r * Hkv * max_len);
        otherwise a level's, none given out yet, the pool empty."""
        dense, rows = size == max_len, torch.arange(batch_size, device=device)
        table = torch.zeros(batch_size, math.ceil(max_len / size), dtype=torch.long, device=device)
        table[:, 0] = rows * (n_kv_head * size) if dense else 0
        pages = cls(table, torch.full_like(rows, int(dense)), rows.new_tensor(0), size, n_head, dense,
                    dense or batch_size == 1)
        pages.n_kv_head = n_kv_head
        pages.resize(batch_size if dense else 0)
        pages.span(int(dense))
        return pages

    def resize(self, pool):
        """Room for `pool` pages. Where each KV head's part of a page starts, from the page's start (kv_start: a
        level's caches are head-major, so pool * size slots after the last's), and the slots of a page from its
        start for each query head (head_base: grouped-query heads share their KV head's)."""
        heads, offsets = self.n_kv_head, torch.arange(self.size, device=self.table.device)
        self.pool, apart = pool, self.size if self.dense else pool * self.size  # a KV head's part from the last's
        self.kv_start = torch.arange(heads, device=self.table.device)[:, None] * apart           # (Hkv, 1)
        kv_base = self.kv_start[:, :, None] + offsets                                            # (Hkv, 1, size)
        self.head_base = kv_base.repeat_interleave(self.n_head // heads, 0)                      # (H, 1, size)

    def span(self, width):
        """Attention spans the first `width` pages of each row."""
        self.width, self.spanned, self.first = width, self.table[:, :width], self.table[:, :1]

    def slots(self, table, base):
        """The flat slots (b, heads, width * size) of the rows whose spanned tables are table (b, width), in order."""
        b, width = table.size(0), self.width
        return (table.view(b, 1, width, 1) + base).view(b, base.size(0), width * self.size)


@dataclass
class CacheContext:
    """Where a chunk of K tokens per row goes in one stack's caches, and which slots each query sees; made once per
    stack and chunk (cache_context). Attention.forward calls attend."""
    index: torch.Tensor   # (b, Hkv, K) the flat slots where the chunk's keys and values go
    mask: torch.Tensor    # (b, 1, K, L) added to the scores over the rows' L slots: 0 where a query sees one;
                          # None where the pattern holds it
    page: torch.Tensor = None     # a level: (b, width) the pages of each row, in order; None where the rows'
                                  # slots lie in order (the model's stack; batch 1): KVCache.in_order
    pattern: torch.Tensor = None  # eager on a CPU, some rows, a token each: the slots they read (sparse_pattern)

    def attend(self, attn, q, k, v):
        """Write the chunk's k, v (b, Hkv, K, D) into attn's cache, then its queries q (b, H, K, D) attend there."""
        cache = attn.kv_cache
        cache.write(self.index, k, v)
        if self.pattern is not None:
            return attend_sparse(q, cache, self.pattern)
        if self.page is None:  # every cache row, each row's slots in order (KVCache.in_order)
            keys, values = cache.in_order(self.mask.size(-1))
            return attn.attend(q, keys.to(q.dtype), values.to(q.dtype), self.mask)
        keys, values = cache.pages(self.page)  # (b, Hkv, W, size, D)
        if torch.compiler.is_compiling():  # compiled: one fused loop reads the rows' pages where they are
            return attend_rows(q, keys, values, self.mask)
        # eagerly otherwise (a prompt's; bf16 on a CPU; a GPU): the rows' pages copied out, (b, Hkv, L, D)
        b, Hkv, W, P, D = keys.shape
        keys, values = keys.reshape(b, Hkv, W * P, D), values.reshape(b, Hkv, W * P, D)
        return attn.attend(q, keys.to(q.dtype), values.to(q.dtype), self.mask)


def attend_sparse(q, cache, pattern):
    """Attention of one query per row, q (b, H, 1, D), over its row's slots of the cache, reading them where they
    are (eager, on a CPU): pattern, a sparse (b * H, cache slots) CSR matrix, holds the slots each row and head
    scores, with the mask as its values. A sampled matmul computes the scores there only (SDDMM), a softmax, and a
    sparse matmul the weighted sum of the values: the other rows' pages are not read."""
    b, H, _, D = q.shape
    scores = torch.sparse.sampled_addmm(pattern, q.view(b * H, D), cache.k_t, alpha=D ** -0.5)
    weights = scores.values().view(b * H, -1)
    weights.copy_(torch.softmax(weights, dim=-1))  # scores becomes the attention weights
    return torch.mm(scores, cache.v).view(b, H, 1, D)


def attend_rows(q, keys, values, mask):
    """Attention of the queries q (b, H, K, D) over their rows' pages keys, values (b, Hkv, W, size, D), in order,
    under mask (b, 1, K, W * size), written as gathers, products and sums that the compiler fuses into loops reading
    the pages in place (SDPA or a matmul would first copy them out). Eager, it would materialize the products: eager
    decoding uses attend_sparse on a CPU, elsewhere SDPA over a copy (CacheContext.attend). fp32 scores and softmax,
    as SDPA's."""
    (b, H, K, D), dtype, (Hkv, W, P) = q.shape, q.dtype, keys.shape[1:4]
    k, v = keys.float()[:, :, None, None], values.float()[:, :, None, None]             # (b, Hkv, 1, 1, W, P, D)
    q = q.float().view(b, Hkv, H // Hkv, K, 1, 1, D)                                     # grouped-query heads
    scores = (q * k).sum(-1).flatten(-2) * D ** -0.5 + mask[:, :, None]                  # (b, Hkv, G, K, W * P)
    weights = torch.softmax(scores, -1).view(b, Hkv, H // Hkv, K, W, P, 1)
    return (weights * v).sum((-3, -2)).view(b, H, K, D).to(dtype)                        # summed over W, P


def cache_context(decoder, stack, K, valid, rows, sparse):
    """The CacheContext of a chunk of K tokens per row in a stack: valid (b, K) the real tokens (padding last;
    None: all of every row), rows (b,) their cache rows, whose cached lengths it advances (in place). Query i of
    cache row r sees slots 0 .. lens[r] + i: what its row cached, and the chunk up to itself; a padding token
    writes past its row's real ones, where no query looks and the next token writes. sparse: for attend_sparse."""
    lens, pages, column = decoder.lens[stack], decoder.pages[stack], decoder.lens_column[stack]
    every_row, Hkv = rows.size(0) == lens.size(0), pages.n_kv_head  # every row: in order
    first = column if every_row else column.index_select(0, rows)                     # (b, 1)
    last_seen = first if K == 1 else first + torch.arange(K, device=lens.device)       # (b, K)
    added = None if valid is None else valid.sum(1)                                    # (b,) real tokens
    slots = last_seen if added is None or K == 1 else torch.where(valid, last_seen, first + added[:, None])
    if not decoder.caches[stack]:  # recurrent blocks only: no cache to write or read
        cache = None
    elif pages.in_order:  # every row (the model's; batch 1): slot s of KV head h at its first page + kv_start[h] + s
        index = (pages.first + slots)[:, None] + pages.kv_start                        # (b, Hkv, K)
        cache = CacheContext(index, visible(decoder, last_seen, pages.width * pages.size))
    else:
        table = pages.spanned if every_row else pages.spanned.index_select(0, rows)    # (b, width)
        if sparse:  # the flat slots of the rows' pages in order, per query head (b, H, L): the pattern's columns
            flat = pages.slots(table, pages.head_base)
            index = flat[:, ::flat.size(1) // Hkv].gather(2, slots[:, None].expand(-1, Hkv, -1))  # (b, Hkv, K)
            cache = CacheContext(index, None, pattern=sparse_pattern(decoder, pages, flat, slots))
        else:
            index = (table.gather(1, slots // pages.size) + slots % pages.size)[:, None] + pages.kv_start
            cache = CacheContext(index, visible(decoder, last_seen, pages.width * pages.size), table // pages.size)
    if added is None and every_row:  # last: first may be a view of lens
        lens.add_(K)
    else:
        lens.index_add_(0, rows, torch.full_like(rows, K) if added is None else added)
    return cache


def visible(decoder, last_seen, L):
    """The mask (b, 1, K, L) of queries whose last slot seen is last_seen (b, K): 0 up to it, -inf after."""
    unseen = torch.arange(L, device=last_seen.device) > last_seen.view(-1, 1, last_seen.size(1), 1)
    return torch.zeros(unseen.shape, dtype=decoder.dtype, device=last_seen.device).masked_fill(unseen, -math.inf)


def sparse_pattern(decoder, pages, cols, slots):
    """attend_sparse's pattern for one token of each of b rows at slots (b, 1), whose pages' flat slots per query
    head are cols (b, H, L): a CSR matrix whose row (i, h) holds them, with the mask as values (-inf past the
    token's own slot)."""
    (b, H, L), n_slots = cols.shape, pages.pool * pages.n_kv_head * pages.size  # the caches' flat slots
    if L not in decoder.slot_numbers:
        decoder.slot_numbers[L] = torch.arange(L, device=slots.device).expand(H, -1)   # (H, L)
    bias = torch.zeros((), dtype=decoder.dtype).masked_fill(decoder.slot_numbers[L] > slots.view(b, 1, 1), -math.inf)
    crows = torch.arange(0, b * H * L + 1, L, device=slots.device)
    return torch.sparse_csr_tensor(crows, cols.view(-1), bias.view(-1), size=(b * H, n_slots), check_invariants=False)


def allocate(decoder, stack, rows, need):
    """Pages for the cache rows `rows` (b,) of a level to hold need (b,) slots each: the pages a row lacks, numbered
    on from those given out, on the device. The host reads how many are given out at the next route
    (Decoder.route), and grows the pool before anything is written there. Returns the pages given out and the most
    a row has: () each."""
    pages = decoder.pages[stack]
    P = pages.size
    have = pages.count.index_select(0, rows)                                           # (b,)
    new = ((need.clamp(max=decoder.max_len) + P - 1) // P - have).clamp(min=0)         # (b,) pages each lacks
    first = pages.used + new.cumsum(0) - new                                           # its first new page
    j = torch.arange(pages.table.size(1), device=rows.device)                          # (pages a row can have,)
    fresh = first[:, None] + torch.minimum(j - have[:, None], new[:, None] - 1)         # then its last, repeated
    table = torch.where((j >= have[:, None]) & (new[:, None] > 0), fresh * P, pages.table.index_select(0, rows))
    pages.table.index_copy_(0, rows, table)
    pages.count.index_copy_(0, rows, have + new)
    pages.used.add_(new.sum())
    return pages.used, pages.count.max()


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
    (the model's, each level's inside) the tokens each row has cached (on the device) and its Pages. The model's
    stack caches max_len slots a row; a level's caches are a pool of pages that it gives to its rows as they need
    them, so that it holds about what entered (vLLM's paged attention): every page_size steps (and with each chunk
    of several tokens), the first level's entry gives each row of every level room for page_size more slots, on the
    device, and the host, reading how many pages are given out with that entry's read, grows the pool when it must
    (page_size: PAGE_SIZE slots, at most max_len / 8).
    Under autocast the caches take its dtype (bf16: half the memory of fp32). decoder(idx) feeds the next chunk
    (B, T) of every row (eval mode) and returns forward's (logits, loss)."""

    def __init__(self, model, batch_size, max_len, compiled=False, page_size=None):
        self.model, self.batch_size, self.max_len, self.fed = model, batch_size, max_len, 0
        self.page_size = page_size or max(1, min(PAGE_SIZE, max_len // 8))
        self.ops = [('embed', None), *decode_program(model.stack), ('head', None)]
        self.skip_to = {}  # the op after each level's exit: where a chunk goes on when no token enters the level
        for i, (kind, layer) in enumerate(self.ops):
            if kind == 'exit':
                self.skip_to[next(j for j, op in enumerate(self.ops) if op == ('enter', layer))] = i + 1
        param, config = model.lm_head.weight, model.config
        device, device_type = param.device, param.device.type
        self.dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else param.dtype
        levels = model.levels()
        self.keep = {model.stack: 1.0, **{lv.inner: math.prod(config.keep_ratio_at(d) for d in range(1, lv.depth + 1))
                                          for lv in levels}}  # stack -> the fraction of the tokens expected there
        self.lens = {s: torch.zeros(batch_size, dtype=torch.long, device=device) for s in self.keep}
        self.lens_column = {s: lens.view(-1, 1) for s, lens in self.lens.items()}  # views (B, 1)
        Hkv, H, D = config.n_kv_head, config.n_head, config.n_embd // config.n_head
        self.pages, self.caches = {}, {s: [] for s in self.keep}  # stack -> its Pages; its blocks' KVCaches
        for stack in self.keep:  # the model's stack: a page of max_len slots a row; a level's: page_size
            size = max_len if stack is model.stack else self.page_size
            pages = Pages.make(batch_size, max_len, size, Hkv, H, device)
            self.pages[stack] = pages
            for layer in stack.layers:
                if isinstance(layer, RecurrentBlock):  # no KV cache: it carries its last window's state instead
                    layer.decoding, layer.state, layer.pending = True, None, None
                elif not isinstance(layer, Level):
                    layer.attn.kv_cache = KVCache(pages.pool, Hkv, pages.size, D, self.dtype, device, not pages.dense)
                    self.caches[stack].append(layer.attn.kv_cache)
        self.paged = [lv.inner for lv in levels if self.caches[lv.inner]]  # the levels whose blocks cache
        self.first_entry = next((i for i, (kind, _) in enumerate(self.ops) if kind == 'enter'), None)
        self.covered = 0  # the steps up to here have their pages: none to give out before (on the host)
        self.topup, self.chunk = False, 0  # this chunk gives out pages at the first level's entry; its tokens a row
        self.slot_numbers = {}  # attend_sparse's slot numbers 0 .. L - 1 of each query head, per L (sparse_pattern)
        self.static = bool(compiled)  # updated in place: a CUDA graph reads the lengths and caches where they are
        self.buckets = bool(compiled)  # static shapes: a level runs its entering rows padded to a bucket size
        for t in [*self.lens.values(), *(c for caches in self.caches.values() for kv in caches for c in (kv.k, kv.v)),
                  *(t for p in self.pages.values() for t in (p.table, p.count, p.used))]:
            self.mark_static(t)
        if compiled and any(isinstance(layer, RecurrentBlock) for layer in model.stack.layers):
            raise ValueError("compiled decoding does not support recurrent blocks ('R' in the structure): decode "
                             "this model without compile")
        self.run = compiled_segment(device_type, 'inductor' if compiled is True else compiled) if compiled else segment

    def __call__(self, idx, targets=None):
        """The next chunk idx (B, T) of every row through the caches: forward's (logits, loss). The host reads one
        set of numbers per level the chunk reaches (route); a prompt (T > 1) runs eagerly, a step as compiled."""
        B, T = idx.shape
        if self.fed + T > self.max_len:
            raise ValueError(f"sequence of {self.fed + T} tokens is longer than the caches' max_len={self.max_len}")
        self.topup = bool(self.paged) and (T > 1 or self.fed >= self.covered)
        self.fed, self.chunk = self.fed + T, T
        if self.topup:  # the pages given out now last page_size steps: a row brings a level a token a step at most
            self.covered = self.fed + self.page_size
        run = self.run if T == 1 else segment
        if run is not segment:  # CUDA graphs: a new step, whose replays may reuse the last step's output memory
            torch.compiler.cudagraph_mark_step_begin()
        frames, i, out = run(self, 0, None, None, (idx, targets))
        while i < len(self.ops):  # stopped at a level's entry; out: what to read, and what the entry needs after
            K, size = self.route(i, out[0], *frames[-1]['x'].shape[:2])
            if K == 0:  # no token enters: the level is the identity, go on after it
                frames, i, out = run(self, self.skip_to[i], frames, None, (idx, targets))
            else:
                frames, i, out = run(self, i, frames, (K, size, *out[1:]), (idx, targets))
        return out

    def given_out(self, i):
        """The levels whose pages the entry at op i gives out: at the first level's entry, when the chunk tops up,
        every level's; in a chunk of several tokens a row, also this level's, for what enters it."""
        stacks = self.paged if i == self.first_entry and self.topup else []  # (compiled: guards on topup there only)
        level = self.ops[i][1].inner
        return stacks + [level] if self.chunk > 1 and level in self.paged and level not in stacks else stacks

    def route(self, i, info, rows, T):
        """The one host read at a level's entry (op i), where `rows` bring T tokens each: info, the tokens that
        enter (several a row: the rows that enter, and the most a row brings), then the pages given out and the most
        a row has, for each level that gave out pages here (given_out). Returns K (0: no token enters) and how many
        of the `rows` reaching the level to run (those that enter; compiled, a bucket). Grows those levels' pools
        first, if they need it."""
        values = info.tolist()
        entering, K = (values[0], min(values[0], 1)) if T == 1 else values[:2]
        numbers = values[1 if T == 1 else 2:]
        for stack, used, most in zip(self.given_out(i), numbers[::2], numbers[1::2]):
            self.grow(stack, used, most)
        return K, bucket(entering, rows) if self.buckets else entering

    def grow(self, stack, used, most):
        """Room in a level's pool for the `used` pages given out, plus those its rows are expected to need until
        max_len (keep ratios' product, and CACHE_SLACK); attention spans at least the `most` pages a row has (plus
        what a row is expected to add: compiled, a new span is a new graph)."""
        pages, ahead = self.pages[stack], self.keep[stack] * (1 + CACHE_SLACK) * (self.max_len - self.fed)
        if used > pages.pool:
            pages.resize(used + math.ceil(self.batch_size * ahead / pages.size))
            for kv in self.caches[stack]:
                kv.grow(pages.pool)
                self.mark_static(kv.k)
                self.mark_static(kv.v)
        if most > pages.width:
            pages.span(min(pages.table.size(1), pages.pool, most + math.ceil(ahead / pages.size)))

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
            return frames, i, score_chunk(decoder, layer, f, i)
        elif kind == 'enter':
            frames.append(enter_level(decoder, layer, f, *entry, rope))
        elif kind == 'exit':
            exit_level(layer, frames.pop(), frames[-1])
        else:  # 'head'
            return frames, i + 1, model.head(f['x'], chunk[1])


def open_stack(decoder, stack, x, pos, valid, rows, rope, cos_sin=None):
    """A frame: the chunk x (b, K, C) of cache rows `rows` in a stack, with its cache context. cos_sin: the rotary
    tables at pos, when the frame it comes from has them."""
    # attend_sparse: a level's, a token per row, eagerly on a CPU in fp32 (the sparse kernels there; a GPU decodes
    # compiled: attend_rows)
    sparse = bool(x.size(1) == 1 and not decoder.pages[stack].in_order and x.device.type == 'cpu' and
                  decoder.caches[stack] and decoder.dtype in (torch.float32, torch.float64) and
                  not torch.compiler.is_compiling())
    cache = cache_context(decoder, stack, x.size(1), valid, rows, sparse)
    cos, sin = cos_sin or (rope[0][pos], rope[1][pos])
    return dict(x=x, pos=pos, valid=valid, rows=rows, cache=cache, cos=cos, sin=sin)


def score_chunk(decoder, level, f, i):
    """A level's selection of the chunk in frame f at op i, before the host read: (info to read, weights, counts).
    Gives out the pages that the chunk's tokens and the next steps need (Decoder.given_out)."""
    x, valid, rows, T = f['x'], f['valid'], f['rows'], f['x'].size(1)
    scores = level.score(x)                                                  # (b, T)
    selected = scores > 0 if valid is None else (scores > 0) & valid
    weights = scores.clamp(0, 1) if valid is None else scores.clamp(0, 1) * valid  # > 0 exactly where one enters
    counts = selected.sum(1)                                                 # (b,) tokens entering, per row
    offered, kept = counts.new_tensor(x.size(0) * T) if valid is None else valid.sum(), counts.sum()
    level.stats[:2].add_(torch.stack([offered, kept]))  # tokens offered and kept, for the logs
    info = [kept] if T == 1 else [(counts > 0).sum(), counts.max()]  # a step: a row brings one token or none
    for stack in decoder.given_out(i):
        lens = decoder.lens[stack]
        if stack is level.inner and decoder.chunk > 1:  # room for what enters, and the next steps
            info += allocate(decoder, stack, rows, lens.index_select(0, rows) + counts + decoder.page_size)
        else:  # every row: room for this step's token, if it enters, and the next steps (a chunk: the rows that
            every_row = torch.arange(decoder.batch_size, device=lens.device)  # reach a level get theirs there)
            info += allocate(decoder, stack, every_row, lens + (decoder.page_size + (decoder.chunk == 1)))
    return torch.stack(info), weights, counts


def enter_level(decoder, level, f, K, size, weights, counts, rope):
    """Into a level after the host read: its rows (the `size` rows of a bucket, those that enter first), their
    tokens that enter (K per row at most), and a frame for its stack."""
    x, pos, rows, order = f['x'], f['pos'], f['rows'], None
    if size < x.size(0):
        order = torch.topk(counts, size).indices  # entering rows first
        x, weights, rows = x.index_select(0, order), weights.index_select(0, order), rows.index_select(0, order)
        pos = pos if pos.size(0) == 1 else pos.index_select(0, order)
    if x.size(1) == 1:  # one token per row (a decode step): it is the short sequence, or padding (a bucket's)
        cos_sin = (f['cos'], f['sin']) if f['pos'].size(0) == 1 else None  # positions alike in all rows
        valid = weights > 0 if decoder.buckets else None  # eagerly, only the rows that enter
        index, short = None, open_stack(decoder, level.inner, x, pos, valid, rows, rope, cos_sin)
    else:  # weights as the scores: the same selection, and weights = clamp(s, 0, 1) for the kept tokens
        index, weights, inner_valid, _ = subsample_threshold(weights, None, K)  # (b, K)
        x_short, pos_short = gather_tokens(x, index), gather_tokens(pos.expand(x.size(0), -1), index)
        short = open_stack(decoder, level.inner, x_short, pos_short, inner_valid, rows, rope)
    return dict(short, x_in=x, order=order, index=index, weights=weights)


def exit_level(level, inner, f):
    """Out of a level: its rows' tokens scattered back (upsample) and mixed by the bypass, into frame f's x."""
    x, y, w = inner['x_in'], inner['x'], inner['weights']
    if inner['index'] is None:  # one token per row
        u = torch.lerp(x, y, w[..., None].to(y.dtype))  # x + w * (y - x)
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

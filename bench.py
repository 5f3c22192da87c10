"""
How much faster and lighter is SUBLLM than LLaMA on this machine? Measures both models of the same dims and blocks
(the LLaMA twin is the same structure without levels) in one process, their timed calls alternating (the speedup
is the median of the rounds' ratios, robust to other processes' load), at each context length:
- train:   forward + backward + AdamW step on the same batch (tokens/s, ms/iter, MFU, peak memory)
- prefill: eval forward of a whole prompt (tokens/s, peak memory)
- decode:  a prompt of half the length prefilled into the KV cache (untimed), then decode_tokens steps of one token
           per row, at batch 1 and at decode_batch (tokens/s); and at decode_batch_large if set (serving)
Beside each measured SUBLLM/LLaMA speedup it prints the theoretical one, the FLOP ratio of SUBLLM.md §9 at the keep
fractions the model really used (train: the config's, exact with top-k; prefill and decode: the measured fraction of
tokens whose score was > 0, per level), and for decode the ratio of blocks run per token and per step, so the gap
shows the overhead of scoring, sorting, gathering and scattering.

    python bench.py                              # GPU: the 0.25B paper config at 2k,4k,8k; CPU: a tiny one, < 1 min
    python bench.py --preset=mid                 # 32.6M params, T=1024, decode at batch 1, 4 and 64: ~6 min on a CPU
    python bench.py --preset=1300m --json=bench_1300m.json
    python bench.py --init_from=out-subllm-250m  # dims and trained scorers of a train.py checkpoint
    python bench.py --structure=R --seq_lens=256,512,1024,2048,4096   # a recurrent block against one plain block

A structure with recurrent blocks ('R') is measured against the same structure with each R a plain block (its
LLaMA twin): the recurrent model's cost per token stays flat as the sequence grows, the twin's attention does not.

Inputs are random tokens. Memory is torch.cuda.max_memory_allocated on GPU and the peak RSS of the process (above
its level before the measurement) on CPU. Times are wall time on a GPU, and on a CPU the process's CPU time (one
thread by default), which other processes on a shared machine do not stretch. Every global in the first section
is a --key=value flag.
"""
import ctypes
import gc
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from json import dump

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from configurator import check_ranges, configure
from flops import forward_flops, gpu_peak_flops
from generate import Decoder
from model import SubLLM, SubLLMConfig, Level, RecurrentBlock, llama_twin
from run_dir import load_checkpoint

PAPER = 'TTTTT(TTTTT(TTTT)TTTTT)TTTTT'  # 24 blocks, two nested levels (SUBLLM.md §2)
PRESETS = {  # the paper's two sizes, and a tiny and a mid-sized one for a CPU (mid: ~6 min on 2 busy cores)
    'tiny': dict(n_embd=128, n_head=4, ffn_hidden=512, vocab_size=512, structure='TT(TT(TT)TT)TT',
                 seq_lens='256,512', tokens_per_batch=1024),
    'mid': dict(n_embd=512, n_head=8, ffn_hidden=1408, vocab_size=512, structure='TT(TT(TT)TT)TT',  # 32.6M
                seq_lens='1024', tokens_per_batch=2048, decode_batch=4, decode_tokens=64, iters=5,
                decode_batch_large=64, decode_tokens_large=16),
    '250m': dict(n_embd=768, n_head=12, ffn_hidden=2048, vocab_size=50304, structure=PAPER,
                 seq_lens='2048,4096,8192', tokens_per_batch=16384),
    '1300m': dict(n_embd=2048, n_head=16, ffn_hidden=5504, vocab_size=32000, structure=PAPER,
                  seq_lens='2048,4096,8192', tokens_per_batch=8192),
}
GPU_DEFAULTS = dict(decode_batch=8, decode_tokens=64, warmup=3, iters=10, dtype='bfloat16', compile=True)
# -----------------------------------------------------------------------------
device = 'auto'                    # 'auto' (cuda if available, else cpu), 'cpu', 'cuda'
preset = 'auto'                    # tiny, mid, 250m or 1300m: the dims, structure, lengths below; auto: 250m on a GPU,
                                   # tiny on a CPU. A setting given explicitly wins over the preset's
n_embd = 0                         # 0 (and '' below): the preset's value
n_head = 0
ffn_hidden = 0
vocab_size = 0
structure = ''                     # T = a block, ( ) = a subsampled level, R = a recurrent block
seq_lens = ''                      # context lengths to measure, comma separated
tokens_per_batch = 0               # train and prefill: batch = tokens_per_batch // seq_len (at least 1)
n_kv_head = 0                      # 0: same as n_head (no grouped-query attention)
keep_ratio = 0.64                  # one float, or a tuple with one per level depth
selection = 'topk'                 # training-time selection: 'topk' or 'threshold' (fixed capacity, see model.py)
capacity_slack = 0.25              # threshold: room for keep * T * (1 + slack) tokens per level
rec_window = 16                    # tokens per window of the recurrent blocks ('R' in the structure)
batch_size = 0                     # train and prefill: 0 means tokens_per_batch // seq_len (at least 1)
decode_batch = 4                   # decode is measured at batch 1 and at this batch (8 on a GPU)
decode_tokens = 32                 # timed decode steps after the prompt (half the length) is prefilled (64 on GPU)
decode_batch_large = 0             # a third decode batch, large (serving), where a step's cost grows with its rows:
                                   # 0 = none (mid preset: 64)
decode_tokens_large = 16           # timed decode steps at decode_batch_large
modes = 'train,prefill,decode'     # what to measure, comma separated
warmup = 1                         # untimed iterations first (compilation, allocator, lazy optimizer state; 3 on GPU)
iters = 3                          # timed iterations (10 on a GPU)
dtype = 'float32'                  # 'float32' (no autocast), or autocast to 'bfloat16' (the GPU default) / 'float16'
compile = False                    # torch.compile the train and prefill forwards and the decode step (generate.py's
                                   # segments between host reads; CUDA graphs on a GPU). True on GPU
threads = 1                        # CPU: torch threads, 0 = torch's default (one per core). A tiny model gains
                                   # little from more, and they slow each other down badly on a busy machine
init_from = ''                     # a train.py out_dir: its ckpt.pt gives the dims and the (trained) scorers
json = ''                          # write one record per measurement to this path
seed = 1337
user_keys = configure(globals(), tuples=('keep_ratio',))  # --key=value, or a config file (configurator.py)
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
if device != 'cpu' and not device.startswith('cuda'):
    sys.exit(f"bench.py: --device must be auto, cpu or cuda, got {device!r}")
if device.startswith('cuda') and not torch.cuda.is_available():
    sys.exit(f"bench.py: --device={device}, but this torch sees no CUDA GPU: use --device=cpu")
gpu = device.startswith('cuda')
if preset == 'auto':
    preset = '250m' if gpu else 'tiny'
if preset not in PRESETS:
    sys.exit(f"bench.py: unknown --preset={preset}; choose one of {', '.join(PRESETS)}")
for key, value in {**PRESETS[preset], **(GPU_DEFAULTS if gpu else {})}.items():
    if key not in user_keys:  # the preset's and the GPU's defaults, under what was given explicitly
        globals()[key] = value
# every setting checked here, before anything runs: one line each
check_ranges(globals(), {
    'n_embd': '[1, inf)', 'n_head': '[1, inf)', 'ffn_hidden': '[1, inf)', 'vocab_size': '[1, inf)',
    'tokens_per_batch': '[1, inf)', 'n_kv_head': ('[0, inf)', ' (0: n_head)'), 'keep_ratio': '(0, 1]',
    'capacity_slack': '[0, inf)', 'rec_window': '[1, inf)', 'batch_size': ('[0, inf)', ' (0: tokens_per_batch)'),
    'decode_batch': '[1, inf)', 'decode_tokens': '[1, inf)', 'warmup': '[0, inf)', 'iters': '[1, inf)',
    'decode_batch_large': ('[0, inf)', ' (0: none)'), 'decode_tokens_large': '[1, inf)',
    'threads': ('[0, inf)', " (0: torch's default)"), 'seed': '[0, inf)'}, error=lambda m: SystemExit('bench.py: ' + m))
if not re.fullmatch(r'\d+(,\d+)*', seq_lens) or min(int(t) for t in seq_lens.split(',')) < 2:
    sys.exit(f"bench.py: --seq_lens must be context lengths of at least 2, separated by commas (e.g. 256,512), got "
             f"{seq_lens!r}")
if json and not os.path.isdir(os.path.dirname(os.path.abspath(json))):
    sys.exit(f"bench.py: --json={json}: there is no directory {os.path.dirname(os.path.abspath(json))} to write it in")
try:  # the settings, or the checkpoint's model, make a model of this model.py (checked on the meta device: no memory)
    if init_from:  # a train.py checkpoint (or ckpt_prev.pt, the one before it, if ckpt.pt is damaged)
        ckpt, _ = load_checkpoint(init_from, missing=f"bench.py: --init_from={init_from}: no checkpoint at "
                                                     f"{os.path.join(init_from, 'ckpt.pt')} (give a train.py out_dir)")
        with torch.device('meta'):
            shapes = {k: v.shape for k, v in SubLLM(SubLLMConfig(**ckpt['model_args'])).state_dict().items()}
        if shapes != {k.removeprefix('_orig_mod.'): getattr(v, 'shape', None) for k, v in ckpt['model'].items()}:
            raise ValueError("its weights do not fit the model that its model_args make with this model.py")
    else:
        SubLLMConfig(vocab_size=vocab_size, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head or None,
                     ffn_hidden=ffn_hidden, structure=structure, keep_ratio=keep_ratio, selection=selection,
                     capacity_slack=capacity_slack, rec_window=rec_window)
except (TypeError, ValueError, AttributeError) as e:
    sys.exit(f"bench.py: {'the checkpoint in ' + init_from if init_from else 'bad model settings'}: {e}")
# -----------------------------------------------------------------------------

torch.manual_seed(seed)
if not gpu and threads:
    torch.set_num_threads(threads)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
device_type = 'cuda' if gpu else 'cpu'
if dtype not in ('float32', 'bfloat16', 'float16'):
    sys.exit(f"bench.py: --dtype must be float32, bfloat16 or float16, got {dtype!r}")
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
# fp16 would need a GradScaler to train for real; the speed of a step is the same without one
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
lengths = [int(t) for t in seq_lens.split(',')]
unknown = [m for m in modes.split(',') if m not in ('train', 'prefill', 'decode')]
if unknown:
    sys.exit(f"bench.py: unknown mode {unknown[0]!r} in --modes; choose from train, prefill, decode")
block_size = max(max(lengths), max(lengths) // 2 + max(decode_tokens, decode_tokens_large))  # RoPE: the longest input
if init_from:
    config = replace(SubLLMConfig(**ckpt['model_args']), block_size=block_size)
    subllm = SubLLM(config)
    subllm.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in ckpt['model'].items()})
    del ckpt
else:
    config = SubLLMConfig(vocab_size=vocab_size, block_size=block_size, n_embd=n_embd, n_head=n_head,
                          n_kv_head=n_kv_head or None, ffn_hidden=ffn_hidden, structure=structure,
                          keep_ratio=keep_ratio, selection=selection,
                          capacity_slack=capacity_slack, rec_window=rec_window)
    subllm = SubLLM(config)
if compile and 'decode' in modes.split(',') and 'R' in config.structure:
    sys.exit("bench.py: compiled decoding does not support recurrent blocks ('R'): use --modes=train,prefill with "
             "--compile=True, or --compile=False")
models = {'llama': SubLLM(llama_twin(config)).to(device), 'subllm': subllm.to(device)}
label = 'recurrent' if 'R' in config.structure else 'SUBLLM'  # the model measured against its LLaMA twin
calibrate = not init_from  # a checkpoint's scorers are trained: measure the fractions they keep


@torch.no_grad()
def calibrate_scorers(model, run, start=0):
    """Make eval-mode `score > 0` keep keep_ratio of the tokens that reach each level in run() (a measurement's own
    forward passes: its inputs, mode and batch), as a trained model does on text (there, Level.track_cut has moved
    each level's score_offset to its top-k cut). A random-init model's offsets are 0, so it would keep about half of
    the tokens, and its scores carry a large shift per sequence: an offset fitted on other random sequences kept
    0.25 to 0.72 of one sequence's tokens at level 2 (mid preset). So each level's score_offset is set to the
    (1 - keep_ratio) quantile of its raw scores in run(), counting the real tokens (not padding) at positions >=
    start (decode: the decoded tokens, not the prompt). Depth by depth: which tokens reach a level depends on the
    offsets of the levels it sits in, and the scores of the tokens that reach it are the same in run() and in the
    measurement after it."""
    model.eval()
    levels = model.levels()
    for depth in sorted({level.depth for level in levels}):
        seen = {level: [] for level in levels if level.depth == depth}
        context, hooks = {}, []
        for level in seen:  # Level.forward(x, pos, rope, valid, rows) calls its scorer first
            hooks.append(level.register_forward_pre_hook(
                lambda lv, args: context.__setitem__(lv, (args[1], args[3]))))
            hooks.append(level.scorer.register_forward_hook(
                lambda _, args, out, lv=level: seen[lv].append(scores_counted(out, *context[lv], start))))
        try:
            with ctx:
                run()
        finally:
            for hook in hooks:
                hook.remove()
        for level, scores in seen.items():
            scores = torch.cat(scores) if scores else torch.zeros(0)
            if scores.numel():  # no token reached the level: its offset stays
                level.score_offset.fill_(torch.quantile(scores, 1 - level.keep_ratio))


def scores_counted(out, pos, valid, start):
    """A scorer's raw scores (B, T, 1) of the real tokens at positions >= start, flat. pos (B or 1, T); valid (B, T)
    bool or None (no padding)."""
    scores = out.squeeze(-1).float()
    counted = (pos >= start).expand_as(scores)
    return scores[counted if valid is None else counted & valid]


# torch.compile: static shapes, one graph per length and mode (SUBLLM's eval forward too: its data-dependent short
# lengths are sizes inside the graph, model.subsample_eval)
forwards = {name: torch.compile(m, dynamic=False) if compile else m for name, m in models.items()}
peak_flops = gpu_peak_flops() if gpu else None

# -----------------------------------------------------------------------------
# memory: CUDA peak allocated, or the peak RSS of the process (Linux VmHWM, reset through /proc/self/clear_refs)


def rss_bytes(field):
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


if not gpu:  # glibc: every tensor of 64 KiB or more gets its own mapping, returned to the OS when freed. Its default
    try:      # threshold rises as large blocks are freed, and then later tensors come from the heap, which fragments:
        ctypes.CDLL(None).mallopt(-3, 64 * 1024)  # the second model measured peaked 16-23% higher than alone
    except (AttributeError, OSError):  # M_MMAP_THRESHOLD = -3; not glibc: the allocator as it is
        pass


def mem_start():
    gc.collect()
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # give freed heap back to the OS, so the peak is this run's (glibc)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM (the peak RSS) to the current RSS
        return rss_bytes('VmRSS')
    except (AttributeError, OSError, TypeError):  # not Linux: no per-run peak, the table shows '-'
        return None


def mem_peak(start, model):
    """Bytes a run needed at its peak. GPU: peak allocated above the level before the run, plus the model's own
    weights (so the other model, resident in the same process, is not counted). CPU: peak RSS above the start."""
    if gpu:
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        return torch.cuda.max_memory_allocated() - start + weights
    return None if start is None else rss_bytes('VmHWM') - start


def sync():
    if gpu:
        torch.cuda.synchronize()


# The timer of a measured call: on a GPU the wall clock (after a sync); on a CPU this process's CPU time, which the
# other processes of a shared machine do not stretch (the process runs `threads` threads, one by default)
clock = time.perf_counter if gpu else time.process_time

# -----------------------------------------------------------------------------
# one measurement: RUNS[mode](name, tokens, B, T) sets a model up and returns (call, result). call() runs one timed
# iteration; result(n_calls), after the timed calls, gives a dict: steps per call, tokens and FLOPs per step, keep
# fractions, and for decode the blocks per token and per step. A step is an iteration, or one token per row.


def keep_fractions(stats):
    """Eval keep fraction per level depth (kept / offered: a fraction of the parent's tokens) from level_stats rows."""
    sums = {}
    for depth, n_in, n_kept in stats:
        total_in, total_kept = sums.get(depth, (0, 0))
        sums[depth] = (total_in + n_in, total_kept + n_kept)
    return [n_kept / max(1, n_in) for _, (n_in, n_kept) in sorted(sums.items())]


def own_blocks(stack):
    return sum(not isinstance(layer, Level) for layer in stack.layers)


def run_train(name, tokens, B, T):
    model, forward = models[name], forwards[name]
    x, y = tokens[:, :T], tokens[:, 1:T + 1]
    model.train()
    opt = model.configure_optimizers(0.0, 0.0, (0.9, 0.95), device_type)  # lr 0: a full step, weights unchanged

    def step():
        with ctx:
            _, loss = forward(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def result(n_calls):  # backward = 2 forwards
        return dict(steps=1, tokens=B * T, flops=3 * B * forward_flops(model, T), keep=training_keep(model, T))
    return step, result


def training_keep(model, T):
    """Per level depth, the fraction of its parent's tokens a level runs in training: top-k's ceil(keep * T), or
    the fixed capacity of threshold selection (padding included)."""
    lengths = {0: T}
    for level in model.levels():  # pre-order: a level comes before the levels inside it
        lengths[level.depth] = level.training_length(lengths[level.depth - 1])
    return [lengths[d] / lengths[d - 1] for d in sorted(lengths) if d > 0]


def run_prefill(name, tokens, B, T):
    model, forward = models[name], forwards[name]
    x = tokens[:, :T]
    model.eval()

    @torch.no_grad()
    def prefill():
        with ctx:
            forward(x)

    def result(n_calls):  # the level counters add up the timed calls: the same input keeps the same tokens
        keep = keep_fractions(model.level_stats())
        flops = forward_flops(model, T, keep) - 2 * (T - 1) * config.n_embd * config.vocab_size  # logits: last only
        return dict(steps=1, tokens=B * T, flops=B * flops, keep=keep)
    return prefill, result


def run_decode(name, tokens, B, T):
    """Prefill half the length into the KV caches (here, untimed); then each call rewinds the caches to the prompt
    and decodes decode_tokens steps of one token per row (compiled with --compile=True). Each step feeds the next
    input token rather than the argmax: a random model's greedy output tends to repeat one token, which its levels
    would then all keep or all skip; random tokens keep what the calibration set (same cost). Every call routes the
    same tokens the same way; the first (untimed) also runs them once eagerly, counted (count_decode)."""
    model, P, steps = models[name], T // 2, tokens_to_decode(B)
    model.eval()
    with torch.no_grad(), ctx:  # under autocast: keys and values in its dtype
        decoder = Decoder(model, B, P + steps, compiled=compile)
        decoder(tokens[:, :P])
    rewind = decode_rewind(decoder)
    counted = {}

    @torch.no_grad()
    def decode():
        rewind()
        if not counted:
            counted.update(count_decode(decoder, tokens, P, steps))
            model.reset_level_stats()
            rewind()
        with ctx:
            for j in range(steps):
                decoder(tokens[:, P + j:P + j + 1])  # (B, 1): the next token of every row

    def result(n_calls):
        stats = model.level_stats()  # the timed calls' decoded tokens
        # blocks a decoded token runs on average: the outer ones, plus each level's own blocks times the tokens it took
        inner = sum(own_blocks(level.inner) * n_kept for level, (_, _, n_kept) in zip(model.levels(), stats))
        blocks = own_blocks(model.stack) + inner / (B * steps * n_calls)
        # blocks a step runs for at least one row: the weights it reads (a step at a small batch is bound by them)
        step_blocks = own_blocks(model.stack) + sum(own_blocks(level.inner) * counted['runs'][level]
                                                    for level in model.levels()) / steps
        # FLOPs per decoded token: the cost model's marginal cost of tokens P+1..P+N (weights + attention over cache)
        keep = keep_fractions(stats)
        flops = (forward_flops(model, P + steps, keep) - forward_flops(model, P, keep)) / steps
        cache = decoder.cache_bytes()
        decoder.close()
        return dict(steps=steps, tokens=B, flops=B * flops, keep=keep, blocks_per_token=blocks,
                    blocks_per_step=step_blocks, ops_per_step=counted['ops'] / steps,
                    reads_per_step=counted['reads'] / steps, cache_bytes=cache)
    return decode, result


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run under it (the kernels an eager step launches), and the reads of a number from a
    device tensor to the host (.item(): aten._local_scalar_dense)."""

    def __init__(self):
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def count_decode(decoder, tokens, P, steps):
    """The decode steps once, eagerly, counted: per level the steps in which it ran its blocks for some row; the
    aten ops; the host reads (Decoder.route's, the only ones by design, and any .item())."""
    model, counter = decoder.model, OpCounter()
    runs, route, reads = {level: 0 for level in model.levels()}, decoder.route, []
    decoder.route = lambda *args: reads.append(1) or route(*args)
    try:
        for j in range(steps):
            kept = [level.stats[1].item() for level in model.levels()]
            with torch.compiler.set_stance('force_eager'), ctx, counter:
                decoder(tokens[:, P + j:P + j + 1])
            for level, before in zip(model.levels(), kept):
                runs[level] += level.stats[1].item() > before
    finally:
        decoder.route = route
    return dict(runs=runs, ops=counter.ops, reads=len(reads) + counter.reads)


def tokens_to_decode(B):
    return decode_tokens_large if decode_batch_large and B == decode_batch_large else decode_tokens


def decode_rewind(decoder):
    """A function that sets a decoder's state back to what it is now: each stack's cache lengths and pages given out
    (in place, on the device), the tokens fed and the step that gives out pages next, and the window state of each
    recurrent block. Cached keys and values past those lengths need no reset: a step reads no slot past its own,
    which it has just written; pages given out again are given the same numbers, into a pool at least as large."""
    lens = {stack: lens.clone() for stack, lens in decoder.lens.items()}
    pages = {stack: (p.count.clone(), p.used.clone()) for stack, p in decoder.pages.items()}
    states = [(block, block.state, block.pending) for block in decoder.model.modules()
              if isinstance(block, RecurrentBlock)]
    fed, covered = decoder.fed, decoder.covered

    def rewind():
        for stack, cache_lens in lens.items():
            decoder.lens[stack].copy_(cache_lens)
        for stack, (count, used) in pages.items():
            decoder.pages[stack].count.copy_(count)
            decoder.pages[stack].used.copy_(used)
        decoder.fed, decoder.covered = fed, covered
        for block, state, pending in states:
            block.state, block.pending = state, pending
    return rewind


def calibration_run(mode, tokens, B, T):
    """What calibrate_scorers runs for a prefill or decode measurement of SUBLLM, and the first position it counts:
    the same inputs and batch, through the full forward (the eval selection is causal: a decoded token scores
    there what it scores in the decode step)."""
    model, P, steps = models['subllm'], T // 2, tokens_to_decode(B)
    if mode == 'prefill':
        return lambda: model(tokens[:, :T]), 0
    return lambda: model(tokens[:, :P + steps]), P


RUNS = {'train': run_train, 'prefill': run_prefill, 'decode': run_decode}

# -----------------------------------------------------------------------------
# the sweep: at each length and mode, LLaMA and SUBLLM on the same inputs, their timed calls alternating


def is_oom(e):  # CUDA's allocator, also when torch.compile wraps its error, or the CPU's
    return isinstance(e, torch.cuda.OutOfMemoryError) or any(s in str(e) for s in ('out of memory', "can't allocate"))


def attempt(record, fn):
    """fn(); False, with the record marked OOM, if it ran out of memory."""
    try:
        fn()
        return True
    except RuntimeError as e:
        if is_oom(e):
            record['oom'] = True
            return False
        if compile and isinstance(e, torch._dynamo.exc.TorchDynamoException):
            sys.exit(f"bench.py: torch.compile failed ({type(e).__name__}: {str(e).strip().splitlines()[0]}); "
                     f"rerun with --compile=False")
        raise


def compile_counts():
    """(graphs compiled, graph breaks) so far in this process, torch.compile's counters."""
    counters = torch._dynamo.utils.counters
    return counters['stats']['unique_graphs'], sum(counters['graph_break'].values())


def measure_pair(mode, tokens, B, T):
    """Both models at one mode, length and batch. Each is set up and warmed up in turn (at least one call: its peak
    memory is measured there); then their timed calls alternate, LLaMA-SUBLLM then SUBLLM-LLaMA, so that a change in
    the machine's speed (other processes) hits both. A model's time per call is the median of its calls; the
    speedup, the median over the rounds of LLaMA's time over SUBLLM's in the same round (adjacent calls), which
    a burst of load on one call of a round moves less. SUBLLM's random scorers are first calibrated on this
    measurement's own forward passes (calibrate_scorers)."""
    records = {name: dict(mode=mode, model=name, seq_len=T, batch_size=B, tokens_per_s=None, ms_per_iter=None,
                          ms_samples=None, peak_mem_bytes=None,
                          mem_kind='cuda_max_allocated' if gpu else 'cpu_peak_rss_delta', mfu=None, flops=None,
                          keep_fractions=None, blocks_per_token=None, blocks_per_step=None, oom=False,
                          graphs=None, graph_breaks=None, ops_per_step=None, reads_per_step=None, cache_bytes=None)
               for name in models}
    calls, peaks, times = {}, {}, {name: [] for name in models}
    offsets = [level.score_offset.clone() for level in models['subllm'].levels()]
    try:
        for name, model in models.items():
            if name == 'subllm' and calibrate and mode != 'train':
                if not attempt(records[name], lambda: calibrate_scorers(model, *calibration_run(mode, tokens, B, T))):
                    continue
            start, compiled = mem_start(), compile_counts()

            def setup():
                calls[name] = RUNS[mode](name, tokens, B, T)
                for _ in range(max(1, warmup)):
                    calls[name][0]()
                sync()
            if attempt(records[name], setup):
                peaks[name] = mem_peak(start, model)
                model.reset_level_stats()
            if compile:  # graphs compiled in the warmup (compilation is not timed), and breaks
                graphs, breaks = compile_counts()
                records[name].update(graphs=graphs - compiled[0], graph_breaks=breaks - compiled[1])
        live = [name for name in models if not records[name]['oom']]
        for i in range(iters):
            for name in live if i % 2 == 0 else live[::-1]:
                if records[name]['oom']:
                    continue
                t0 = clock()
                if attempt(records[name], lambda: (calls[name][0](), sync())):
                    times[name].append(clock() - t0)
        for name, record in records.items():
            if not record['oom']:
                out = calls[name][1](len(times[name]))
                dt = statistics.median(times[name]) / out['steps']
                record.update(tokens_per_s=out['tokens'] / dt, ms_per_iter=1000 * dt,
                              ms_samples=[1000 * t / out['steps'] for t in times[name]], peak_mem_bytes=peaks[name],
                              mfu=peak_flops and out['flops'] / dt / peak_flops, flops=out['flops'],
                              keep_fractions=out['keep'], **{k: out.get(k) for k in (
                                  'blocks_per_token', 'blocks_per_step', 'ops_per_step', 'reads_per_step',
                                  'cache_bytes')})
        if len(times['llama']) == len(times['subllm']) == iters:  # the rounds, as LLaMA's time over SUBLLM's
            records['subllm']['round_ratios'] = [t / s for t, s in zip(times['llama'], times['subllm'])]
    finally:
        if mode == 'train':  # training moved the offsets (Level.track_cut): back to the trained or calibrated ones
            for level, offset in zip(models['subllm'].levels(), offsets):
                level.score_offset.copy_(offset)
    calls.clear()  # optimizer states, caches
    for name, record in records.items():
        if record['oom']:
            models[name].zero_grad(set_to_none=True)
            for block in models[name].blocks():  # the caches of a decoder that ran out of memory
                block.attn.kv_cache = None
    gc.collect()
    if gpu and any(r['oom'] for r in records.values()):
        torch.cuda.empty_cache()
    return records


jobs = []
for T in lengths:
    for mode in modes.split(','):
        batches = [1, decode_batch] + ([decode_batch_large] if decode_batch_large else [])
        for B in (batches if mode == 'decode' else [batch_size or max(1, tokens_per_batch // T)]):
            jobs.append((mode, T, B))
n_params = {name: m.get_num_params() for name, m in models.items()}
print(f"device {device} ({torch.cuda.get_device_name() if gpu else 'CPU'}), dtype {dtype}, compile {compile}, "
      f"torch {torch.__version__}")
print(f"{label} {config.structure} keep {config.keep_ratio} ({config.selection} selection)"
      + (f", rec_window {config.rec_window}" if 'R' in config.structure else '')
      + f", n_embd {config.n_embd}, n_head {config.n_head}, "
      f"ffn {config.ffn_hidden}, vocab {config.vocab_size}: {n_params['subllm'] / 1e6:.1f}M params "
      f"(LLaMA twin {n_params['llama'] / 1e6:.1f}M), "
      + (f"scorers from {init_from}" if init_from else
         f"random weights, score offsets calibrated to keep {keep_ratio} in each prefill and decode measurement"))
records = []
t_start = time.perf_counter()
pbar = tqdm(total=len(jobs), desc='bench', unit='job')
for mode, T, B in jobs:
    pbar.set_postfix_str(f"{mode} T={T} B={B}")
    n = max(T, T // 2 + max(decode_tokens, decode_tokens_large)) + 1  # inputs and targets; decode reads the prompt
    # (T // 2) and the tokens it decodes
    tokens = torch.randint(config.vocab_size, (B, n), generator=torch.Generator().manual_seed(T)).to(device)
    pair = measure_pair(mode, tokens, B, T)
    base = pair['llama']
    for r in pair.values():  # relative to LLaMA: speedup, FLOP ratio (LLaMA / this), memory ratio (this / LLaMA)
        ok = not (r['oom'] or base['oom'])
        rounds = r.get('round_ratios')  # the same tokens per call: speed ratio = time ratio
        r.update(ratio=(statistics.median(rounds) if rounds else r['tokens_per_s'] / base['tokens_per_s']) if ok
                 else None,
                 flop_ratio=base['flops'] / r['flops'] if ok else None,
                 mem_ratio=r['peak_mem_bytes'] / base['peak_mem_bytes'] if ok and base['peak_mem_bytes'] else None,
                 blocks_ratio=base['blocks_per_token'] / r['blocks_per_token'] if ok and mode == 'decode' else None,
                 step_blocks_ratio=base['blocks_per_step'] / r['blocks_per_step'] if ok and mode == 'decode' else None)
        # the speedup over its limit: the FLOP ratio, or for decode the blocks ratio per token (and per step)
        limit = r['blocks_ratio'] if mode == 'decode' else r['flop_ratio']
        r['limit_share'] = r['ratio'] / limit if ok and label == 'SUBLLM' else None
        r['step_limit_share'] = r['ratio'] / r['step_blocks_ratio'] if ok and label == 'SUBLLM' and mode == 'decode' \
            else None
    records += pair.values()
    pbar.update()
pbar.close()
elapsed = time.perf_counter() - t_start

# -----------------------------------------------------------------------------
# report

unit, scale = ('GiB', 2 ** 30) if gpu else ('MiB', 2 ** 20)
mem_label = f"{unit} ({'CUDA max allocated' if gpu else 'peak RSS delta'})"


def fmt(value, spec, missing='-'):
    return missing if value is None else format(value, spec)


depths = sorted({level.depth for level in models['subllm'].levels()})
targets = ', '.join(f"{config.keep_ratio_at(d):g}" for d in depths)  # the keep ratio per level depth
print(f"\n| mode | seq_len | batch | LLaMA tok/s | {label} tok/s | speedup | FLOP ratio | "
      f"blocks/token, /step (ratio) | of limit | ms/iter LLaMA / {label} | mem {mem_label} LLaMA / {label} | "
      f"MFU LLaMA / {label} | {label} keep ({'trained' if init_from else 'target ' + targets}) |")
print('|' + '---|' * 13)
for llama, sub in zip(records[::2], records[1::2]):
    oom = [r['oom'] and 'OOM' or '-' for r in (llama, sub)]
    tps = [fmt(r['tokens_per_s'], ',.0f', o) for r, o in zip((llama, sub), oom)]
    mem = [fmt(r['peak_mem_bytes'] and r['peak_mem_bytes'] / scale, '.2f', o) for r, o in zip((llama, sub), oom)]
    keep = ', '.join(f"{k:.2f}" for k in sub['keep_fractions']) if sub['keep_fractions'] else '-'
    share = fmt(sub['limit_share'], '.0%') + (f", {sub['step_limit_share']:.0%}" if sub['step_limit_share'] else '')
    blocks = f"{sub['blocks_per_token']:.1f}, {sub['blocks_per_step']:.1f} of {llama['blocks_per_token']:.0f} " \
        f"({sub['blocks_ratio']:.2f}x, {sub['step_blocks_ratio']:.2f}x)" if sub['blocks_ratio'] else '-'
    print(f"| {sub['mode']} | {sub['seq_len']} | {sub['batch_size']} | {tps[0]} | {tps[1]} | "
          f"{fmt(sub['ratio'], '.2f')}x | {fmt(sub['flop_ratio'], '.2f')}x | {blocks} | "
          f"{share} | "
          f"{fmt(llama['ms_per_iter'], '.1f')} / {fmt(sub['ms_per_iter'], '.1f')} | {mem[0]} / {mem[1]} | "
          f"{fmt(llama['mfu'], '.1%')} / {fmt(sub['mfu'], '.1%')} | {keep} |")
print("\nspeedup = SUBLLM's speed over LLaMA's: the median over the rounds of timed calls (one call of each model, "
      "adjacent) of LLaMA's time over SUBLLM's; tok/s and ms/iter are each model's median. FLOP ratio = LLaMA "
      "FLOPs over SUBLLM's (SUBLLM.md §9) at the keep fractions used: train = what training runs (top-k: the "
      "config's; threshold: its capacity, padding included), prefill and decode = the measured eval keep "
      "(score > 0) per level depth, a fraction of the parent's tokens (SUBLLM keep). Decode counts the weights, the "
      "logits and the attention over the cache per token; its ms/iter is one step of one token per row. "
      "blocks/token is the average number of blocks a decoded token runs, /step the blocks a step runs for at "
      "least one of its rows (ratios: LLaMA's over SUBLLM's): the limit where a block costs its rows' work, and "
      "where it costs its weights' reading whatever rows it runs (small batches; the same at batch 1). of limit = "
      "speedup over the FLOP ratio (train, prefill), or for decode over the blocks/token ratio, then over the "
      "blocks/step ratio: which one binds depends on the batch (batch 1: both the same; a few rows: the weights "
      "read, blocks/step; many rows: their work, blocks/token). MFU: model FLOPs (causal "
      "attention counted as half of full attention) over the GPU's dense bf16 peak.")
decodes = [(llama, sub) for llama, sub in zip(records[::2], records[1::2]) if sub['mode'] == 'decode'
           and sub['ops_per_step'] is not None and llama['ops_per_step'] is not None]
if decodes:
    print(f"\n| decode seq_len | batch | aten ops/step LLaMA / {label} (ratio) | host reads/step LLaMA / {label} | "
          f"KV cache MiB LLaMA / {label} (ratio) |")
    print('|' + '---|' * 5)
    for llama, sub in decodes:
        print(f"| {sub['seq_len']} | {sub['batch_size']} | {llama['ops_per_step']:.0f} / {sub['ops_per_step']:.0f} "
              f"({sub['ops_per_step'] / llama['ops_per_step']:.2f}x) | {llama['reads_per_step']:.2f} / "
              f"{sub['reads_per_step']:.2f} | {llama['cache_bytes'] / 2 ** 20:.1f} / {sub['cache_bytes'] / 2 ** 20:.1f}"
              f" ({sub['cache_bytes'] / llama['cache_bytes']:.2f}x) |")
    print("aten ops and host reads: one eager pass of the decode steps, counted (a TorchDispatchMode; host reads: "
          "generate.Decoder.route's, at most one per level a step reaches, and any .item()); the kernels an eager "
          "step launches. KV cache: the bytes of every block's keys and values at the end of the decode (a level's "
          "caches: pages given to its rows as they need them, and those expected until max_len, plus 10%).")
if compile:
    print("torch.compile, graphs compiled in each measurement's warmup (graph breaks): " + ', '.join(
        f"{r['mode']} T={r['seq_len']} {r['model']} {r['graphs']} ({r['graph_breaks']})"
        for r in records if r['graphs'] is not None))
if 'R' in config.structure:
    print("recurrent: speedup and FLOP ratio are of the recurrent model against its twin (each R a plain block). Its "
          "FLOPs count every window step (an R block runs each token twice, attention over 2 * rec_window "
          "positions); for decode they are the forward's share per token, not the rerun of the open window that "
          "decoding does (up to 3 * rec_window positions per token).")
if json:
    with open(json, 'w') as f:
        dump(dict(device=device, dtype=dtype, compile=compile, torch=torch.__version__, preset=preset,
                  config=vars(config), n_params=n_params, seconds=elapsed, records=records), f, indent=1)
    print(f"wrote {len(records)} records to {json}")
print(f"took {elapsed:.0f} s ({len(jobs)} measurements, {iters} timed calls each, after {max(1, warmup)} untimed)")

"""
Sample from a model trained by train.py: SUBLLM or its LLaMA baseline, with model.py's per-level KV cache.

    python sample.py --out_dir=out-tiny                               # after: python train.py config/tiny_cpu.py
    python sample.py --out_dir=out-tiny --start="def main(" --num_samples=5 --max_new_tokens=100
    python sample.py --out_dir=out-tiny --start=FILE:prompt.txt       # the prompt from a file
    python sample.py --out_dir=out-tiny --top_k=1 --use_cache=False   # greedy, recomputing everything each step

Every global in the first section is a setting, given as --key=value (`python sample.py --help` lists them). The
tokenizer is the one of the checkpoint's dataset (its meta.json, saved in the checkpoint). At the end it prints the
decode speed (generated tokens per second, the prompt's prefill excluded) and, per subsampled level, the fraction
of the generated tokens that entered it: a token whose score is not positive skips every block inside the level,
which is where SUBLLM's decoding speedup comes from.
"""
import os
import time
from contextlib import nullcontext

import torch

from configurator import check_ranges, configure, first_line, resolve_device
from generate import Decoder, decode_one_token, sample
from run_dir import load_trained

# -----------------------------------------------------------------------------
out_dir = 'out'             # reads out_dir/ckpt.pt
start = '\n'                # the prompt, or FILE:path to read it from a file
num_samples = 3             # samples, one after another (batch 1: the cached decode is exact there)
max_new_tokens = 200        # tokens generated per sample; prompt + max_new_tokens must fit in block_size
temperature = 0.8           # < 1: more likely tokens, > 1: more random
top_k = 200                 # sample among the top_k most likely tokens; 0: among all; 1: greedy
seed = 1337
device = 'auto'             # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'
dtype = 'auto'              # 'auto' (bfloat16 if the GPU has it, else float16; float32 on CPU) or one of those
compile = False             # torch.compile the decode step (generate.py): a graph per segment between host reads
use_cache = True            # False: every step reruns the whole sequence (the reference the cache must match)
# -----------------------------------------------------------------------------
configure(globals())  # --key=value, or a config file (configurator.py)
check_ranges(globals(), {'num_samples': '[1, inf)', 'max_new_tokens': '[1, inf)',
                         'temperature': ('(0, inf)', ' (for greedy decoding use --top_k=1)'),
                         'top_k': ('[0, inf)', ' (0: sample among all tokens)'), 'seed': '[0, inf)'})

# device and precision: autocast on the GPU, plain float32 on the CPU
device, device_type, dtype = resolve_device(device, dtype)  # 'auto' resolved, and checked against this machine
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)
torch.set_float32_matmul_precision('high')  # TF32 matmuls on Ampere and newer
torch.manual_seed(seed)

# the model and its tokenizer, from the checkpoint (ckpt_prev.pt, the one before it, if ckpt.pt is damaged)
model, tok, checkpoint, ckpt_path = load_trained(out_dir)
print(f"{ckpt_path}: iter {checkpoint.get('iter_num')}, {model.get_num_params() / 1e6:.2f}M parameters, "
      f"structure {model.config.structure}, {tok.name} tokens")
checkpoint = None  # free the memory
model.eval()
model.to(device)
if compile and 'R' in model.config.structure:
    raise SystemExit("--compile=True compiles the cached decode step, which recurrent blocks ('R') do not support: "
                     "run with --compile=False")

# the prompt
if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read the prompt file {start[5:]!r}: {getattr(e, 'strerror', None) or e}") from None
start_ids = tok.encode(start)
if not start_ids:
    raise SystemExit("the prompt encodes to no tokens: give a non-empty --start (or FILE:path of a non-empty file)")
if len(start_ids) + max_new_tokens > model.config.block_size:
    raise SystemExit(f"the prompt ({len(start_ids)} tokens) + --max_new_tokens={max_new_tokens} = "
                     f"{len(start_ids) + max_new_tokens} tokens is longer than the model's "
                     f"block_size={model.config.block_size}: shorten the prompt or lower --max_new_tokens")
x = torch.tensor(start_ids, dtype=torch.long, device=device)[None, :]


def now():
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter()


def graphs_compiled():
    return torch._dynamo.utils.counters['stats']['unique_graphs'] if compile else 0


@torch.no_grad()
def generate_timed(x):
    """One sample, as generate.generate makes it, timed: the prefill (the prompt, and the first new token) and the
    decode steps, less the steps that compiled a graph (seconds each: compiling, not decoding; their host time, which
    compiling dominates, so that no step waits for the GPU). The level counters are read and reset after the
    prefill. Returns the tokens, the prefill, decode and compile times, the compiling steps and the prompt's counts."""
    decoder = Decoder(model, 1, x.size(1) + max_new_tokens - 1, compile) if use_cache else None
    try:
        t0 = now()
        tokens = [x, sample(decoder(x)[0] if use_cache else model(x)[0], temperature, top_k or None)]
        t_prefill, prompt_stats = now(), model.level_stats()
        model.reset_level_stats()
        t_compile, n_compiling = 0.0, 0
        for _ in range(max_new_tokens - 1):
            graphs, t = graphs_compiled(), time.perf_counter()
            tokens.append(decode_one_token(decoder, tokens[-1], temperature, top_k or None) if use_cache else
                          sample(model(torch.cat(tokens, dim=1))[0], temperature, top_k or None))
            if graphs_compiled() > graphs:
                t_compile, n_compiling = t_compile + time.perf_counter() - t, n_compiling + 1
        t_end = now()
    finally:
        if use_cache:
            decoder.close()
    return torch.cat(tokens, dim=1), (t_prefill - t0, t_end - t_prefill - t_compile, t_compile, n_compiling), \
        prompt_stats


# The level fractions count generated tokens only. With the cache, the counters are reset when the prefill returns,
# so at the end they hold the decode steps: max_new_tokens - 1 tokens per sample, since the last sampled token is
# never fed back. Those are the "generated tokens" of the level fractions. Without the cache every step reruns the
# whole sequence, so the decisions are counted once instead, in one reference forward over the same tokens, less
# the prompt's counts (the eval selection is causal: a token's decision does not depend on later tokens; the cached
# decode takes the same decisions: model.py's tests check it).
n_levels = len(model.level_stats())
offered, entered = [0] * n_levels, [0] * n_levels  # per level: generated tokens that reached it / that entered it
times = [0.0, 0.0, 0.0, 0]  # prefill, decode, compile seconds; decode steps that compiled
try:
    with torch.no_grad(), ctx:
        for _ in range(num_samples):
            model.reset_level_stats()
            y, sample_times, prompt_stats = generate_timed(x)
            times = [a + b for a, b in zip(times, sample_times)]
            stats = model.level_stats()
            if not use_cache:
                model.reset_level_stats()
                model(y[:, :-1])  # the reference forward
                stats = [(d, n_in - p_in, n_kept - p_kept)
                         for (d, n_in, n_kept), (_, p_in, p_kept) in zip(model.level_stats(), prompt_stats)]
            for i, (_, n_in, n_kept) in enumerate(stats):
                offered[i] += n_in
                entered[i] += n_kept
            # the model's vocab is padded to a multiple of 64: ids past the tokenizer's (never trained on) are dropped
            print(tok.decode([t for t in y[0].tolist() if t < tok.vocab_size]))
            print('---------------')
except Exception as e:
    if not compile:
        raise
    raise SystemExit(f"torch.compile failed ({type(e).__name__}: {first_line(e)}): "
                     f"run with --compile=False") from None

n_fed = num_samples * (max_new_tokens - 1)  # decode steps: generated tokens that went through the model (see above)
prefill_time, decode_time, compile_time, n_compiling = times
speed = f"{(n_fed - n_compiling) / decode_time:.1f} tokens/s" if decode_time > 0 else "too fast to time"
compiling = f"; the {n_compiling} steps that compiled graphs took {compile_time:.3f} s, not counted" if compile else ""
print(f"decode: {n_fed - n_compiling} tokens in {decode_time:.3f} s, {speed} ({'with' if use_cache else 'without'} "
      f"the KV cache{', compiled' if compile else ''}; the prefill of the {len(start_ids)}-token prompt and the first "
      f"new token took {prefill_time:.3f} s in all, not counted{compiling})")
if n_fed == 0:
    print("no level fractions: with max_new_tokens=1 no generated token goes through the model")
for i, (depth, _, _) in enumerate(model.level_stats() if n_fed else []):
    name = f"level {i + 1}" + (f" (depth {depth})" if depth != i + 1 else "")  # depth differs for sibling levels
    parent = f" ({100 * entered[i] / offered[i]:.1f}% of those that reached it)" if depth > 1 and offered[i] else ""
    print(f"{name}: {100 * entered[i] / n_fed:.1f}% of generated tokens entered{parent}")
if n_levels == 0:
    print(f"no subsampled levels (structure {model.config.structure}): every token runs every block")

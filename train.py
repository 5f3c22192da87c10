"""
Train SUBLLM, or its LLaMA baseline, on the token files that prepare.py writes. One script for a CPU, one GPU
or many GPUs (DDP).

    python prepare.py --tokenizer=byte && python train.py config/tiny_cpu.py     # a few minutes on a laptop CPU
    python train.py config/tiny_cpu.py --structure=TTTTTTTTTT                    # same blocks, no levels: LLaMA
    python train.py config/gpu_subllm_250m.py                                    # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpu_subllm_250m.py  # 8 GPUs on one node
    python train.py config/tiny_cpu.py --init_from=resume                        # continue from out_dir/ckpt.pt
    python train.py config/grow_tli_copy_zero.py                                 # 1.5x deeper copy of a trained model

Every global in the first section is a setting. A config file (python that assigns some of them) overrides the
defaults, then --key=value flags override both; `python train.py --help` lists them all.
Each eval appends a JSON line to out_dir/log.jsonl: iter, tokens (seen by all processes), time_s (seconds of
training since the run began, evals and checkpoint saving excluded, continued across resumes), lr, train_loss and
val_loss (eval mode: a level keeps the tokens whose score is > 0, as in inference), and for SUBLLM, per level where
it is a list: val_loss_train_selection (the same val batches with the training-time selection: top-k, or
threshold in its fixed capacity), kept (the fraction of its parent's tokens a level kept on those val batches in eval
mode), agree (the fraction of tokens on which the training-time selection picks as `score > 0` does, on those val
batches) and dropped (in the training steps since the last eval, the fraction of a level's tokens with a positive
score that the training selection skipped: below the top-k cut, or past the capacity).
flops: the training FLOPs spent so far (3x the forward FLOPs of each step, counted as flops.forward_flops does:
each block with the tokens it sees). With --est=True also stage and flops_dense (what dense training spends).
out_dir/ckpt.pt holds everything to resume or to sample, and ckpt_prev.pt the checkpoint before it: a resume from a
damaged ckpt.pt falls back to it. out_dir/train.lock (the pid of the run) keeps a second run out of a live run's
out_dir, and a new run does not start in an out_dir that holds another run's checkpoint unless --overwrite=True.
"""
import atexit
import gc
import json
import math
import os
import random
import re
import socket
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import check_ranges, configure, first_line, load_checkpoint, settings_of
from est import est_stage, set_subnetwork, subnetwork_at
from flops import estimate_mfu, forward_flops
from grow import grow
from model import SubLLMConfig, SubLLM

# -----------------------------------------------------------------------------
# default settings: a small SUBLLM on the default corpus
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 50                 # batches per split at each eval
eval_only = False               # evaluate once (at iter 0, or at the resumed checkpoint) and exit
always_save_checkpoint = True   # save at every eval; if False only when val loss improves (and always at the end)
init_from = 'scratch'           # 'scratch', 'resume' (from out_dir/ckpt.pt) or 'grow' (a deeper copy of grow_from's)
overwrite = False               # a new run (scratch, grow) in an out_dir that holds another run's checkpoint or log:
                                # False refuses, True deletes them and starts afresh
# growing a trained model (init_from='grow'): a new run at iter 0, fresh optimizer, from grow_from/ckpt.pt's weights
grow_from = ''                  # the out_dir of the trained model
grow_method = 'tli'             # 'tli': inject a block after every grow_k-th; 'dus': Depth Up-Scaling, drops grow_m
grow_k = 2                      # TLI: n blocks -> n + n // grow_k
grow_init = 'copy_zero'         # TLI: 'copy_zero' (injected blocks start as the identity) or 'copy'
grow_m = 2                      # DUS: n blocks -> 2 * (n - grow_m)
# data
data_dir = 'data'
dataset = 'stdlib'              # reads data_dir/dataset/{train.bin, val.bin, meta.json}
gradient_accumulation_steps = 8  # micro-steps per iteration over all processes: 8 runs on 1, 2, 4 or 8 of them
batch_size = 16                 # sequences per micro-step and process (8 x 16 x 256 = 32,768 tokens per iteration)
block_size = 256                # context length of the training crops
# model: the fields of SubLLMConfig (vocab_size comes from meta.json)
n_embd = 384
n_head = 6
n_kv_head = 0                   # 0: same as n_head (no grouped-query attention)
ffn_hidden = 0                  # 0: LLaMA's rule, 8/3 * n_embd rounded up to a multiple of 256
structure = 'TT(TT(TT)TT)TT'    # T = a block, ( ) = a subsampled level; no parentheses = the LLaMA baseline;
                                # R = a recurrent block (top level only), e.g. 'R' or 'TRT'
keep_ratio = 0.64               # fraction of its parent's tokens a level keeps; a tuple gives one per depth
selection = 'topk'              # training-time selection: 'topk' (the paper) or 'threshold' (score > 0, causal)
capacity_slack = 0.25           # threshold: room for keep * T * (1 + slack) tokens per level; the rest skip
scorer_norm = True              # the scorer reads rms_norm(x); False: the raw x, as the paper (an ablation)
balancer = 'spec'               # 'spec' (Zipformer's gain 0.04) or 'strong' (count gain 10; docs/quality.md)
running_cut = 'batch'           # the running top-k cut subtracted from the scores: of the 'batch', the mean of its
                                # 'rows' (the runs before docs/quality.md's round two), or 'off' (an ablation)
rope_theta = 10000.0
norm_eps = 1e-5
tie_embeddings = False
dropout = 0.0
bypass_schedule_steps = 20000   # schedule lengths for a 100k-step run; set_step shrinks them for shorter runs
balancer_schedule_steps = 8000
rec_window = 16                 # recurrent blocks: tokens per window
rec_alpha = 0.0                 # recurrent blocks: 0 forget, > 0 accumulate alpha * the previous window's readout
rec_learn_alpha = False         # recurrent blocks: learn alpha (starts at rec_alpha, clamped to [0, 1])
# AdamW and the learning rate schedule: linear warmup, then cosine decay to min_lr
learning_rate = 1e-3
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0                 # clip the gradient norm at this value; 0 disables
warmup_iters = 100
lr_decay_iters = 0              # 0: decay until max_iters
min_lr = 1e-4
# system
device = 'auto'                 # 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', 'mps'
dtype = 'auto'                  # 'auto' (bfloat16 if the GPU has it, else float16; float32 on CPU) or one of those
compile = True                  # torch.compile on CUDA; on CPU only when given explicitly (it takes minutes there)
seed = 1337                     # initial weights, training batches, dropout
eval_seed = 1337                # the eval batches: kept apart from seed, so that runs of any seed are scored alike
# Evolving Subnetwork Training (EST, arXiv 2406.06962; README): each step trains a random sub-network, in 3 stages.
# Stage 1, iters [0, est_stage1_end * max_iters): some blocks run, each with some of its heads and SwiGLU units.
# Stage 2, until est_stage2_end * max_iters: every block runs, still with some of its heads and units.
# Stage 3, until the end: the full model. The learning rate schedule runs on unchanged across the stages.
est = False
est_stage1_end = 0.25           # fractions of max_iters
est_stage2_end = 0.65
est_p_heads = 0.5               # stages 1 and 2: fraction of the KV groups (with all their query heads) a block runs
est_p_units = 0.5               # stages 1 and 2: fraction of the SwiGLU hidden units a block runs
est_p_layers = 0.5              # stage 1: fraction of the blocks that run (first, last and one per level always do)

# -----------------------------------------------------------------------------
user_keys = configure(globals(), tuples=('keep_ratio',))  # config files, then --key=value (configurator.py)
config_keys = settings_of(globals())
config = {k: globals()[k] for k in config_keys}  # saved in the checkpoint
# every setting's valid range, before anything runs: one line that says which and what (grow.py checks grow_*)
check_ranges(globals(), {
    'eval_interval': ('[1, inf)', ' (iterations between evals)'), 'log_interval': '[1, inf)',
    'eval_iters': '[1, inf)', 'gradient_accumulation_steps': '[1, inf)', 'batch_size': '[1, inf)',
    'block_size': '[1, inf)', 'n_embd': '[1, inf)', 'n_head': '[1, inf)', 'n_kv_head': ('[0, inf)', ' (0: n_head)'),
    'ffn_hidden': ('[0, inf)', " (0: LLaMA's rule)"), 'keep_ratio': '(0, 1]', 'capacity_slack': '[0, inf)',
    'rope_theta': '(0, inf)', 'norm_eps': '[0, inf)', 'dropout': '[0, 1)', 'bypass_schedule_steps': '[0, inf)',
    'balancer_schedule_steps': '[0, inf)', 'rec_window': '[1, inf)', 'rec_alpha': '[0, 1]',
    'learning_rate': '[0, inf)', 'max_iters': '[0, inf)', 'weight_decay': '[0, inf)', 'beta1': '[0, 1)',
    'beta2': '[0, 1)', 'grad_clip': ('[0, inf)', ' (0: no clipping)'), 'warmup_iters': '[0, inf)',
    'lr_decay_iters': ('[0, inf)', ' (0: until max_iters)'), 'min_lr': '[0, inf)', 'seed': '[0, 2147483647]',
    'eval_seed': '[0, 2147483647]'})
for key, choices in dict(init_from=('scratch', 'resume', 'grow'), dtype=('auto', 'float32', 'bfloat16', 'float16'),
                         selection=('topk', 'threshold'), balancer=('strong', 'spec')).items():
    if globals()[key] not in choices:
        raise SystemExit(f"--{key} must be one of {', '.join(choices)}, got {globals()[key]!r}")
if not out_dir:
    raise SystemExit("--out_dir is empty: give the directory for the checkpoint and log, e.g. --out_dir=out")
if init_from == 'grow' and grow_from and os.path.abspath(grow_from) == os.path.abspath(out_dir):
    raise SystemExit(f"out_dir and grow_from are both {out_dir!r}: give the grown run its own --out_dir, or its "
                     f"checkpoints would overwrite the model it grows from")
if est and not 0 <= est_stage1_end <= est_stage2_end <= 1:
    raise SystemExit(f"EST stages need 0 <= est_stage1_end <= est_stage2_end <= 1, got {est_stage1_end} and "
                     f"{est_stage2_end} (fractions of max_iters)")
if est and not all(0 < p <= 1 for p in (est_p_heads, est_p_units, est_p_layers)):
    raise SystemExit(f"est_p_heads, est_p_units and est_p_layers must be in (0, 1], got {est_p_heads}, "
                     f"{est_p_units} and {est_p_layers}")
# -----------------------------------------------------------------------------

# device, precision and DDP (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE)
if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
device_type = 'cuda' if device.startswith('cuda') else device.split(':')[0]
if device_type not in ('cpu', 'cuda', 'mps') or not re.fullmatch(r'[a-z]+(:\d+)?', device):
    raise SystemExit(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
if device_type == 'cuda' and not torch.cuda.is_available():
    raise SystemExit(f"--device={device}, but this torch ({torch.__version__}) sees no CUDA GPU: use --device=cpu, or "
                     f"--device=auto (the GPU when there is one)")
if device_type == 'cuda' and ':' in device and int(device.split(':')[1]) >= torch.cuda.device_count():
    raise SystemExit(f"--device={device}, but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                     f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
if device_type == 'mps' and not torch.backends.mps.is_available():
    raise SystemExit("--device=mps, but this torch sees no Apple GPU (MPS): use --device=cpu")
if dtype == 'auto':
    dtype = 'float32' if device_type != 'cuda' else 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
if dtype == 'bfloat16' and device_type == 'cuda' and not torch.cuda.is_bf16_supported():
    raise SystemExit("--dtype=bfloat16, but this GPU does not support it: use --dtype=float16 (or auto)")
ddp = int(os.environ.get('RANK', -1)) != -1
if ddp:
    ddp_rank, ddp_local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    ddp_world_size = int(os.environ['WORLD_SIZE'])
    if gradient_accumulation_steps % ddp_world_size != 0:
        raise SystemExit(f"gradient_accumulation_steps={gradient_accumulation_steps} counts micro-steps over all "
                         f"processes, so it must be divisible by the number of processes ({ddp_world_size})")
    gradient_accumulation_steps //= ddp_world_size
    if device_type == 'cuda' and ddp_local_rank >= torch.cuda.device_count():
        raise SystemExit(f"local rank {ddp_local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                         f"start at most that many processes per node (--nproc_per_node)")
    if device_type == 'cuda':
        device = f'cuda:{ddp_local_rank}'
        torch.cuda.set_device(device)
    # the process group is made just before DDP wraps the model: an error in the settings, data or checkpoint
    # before it ends every rank on its own, as in a single process
else:
    ddp_rank, ddp_world_size = 0, 1
master_process = ddp_rank == 0  # only rank 0 logs, evaluates and saves
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size

torch.manual_seed(seed + ddp_rank)  # per-rank seeds; DDP copies rank 0's initial weights to every rank
np.random.seed(seed + ddp_rank)
random.seed(seed + ddp_rank)
train_gen = torch.Generator().manual_seed(seed + ddp_rank)  # picks this rank's training crops; saved for resume
torch.set_float32_matmul_precision('high')  # TF32 matmuls on Ampere and newer
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)

# data: flat arrays of token ids, described by meta.json: train.bin and val.bin, or the shards that meta.json lists
data_path = os.path.join(data_dir, dataset)
meta = {}
if os.path.exists(os.path.join(data_path, 'meta.json')):
    try:
        with open(os.path.join(data_path, 'meta.json')) as f:
            meta = json.load(f)
        lacks = [k for k in ('tokenizer', 'vocab_size', 'dtype') if not isinstance(meta, dict) or k not in meta]
        if lacks:
            raise ValueError(f"it has no {', '.join(lacks)}")
        np.dtype(meta['dtype'])
    except (OSError, ValueError, TypeError) as e:  # also json's JSONDecodeError and UnicodeDecodeError
        raise SystemExit(f"{data_path}/meta.json cannot be read ({first_line(e)}): run prepare.py again for this "
                         f"data (`python prepare.py --help`)") from None
data_files = {split: [s['file'] for s in meta[f'{split}_shards']] if f'{split}_shards' in meta else [f'{split}.bin']
              for split in ('train', 'val')}
missing = [f for f in (*data_files['train'], *data_files['val'], 'meta.json')
           if not os.path.exists(os.path.join(data_path, f))]
if missing:
    shown = ', '.join(missing[:3]) + (' ...' if len(missing) > 3 else '')  # a shard set can miss hundreds
    raise SystemExit(f"no {shown} in {data_path}/: run `python prepare.py` first "
                     f"(it writes data/stdlib/; see `python prepare.py --help` for other data)")
if not meta.get('complete', True):
    raise SystemExit(f"{data_path}/ is not complete (prepare.py was interrupted, or is still running): run the same "
                     f"prepare.py command again, and it continues where it stopped")
# get_batch numbers the crop starts of all the files in a row (a file of n tokens has n - block_size) and draws from
# that numbering: a crop never spans two files, and every crop is equally likely (one file: nanoGPT's draw, exactly)
first_crop = {}
for split, files in data_files.items():
    sizes = [os.path.getsize(os.path.join(data_path, f)) // np.dtype(meta['dtype']).itemsize for f in files]
    if max(sizes) < block_size + 1:
        where = f"{data_path}/{files[0]}" if len(files) == 1 else f"the largest of {len(files)} {split} shards"
        raise SystemExit(f"block_size={block_size} is larger than the {split} split ({max(sizes)} tokens in "
                         f"{where}): use a smaller --block_size or prepare more text")
    first_crop[split] = np.cumsum([0] + [max(0, n - block_size) for n in sizes])  # (files + 1,)


def get_batch(split, generator):
    """Random crops of block_size + 1 tokens: x is each crop without its last token, y without its first."""
    ix = torch.randint(int(first_crop[split][-1]), (batch_size,), generator=generator).numpy()
    file_index = np.searchsorted(first_crop[split], ix, side='right') - 1  # the file that holds each crop
    # memmap again for every batch: a memmap kept open for the whole run grows the resident memory
    data = {k: np.memmap(os.path.join(data_path, data_files[split][k]), dtype=meta['dtype'], mode='r')
            for k in set(file_index.tolist())}
    starts = ix - first_crop[split][file_index]
    crops = torch.from_numpy(np.stack([data[k][i:i + block_size + 1] for k, i in zip(file_index, starts)])
                             .astype(np.int64))  # (B, T+1)
    if int(crops.max()) >= vocab_size:
        bad_file = data_files[split][file_index[int(crops.max(dim=1).values.argmax())]]
        raise SystemExit(f"{bad_file} holds token id {int(crops.max())}, but the model's vocab_size is {vocab_size} "
                         f"(meta.json says {meta['vocab_size']}): data and meta.json disagree; run prepare.py again")
    x, y = crops[:, :-1].contiguous(), crops[:, 1:].contiguous()  # (B, T) each
    if device_type == 'cuda':  # pinned memory lets the copy to the GPU run asynchronously
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# model: from scratch, or from out_dir/ckpt.pt (or ckpt_prev.pt, the checkpoint before it, if ckpt.pt is damaged)
iter_num, best_val_loss, train_seconds = 0, float('inf'), 0.0
ckpt_path, prev_path = os.path.join(out_dir, 'ckpt.pt'), os.path.join(out_dir, 'ckpt_prev.pt')
checkpoint = None
keep_prev = True  # the next save moves ckpt.pt to ckpt_prev.pt; not when ckpt.pt is the damaged file resumed past
RESUME_KEYS = ('model', 'optimizer', 'scaler', 'model_args', 'iter_num', 'best_val_loss', 'config', 'rng',
               'train_seconds')
if init_from == 'scratch':
    model_args = dict(vocab_size=64 * math.ceil(meta['vocab_size'] / 64),  # a multiple of 64 is faster (50257 -> 50304)
                      block_size=block_size, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head or None,
                      ffn_hidden=ffn_hidden or None, structure=structure, keep_ratio=keep_ratio, selection=selection,
                      capacity_slack=capacity_slack, scorer_norm=scorer_norm, balancer=balancer,
                      running_cut=running_cut, rope_theta=rope_theta,
                      norm_eps=norm_eps, tie_embeddings=tie_embeddings, dropout=dropout,
                      bypass_schedule_steps=bypass_schedule_steps, balancer_schedule_steps=balancer_schedule_steps,
                      rec_window=rec_window, rec_alpha=rec_alpha, rec_learn_alpha=rec_learn_alpha)
elif init_from == 'resume':
    checkpoint, path = load_checkpoint(out_dir, RESUME_KEYS, say=print if master_process else lambda line: None,
                                       missing=f"init_from=resume, but there is no checkpoint at {ckpt_path}")
    keep_prev = path == ckpt_path
    model_args = checkpoint['model_args']  # the model's shape comes from the checkpoint, everything else from this run
    iter_num, best_val_loss = checkpoint['iter_num'], checkpoint['best_val_loss']
    train_seconds = checkpoint['train_seconds']
    changed = [f"{k}={config[k]!r} (was {v!r})" for k, v in checkpoint['config'].items()
               if k not in ('init_from', 'overwrite') and config.get(k) != v]
    if changed and master_process:
        print(f"resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
    if meta['vocab_size'] > model_args['vocab_size']:
        raise SystemExit(f"the data's vocab ({meta['vocab_size']}) is larger than the checkpoint model's "
                         f"({model_args['vocab_size']}): resume on the dataset it was trained on")
elif init_from == 'grow':
    grow_path = os.path.join(grow_from, 'ckpt.pt')
    if not grow_from or not any(os.path.exists(os.path.join(grow_from, f)) for f in ('ckpt.pt', 'ckpt_prev.pt')):
        raise SystemExit(f"init_from=grow needs --grow_from=OUT_DIR of a trained model: no checkpoint at {grow_path}")
    source, grow_path = load_checkpoint(grow_from, ('model', 'model_args', 'iter_num'),
                                        say=print if master_process else lambda line: None)
    try:
        base = SubLLM(SubLLMConfig(**source['model_args']))
        base.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in source['model'].items()})
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise SystemExit(f"{grow_path} does not fit this model.py: {' '.join(str(e).split())[:300]}") from None
    try:
        grown = grow(base, method=grow_method, k=grow_k, init=grow_init, m=grow_m)
    except ValueError as e:
        raise SystemExit(f"cannot grow {grow_path}: {e}") from None
    model_args, grown_weights = asdict(grown.config), grown.state_dict()
    if master_process:
        how = f"TLI k={grow_k}, {grow_init}" if grow_method == 'tli' else f"DUS m={grow_m}"
        print(f"grown ({how}) from {grow_path} (iter {source['iter_num']}): {len(base.blocks())} blocks "
              f"{base.config.structure} -> {len(grown.blocks())} blocks {grown.config.structure}")
    if meta['vocab_size'] > model_args['vocab_size']:
        raise SystemExit(f"the data's vocab ({meta['vocab_size']}) is larger than the grown model's "
                         f"({model_args['vocab_size']}): grow on the dataset it was trained on")
    source = base = grown = None  # free the memory
try:
    model = SubLLM(SubLLMConfig(**model_args))
except (TypeError, ValueError) as e:
    raise SystemExit(f"bad model settings{'' if checkpoint is None else ' in ' + path}: {e}") from None
vocab_size = model.config.vocab_size
if checkpoint is not None:
    try:  # checkpoints of a compiled model (older ones) carry an '_orig_mod.' prefix
        model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()})
    except (RuntimeError, AttributeError) as e:
        raise SystemExit(f"{path} does not fit this model.py: {' '.join(str(e).split())[:300]}") from None
elif init_from == 'grow':
    model.load_state_dict(grown_weights)
    grown_weights = None
if block_size > model.config.block_size:
    raise SystemExit(f"block_size={block_size} is longer than the checkpoint model's ({model.config.block_size})")
model.to(device)
levels = model.levels()  # empty for the LLaMA baseline
use_compile = compile and (device_type == 'cuda' or 'compile' in user_keys)
if master_process:
    print(f"device {device}, dtype {dtype}, compile {use_compile}, {ddp_world_size} process(es)")
    print(f"{model.get_num_params() / 1e6:.2f}M parameters, vocab {vocab_size} ({meta['tokenizer']} tokens)")
    if levels:
        print(f"SUBLLM, structure {model.config.structure}, keep ratio per level (depth): "
              + ', '.join(f"{lv.keep_ratio:g} (d{lv.depth})" for lv in levels))
    elif 'R' in model.config.structure:
        c = model.config
        print(f"recurrent, structure {c.structure}, window {c.rec_window}, alpha {c.rec_alpha:g}"
              + (" (learned)" if c.rec_learn_alpha else " (forget)" if c.rec_alpha == 0 else ""))
    else:
        print(f"LLaMA baseline, structure {model.config.structure} (no subsampled levels)")
    print(f"tokens per iteration: {tokens_per_iter:,} = {ddp_world_size} process(es) x {gradient_accumulation_steps} "
          f"accumulation x {batch_size} batch x {block_size} block")

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))  # fp16 needs loss scaling; bf16 does not
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
if checkpoint is not None:
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"the optimizer state in {path} does not fit this model ({first_line(e)}): was it saved by "
                         f"another version of train.py?") from None

raw_model = model  # the plain module: evals, checkpoints, set_step and MFU use it
if use_compile:
    if master_process:
        print("compiling the model (the first iteration takes a minute or so)")
    try:
        if est:  # each block on its own: EST's skipped blocks stay Python between the graphs, no recompile per step
            if not hasattr(torch.compiler, 'set_stance'):
                raise SystemExit("--est=True with torch.compile needs torch 2.6 or newer: upgrade torch, or run with "
                                 "--compile=False")
            for block in raw_model.blocks():
                block.compile()
        else:
            model = torch.compile(model)
    except RuntimeError as e:  # e.g. a Python version that this torch's compiler does not support yet
        raise SystemExit(f"torch.compile failed ({str(e).strip().splitlines()[0]}): run with --compile=False") from None
# Evolving Subnetwork Training: the sub-network of each step, and the training FLOPs it spends
if est and 'R' in raw_model.config.structure:
    raise SystemExit("--est=True does not support recurrent blocks ('R' in the structure): train it without est")


# out_dir: one run at a time. Rank 0 holds out_dir/train.lock (its pid and host) from here until it exits. A second
# run on the same out_dir is refused, naming the first; so is a new run (scratch, grow) in an out_dir that holds
# another run's checkpoint or log, unless --overwrite=True. Under DDP the other ranks learn of a refusal below.
lock_path = os.path.join(out_dir, 'train.lock')
lock_text = f"{os.getpid()} {socket.gethostname()}\n"


def lock_holder():
    """The text of the lock file ('pid host'), and whether that process is alive: True when it cannot be told
    (another host; Windows, where os.kill(pid, 0) would end the process; a lock written a moment ago)."""
    try:
        with open(lock_path) as f:
            text = f.read()
        age = time.time() - os.path.getmtime(lock_path)
    except FileNotFoundError:
        return None, False
    pid, _, host = text.strip().partition(' ')
    if not pid.isdigit():
        return text, age < 10  # being written (the pid follows the creation at once), or garbage
    if host != socket.gethostname() or os.name == 'nt':
        return text, True
    if int(pid) == os.getpid():  # an earlier run in this same process (tests run train.py in-process), now over
        return text, False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return text, False
    except OSError:  # PermissionError: it exists, as another user's process
        pass
    return text, True


def release_lock():
    try:
        with open(lock_path) as f:
            if f.read() == lock_text:
                os.remove(lock_path)
    except OSError:
        pass


def take_out_dir():
    """Make out_dir and take its lock. Returns None, or the one-line reason why this run must not use out_dir."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                text, alive = lock_holder()
                if alive:
                    pid, _, host = (text or '').strip().partition(' ')
                    return (f"{out_dir}/ is in use by another training run (pid {pid or '?'}"
                            f"{'' if host == socket.gethostname() else ' on ' + host}, lock file {lock_path}): wait "
                            f"for it to end or stop it, or give another --out_dir (if no such run exists, delete "
                            f"{lock_path})")
                aside = f"{lock_path}.{os.getpid()}"  # a stale lock: take it away atomically, then check it is the
                try:                                 # one just read (another run may have replaced it meanwhile)
                    os.replace(lock_path, aside)
                except FileNotFoundError:
                    continue
                with open(aside) as f:
                    if f.read() == text:
                        os.remove(aside)
                    else:
                        os.replace(aside, lock_path)
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(lock_text)
            atexit.register(release_lock)  # also on SystemExit, an exception or Ctrl-C
            break
        else:
            return f"cannot take the lock {lock_path}: another run keeps taking it; try again"
    except OSError as e:
        return f"cannot write to {out_dir}/ ({e.strerror or first_line(e)}): give a writable --out_dir"
    if init_from == 'resume':
        return None
    found = [f for f in ('ckpt.pt', 'ckpt_prev.pt', 'log.jsonl')
             if os.path.exists(os.path.join(out_dir, f)) and os.path.getsize(os.path.join(out_dir, f)) > 0]
    if found and not overwrite:
        release_lock()
        found = ', '.join(found[:-1]) + ' and ' * (len(found) > 1) + found[-1]
        return (f"{out_dir}/ holds {found} of an earlier run: --init_from=resume continues it, "
                f"--overwrite=True deletes them and starts afresh, or give another --out_dir")
    return None


refusal = take_out_dir() if master_process and not eval_only else None  # acted on by leave_if, below
if ddp:
    dist.init_process_group(backend='nccl' if device_type == 'cuda' else 'gloo')
    # torch 2.13 deprecates broadcast_buffers but asks to keep it where buffers are rank-local (score_offset is)
    warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
    # the buffers (RoPE tables, schedule values) are the same on every rank: no need to broadcast them each step
    # with EST, the skipped blocks' parameters get no gradient in a step: find_unused_parameters lets DDP finish the
    # reduction without them (it costs a walk over the autograd graph each step, so only when EST is on)
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == 'cuda' else None, broadcast_buffers=False,
                find_unused_parameters=est)


def leave(message=None):
    """End the run on every rank at once; all ranks call it at the same point. No rank tears the process group down
    while another can still use it (gloo aborts a rank that does: "terminate called without an active exception").
    With a message, every rank exits 1 and rank 0 prints it (one line)."""
    global model
    if ddp:
        model = None  # free the DDP wrapper (its reducer holds gloo work) while the interpreter is whole: freed at
        gc.collect()  # exit instead, it aborted a rank ("terminate called without an active exception") 1 run in 6
        dist.barrier()
        dist.destroy_process_group()
    if message:
        raise SystemExit(message if master_process else 1)


def leave_if(message):
    """Rank 0's message (None: carry on) reaches every rank; with one, every rank leaves, together."""
    if ddp:
        flag = [message]
        dist.broadcast_object_list(flag, src=0)
        message = flag[0]
    if message:
        leave(message)


leave_if(refusal)  # another run holds out_dir, or it holds another run's checkpoint (take_out_dir)
flops_per_iter_dense = 3 * forward_flops(raw_model, block_size) * (tokens_per_iter // block_size)  # bwd = 2x fwd
flops_spent = 0.0 if checkpoint is None else checkpoint.get('flops', iter_num * flops_per_iter_dense)



def stage_at(it):
    """EST's stage of iteration it: 1, 2 or 3 (the full model)."""
    return est_stage(it, max_iters, est_stage1_end, est_stage2_end)

if est and master_process:
    stage1, stage2 = math.ceil(est_stage1_end * max_iters), math.ceil(est_stage2_end * max_iters)
    print(f"EST: stage 1 iters [0, {stage1}) with heads x{est_p_heads:g}, units x{est_p_units:g}, blocks "
          f"x{est_p_layers:g}; stage 2 [{stage1}, {stage2}) all blocks; stage 3 [{stage2}, {max_iters}) full model")


def rng_state():
    """This process's random states: restoring them makes a resumed run repeat the uninterrupted one exactly."""
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None,
            'numpy': (np_state[0], np_state[1].tolist(), *np_state[2:]),  # plain lists: loadable with weights_only
            'python': random.getstate(), 'batches': train_gen.get_state()}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and device_type == 'cuda':
        torch.cuda.set_rng_state(state['cuda'])
    np.random.set_state((state['numpy'][0], np.array(state['numpy'][1], dtype=np.uint32), *state['numpy'][2:]))
    random.setstate(state['python'])
    train_gen.set_state(state['batches'])


if checkpoint is not None:
    if len(checkpoint['rng']) == ddp_world_size:
        set_rng_state(checkpoint['rng'][ddp_rank])
    else:  # another number of processes: reseed, away from the seeds of any fresh start
        train_gen.manual_seed(seed + ddp_rank + iter_num * ddp_world_size)
        torch.manual_seed(seed + ddp_rank + iter_num * ddp_world_size)
        if master_process:
            print(f"the checkpoint has random states for {len(checkpoint['rng'])} processes, this run has "
                  f"{ddp_world_size}: reseeded, so this is not an exact continuation")
checkpoint = None  # free the memory


def get_lr(it):
    """Linear warmup for warmup_iters, then cosine decay down to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = lr_decay_iters or max_iters
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # goes 1 -> 0
    return min_lr + coeff * (learning_rate - min_lr)


@torch.no_grad()
def estimate_loss():
    """Mean loss of each split over eval_iters batches, the same batches at every eval so that evals compare.
    Eval mode is the inference path: a level keeps the tokens whose score is > 0. For SUBLLM also
    val_loss_train_selection, the same val batches with the training-time selection (train mode, no gradients;
    dropout is 0 by default): the gap between the two is the train/inference mismatch. And per level the fraction
    of tokens it kept on val (eval mode), and the fraction on which the two selections agree."""
    out = {}
    set_subnetwork(raw_model, None)  # EST: always evaluate the full model; the next step sets its own
    offsets = [level.score_offset.clone() for level in levels]  # a train-mode forward moves them: put them back
    with torch.random.fork_rng(devices=[device] if device_type == 'cuda' else []):  # leave training's RNG alone
        for split in ('train', 'val'):
            generator = torch.Generator().manual_seed(eval_seed + 1_000_003 + (split == 'val'))
            losses, losses_train_selection = torch.zeros(eval_iters), torch.zeros(eval_iters)
            raw_model.reset_level_stats()
            for k in range(eval_iters):
                X, Y = get_batch(split, generator)
                raw_model.eval()
                with ctx:
                    losses[k] = raw_model(X, Y)[1].item()
                if split == 'val' and levels:
                    raw_model.train()
                    with ctx:
                        losses_train_selection[k] = raw_model(X, Y)[1].item()
            out[f'{split}_loss'] = losses.mean().item()
        if levels:
            out['val_loss_train_selection'] = losses_train_selection.mean().item()
            out['kept'] = [kept / max(1, seen) for _, seen, kept in raw_model.level_stats()]  # of the parent's tokens
            out['agree'] = [agree / max(1, seen) for _, seen, agree, _ in raw_model.selection_stats()]
    for level, offset in zip(levels, offsets):
        level.score_offset.copy_(offset)
    raw_model.reset_level_stats()  # the training steps until the next eval count from zero
    raw_model.train()
    return out


if est and use_compile:  # the blocks are compiled in place: keep evals eager, as raw_model's are without EST
    estimate_loss = torch.compiler.set_stance('force_eager')(estimate_loss)


# logging: out_dir/log.jsonl gets one JSON line per eval. A resumed run keeps the records up to its checkpoint's
# iter (it redoes the evals after it); a line that is not a record (cut short by a crash, a bad edit) is skipped,
# and said. The kept lines go to a temp file that is then renamed over the log: a crash meanwhile loses nothing.
log_path = os.path.join(out_dir, 'log.jsonl')


def log_lines_until(it):
    """The lines of log.jsonl whose record's iter is <= it, and the numbers of the lines that are not records."""
    kept, bad = [], []
    with open(log_path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and isinstance(record.get('iter'), int)
            except ValueError:
                ok = False
            if not ok:
                bad.append(number)
            elif record['iter'] <= it:
                kept.append(line.rstrip('\n') + '\n')
    return kept, bad


problem = None
if master_process and not eval_only:
    try:
        kept = []
        if init_from == 'resume' and os.path.exists(log_path):
            kept, bad = log_lines_until(iter_num)
            if bad:
                shown = ', '.join(map(str, bad[:5])) + (' ...' if len(bad) > 5 else '')
                print(f"{log_path}: skipped {len(bad)} line(s) that are not JSON records (line {shown}); kept the "
                      f"{len(kept)} record(s) up to iter {iter_num}")
        elif init_from != 'resume':  # a new run: take_out_dir let it in on an empty out_dir, or with --overwrite=True
            for old_file in (ckpt_path, prev_path):
                if os.path.exists(old_file):
                    os.remove(old_file)
        with open(log_path + '.tmp', 'w') as f:
            f.writelines(kept)
        os.replace(log_path + '.tmp', log_path)
    except OSError as e:
        problem = f"cannot write {log_path} ({e.strerror or first_line(e)}): give a writable --out_dir"
leave_if(problem)

# training loop
resumed_at = iter_num if init_from == 'resume' else None  # that iter's eval came before its checkpoint was saved
if init_from == 'resume' and iter_num >= max_iters and not eval_only and master_process:
    print(f"the checkpoint is at iter {iter_num} and max_iters={max_iters}: nothing to do (raise --max_iters)")
t0 = t_train = time.time()  # t_train: start of the current stretch of training, evals excluded
local_iter_num, running_mfu = 0, -1.0
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if eval_only or ((iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at):
        stop = None  # set by rank 0 when the eval loss is not finite
        all_states = [rng_state()]
        if ddp:  # every rank's random states go into the checkpoint, so that every rank resumes exactly
            all_states = [None] * ddp_world_size
            dist.all_gather_object(all_states, rng_state())
        if master_process:
            if device_type == 'cuda':
                torch.cuda.synchronize()
            train_seconds += time.time() - t_train
            # positive tokens that the training steps since the last eval skipped, per level (on this process)
            dropped = [drop / max(1, seen) for _, seen, _, drop in raw_model.selection_stats()]
            losses = estimate_loss()
            line = f"step {iter_num}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
            if levels:
                losses['dropped'] = dropped
                line += (f", val loss with {raw_model.config.selection} selection "
                         f"{losses['val_loss_train_selection']:.4f}")
                for name in ('kept', 'agree', 'dropped'):
                    line += f", {name} " + ' '.join(f"d{lv.depth} {v:.3f}" for lv, v in zip(levels, losses[name]))
            print(line, flush=True)
            if not all(map(math.isfinite, [losses['train_loss'], losses['val_loss']])):
                stop = (f"the eval loss is not finite at iter {iter_num}: stopping; the last good checkpoint (if "
                        f"any) is kept in {ckpt_path}; try a lower --learning_rate")
            if stop is None and not eval_only:
                record = dict(iter=iter_num, tokens=iter_num * tokens_per_iter, time_s=round(train_seconds, 3),
                              flops=flops_spent, lr=lr, **losses)
                if est:  # the FLOPs that dense training would have spent
                    record.update(stage=stage_at(iter_num), flops_dense=iter_num * flops_per_iter_dense)
                try:
                    with open(log_path, 'a') as f:
                        f.write(json.dumps(record) + '\n')
                except OSError as e:  # a full disk: stop, keeping what is there
                    stop = (f"cannot write {log_path} at iter {iter_num} ({e.strerror or first_line(e)}): stopping; "
                            f"free some disk space and continue with --init_from=resume")
            improved = losses['val_loss'] < best_val_loss
            best_val_loss = min(best_val_loss, losses['val_loss'])
            if stop is None and iter_num > 0 and not eval_only and (improved or always_save_checkpoint
                                                                     or iter_num == max_iters):
                checkpoint = {
                    'model': raw_model.state_dict(),
                    'optimizer': optimizer.state_dict(),
                    'scaler': scaler.state_dict(),
                    'model_args': asdict(raw_model.config),
                    'iter_num': iter_num,
                    'best_val_loss': best_val_loss,
                    'config': config,
                    'meta': meta,
                    'rng': all_states,
                    'train_seconds': train_seconds,
                    'flops': flops_spent,
                }
                print(f"saving checkpoint to {ckpt_path}")
                try:  # write, then rename: a crash never leaves half a file; the one before becomes ckpt_prev.pt
                    torch.save(checkpoint, ckpt_path + '.tmp')
                    if keep_prev and os.path.exists(ckpt_path):
                        os.replace(ckpt_path, prev_path)
                    os.replace(ckpt_path + '.tmp', ckpt_path)
                    keep_prev = True
                except (OSError, RuntimeError) as e:  # a full disk: torch.save raises either
                    if os.path.exists(ckpt_path + '.tmp'):
                        os.remove(ckpt_path + '.tmp')
                    stop = (f"cannot save {ckpt_path} at iter {iter_num} ({first_line(e)}): stopping; the checkpoints "
                            f"before it are kept; free some disk space and continue with --init_from=resume")
                checkpoint = None
            t0 = t_train = time.time()
        if ddp:  # rank 0 tells every rank whether its eval stopped the run
            flag = [stop]
            dist.broadcast_object_list(flag, src=0)
            stop = flag[0]
        if stop:
            leave(stop)
    if eval_only or iter_num >= max_iters:
        break

    # one optimizer step: forward, backward and gradient accumulation over micro-steps
    raw_model.set_step(iter_num, max_iters)  # advances the bypass and balancer schedules
    if est:  # this step's sub-network, for all its micro-steps (stage 3: None, the full model), and its FLOPs
        set_subnetwork(raw_model, subnetwork_at(raw_model, iter_num, seed, stage_at(iter_num), est_p_heads,
                                                est_p_units, est_p_layers))
        flops_spent += 3 * forward_flops(raw_model, block_size) * (tokens_per_iter // block_size)
    else:
        flops_spent += flops_per_iter_dense
    try:
        for micro_step in range(gradient_accumulation_steps):
            X, Y = get_batch('train', train_gen)
            if ddp:
                # sync gradients only at the last micro-step; set before the forward, which prepares the reduction
                model.require_backward_grad_sync = (micro_step == gradient_accumulation_steps - 1)
            with ctx:
                logits, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps  # the gradients add up over micro-steps: average them
            scaler.scale(loss).backward()
    except torch._dynamo.exc.TorchDynamoException as e:
        reason = next((s for s in str(e).splitlines() if s.strip() and 'raised:' not in s), type(e).__name__)
        raise SystemExit(f"torch.compile failed ({reason.strip()}): run with --compile=False") from None
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)

    if iter_num % log_interval == 0:
        lossf = loss.item() * gradient_accumulation_steps  # the last micro-step's loss; .item() waits for the GPU
        if ddp:  # its mean over the ranks: a rank whose loss is not finite stops them all, together
            lossf_all = torch.tensor(lossf, device=device)
            dist.all_reduce(lossf_all)
            lossf = lossf_all.item() / ddp_world_size
        if not math.isfinite(lossf):
            leave(f"loss is {lossf} at iter {iter_num}: stopping; the last good checkpoint (if any) is kept in "
                  f"{ckpt_path}; try a lower --learning_rate or --grad_clip")
    t1 = time.time()
    dt, t0 = t1 - t0, t1
    if iter_num % log_interval == 0 and master_process:
        if local_iter_num >= 5:  # let the first iterations (compilation, warmup) pass
            mfu = estimate_mfu(raw_model, batch_size * gradient_accumulation_steps, dt)
            running_mfu = running_mfu if mfu is None else mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
        print(f"iter {iter_num}: loss {lossf:.4f}, lr {lr:.2e}, {dt * 1000:.0f}ms, {tokens_per_iter / dt:,.0f} tok/s"
              + (f", mfu {running_mfu * 100:.1f}%" if running_mfu >= 0 else '')
              + (f", EST stage {stage_at(iter_num)}, {flops_spent:.3g} FLOPs spent "
                 f"({(iter_num + 1) * flops_per_iter_dense:.3g} dense)" if est else ''), flush=True)
    iter_num += 1
    local_iter_num += 1

leave()  # every rank, after rank 0's last eval and checkpoint
if master_process:
    release_lock()  # atexit would too; this frees it for a next run in this same process (tests run train.py so)

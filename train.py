"""
Train SUBLLM, or its LLaMA baseline, on the token files that prepare.py writes. One script for a CPU, one GPU
or many GPUs, on one machine or several: DDP, or FSDP with --fsdp=True (distributed.py, docs/distributed.md).

    python prepare.py --tokenizer=byte && python train.py config/tiny_cpu.py     # a few minutes on a laptop CPU
    python train.py config/tiny_cpu.py --structure=TTTTTTTTTT                    # same blocks, no levels: LLaMA
    python train.py config/gpu_subllm_250m.py                                    # one GPU
    torchrun --standalone --nproc_per_node=8 train.py config/gpu_subllm_250m.py  # 8 GPUs on one node
    torchrun --standalone --nproc_per_node=8 train.py config/gpu_subllm_250m.py --fsdp=True   # sharded over them
    python train.py config/tiny_cpu.py --init_from=resume                        # continue from out_dir/ckpt.pt
    python train.py config/grow_tli_copy_zero.py                                 # 1.5x deeper copy of a trained model

Every global in the first section is a setting. A config file (python that assigns some of them) overrides the
defaults, then --key=value flags override both; `python train.py --help` lists them all. out_dir gets log.jsonl (a
JSON record per eval), ckpt.pt (everything to resume or to sample; --fsdp=True: ckpt.dcp/, a file per rank) and
ckpt_prev.pt (the one before it): run_dir.py.
SIGTERM or SIGUSR1 (a preemption) saves ckpt.pt at the end of the iteration and exits 0: --init_from=resume goes on.
"""
import gc
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, fields
from functools import partial

import numpy as np
import torch

from configurator import check_ranges, configure, resolve_device, settings_of
from dataset import open_dataset
from distributed import Ranks
from est import est_plan, est_stage, set_subnetwork, subnetwork_at
from flops import estimate_mfu, forward_flops
from grow import grow_checkpoint
from hf import from_hf_run
from model import SubLLMConfig, SubLLM
from run_dir import RunDir, eval_line, model_from, restore, rng_state

# -----------------------------------------------------------------------------
# default settings: a small SUBLLM on the default corpus
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 50                 # batches per split at each eval
eval_only = False               # evaluate once (at iter 0, or at the resumed checkpoint) and exit
always_save_checkpoint = True   # save at every eval; if False only when val loss improves (and always at the end)
init_from = 'scratch'           # 'scratch', 'resume' (out_dir/ckpt.pt), 'grow' (grow_from's, deeper) or 'hf' (hf_model)
overwrite = False               # a new run (scratch, grow) in an out_dir that holds another run's checkpoint or log:
                                # False refuses, True deletes them and starts afresh
# growing a trained model (init_from='grow'): a new run at iter 0, fresh optimizer, from grow_from/ckpt.pt's weights
grow_from = ''                  # the out_dir of the trained model
grow_method = 'tli'             # 'tli': inject a block after every grow_k-th; 'dus': Depth Up-Scaling, drops grow_m
grow_k = 2                      # TLI: n blocks -> n + n // grow_k
grow_init = 'copy_zero'         # TLI: 'copy_zero' (injected blocks start as the identity) or 'copy'
grow_m = 2                      # DUS: n blocks -> 2 * (n - grow_m)
hf_model = ''                   # init_from='hf': its directory (or hub id); a new run at iter 0, dims from its config
hf_init = 'scratch'             # its new levels: 'scratch', 'c1' (bypass c 1) or 'fitted' (and fitted scorers): hf.py
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
balancer = 'centred'            # 'centred' (the spec's, common mode removed), 'spec' or 'strong' (docs/quality.md)
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
fsdp = False                    # True: FSDP2 shards weights, gradients and AdamW state over the processes (1/N each),
                                # bf16 compute by policy, sharded checkpoints ckpt.dcp/ that resume at any N
seed = 1337                     # initial weights, training batches, dropout
eval_seed = 1337                # the eval batches: kept apart from seed, so that runs of any seed are scored alike
# Evolving Subnetwork Training (EST, arXiv 2406.06962; est.py): each step trains a random sub-network, in 3 stages
# (some blocks, heads and units; all blocks, some heads and units; the full model), on the same lr schedule
est = False
est_stage1_end = 0.25           # fractions of max_iters
est_stage2_end = 0.65
est_p_heads = 0.5               # stages 1 and 2: fraction of the KV groups (with all their query heads) a block runs
est_p_units = 0.5               # stages 1 and 2: fraction of the SwiGLU hidden units a block runs
est_p_layers = 0.5              # stage 1: fraction of the blocks that run (first, last and one per level always do)
# Weights & Biases, as nanoGPT (optional: pip install wandb): rank 0 sends it what log.jsonl gets
wandb_log = False               # True: rank 0 sends each eval's record to wandb
wandb_project = 'subllm'        # the wandb project of the run
wandb_run_name = ''             # '': wandb picks one

# -----------------------------------------------------------------------------
user_keys = configure(globals(), tuples=('keep_ratio',))  # config files, then --key=value (configurator.py)
config = {k: globals()[k] for k in settings_of(globals())}  # saved in the checkpoint
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
for k, choices in dict(init_from=('scratch', 'resume', 'grow', 'hf'), dtype=('auto', 'float32', 'bfloat16', 'float16'),
                       selection=('topk', 'threshold'), balancer=('spec', 'centred', 'strong')).items():
    if globals()[k] not in choices:
        raise SystemExit(f"--{k} must be one of {', '.join(choices)}, got {globals()[k]!r}")
if init_from == 'grow' and grow_from and os.path.abspath(grow_from) == os.path.abspath(out_dir):
    raise SystemExit(f"out_dir and grow_from are both {out_dir!r}: give the grown run its own --out_dir, or its "
                     f"checkpoints would overwrite the model it grows from")
est_line = est_plan(max_iters, est_stage1_end, est_stage2_end, est_p_heads, est_p_units, est_p_layers) if est else ''
# -----------------------------------------------------------------------------

# device, precision and DDP or FSDP (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE)
device, device_type, dtype = resolve_device(device, dtype)  # 'auto' resolved, and checked against this machine
ranks = Ranks(device, device_type, fsdp, dtype)  # this process among torchrun's (distributed.py)
ddp, ddp_rank, ddp_world_size, master_process = ranks.ddp, ranks.rank, ranks.world_size, ranks.master
device = ranks.device  # under DDP on GPUs: this rank's, cuda:LOCAL_RANK
gradient_accumulation_steps = ranks.share(gradient_accumulation_steps)  # micro-steps per process
tokens_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size * block_size

torch.manual_seed(seed)  # the initial weights, the same on every rank (FSDP shards them; DDP copies rank 0's)
np.random.seed(seed + ddp_rank)
random.seed(seed + ddp_rank)
train_gen = torch.Generator().manual_seed(seed + ddp_rank)  # picks this rank's training crops; saved for resume
torch.set_float32_matmul_precision('high')  # TF32 matmuls on Ampere and newer
ptdtype = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype]
ctx = nullcontext() if dtype == 'float32' or fsdp else torch.autocast(device_type=device_type, dtype=ptdtype)

# data: flat arrays of token ids, described by meta.json: train.bin and val.bin, or the shards that meta.json lists
data_path = os.path.join(data_dir, dataset)
meta, data_files, first_crop = open_dataset(data_path, block_size)  # checked: one line when they are not right


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


# model: from scratch, from out_dir/ckpt.pt (ckpt_prev.pt if ckpt.pt is damaged), or grown from another run's
run = RunDir(out_dir, wandb_init=dict(project=wandb_project, name=wandb_run_name or None, config=config) if wandb_log
             else None, sharded=fsdp)  # out_dir's life, and with --wandb_log=True the same records on wandb
say = print if master_process else lambda line: None
iter_num, best_val_loss, train_seconds = 0, float('inf'), 0.0
checkpoint = None
if init_from == 'resume':
    checkpoint, path = run.load(('model', 'optimizer', 'scaler', 'model_args', 'iter_num', 'best_val_loss', 'config',
                                 'rng', 'train_seconds'), config, say=say)
    model = model_from(checkpoint, path)  # its shape from the checkpoint (--fsdp: its weights after sharding, restore)
    iter_num, best_val_loss, train_seconds = (checkpoint[k] for k in ('iter_num', 'best_val_loss', 'train_seconds'))
elif init_from == 'grow':  # a new run at iter 0, from a deeper copy of grow_from's model (grow.py)
    model = grow_checkpoint(grow_from, grow_method, grow_k, grow_init, grow_m, say=say)
elif init_from == 'hf':  # a new run at iter 0 from a Hugging Face LLaMA, in this run's structure (hf.py)
    model = from_hf_run(config, meta, data_path, say=say)
else:
    model_args = {f.name: config[f.name] for f in fields(SubLLMConfig) if f.name in config}  # the settings named so
    model_args.update(vocab_size=64 * math.ceil(meta['vocab_size'] / 64),  # a multiple of 64 is faster (50257 -> 50304)
                      n_kv_head=n_kv_head or None, ffn_hidden=ffn_hidden or None)
    try:
        model = SubLLM(SubLLMConfig(**model_args))
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad model settings: {e}") from None
if ddp_rank:  # dropout, the Balancer's coin flips: each rank its own (rank 0 goes on from seed, as one process does)
    torch.manual_seed(seed + ddp_rank)
vocab_size = model.config.vocab_size
if meta['vocab_size'] > vocab_size:  # (a model from scratch always fits)
    raise SystemExit(f"the data's vocab ({meta['vocab_size']}) is larger than the model's ({vocab_size}): "
                     f"--init_from={init_from} needs the dataset that model was trained on")
if block_size > model.config.block_size:
    raise SystemExit(f"block_size={block_size} is longer than the checkpoint model's ({model.config.block_size})")
levels = model.levels()  # empty for the LLaMA baseline
use_compile = compile and (device_type == 'cuda' or 'compile' in user_keys)
if master_process:
    print(f"device {device}, dtype {dtype}, compile {use_compile}, {ddp_world_size} process(es)")
    print(f"{model.get_num_params() / 1e6:.2f}M parameters, vocab {vocab_size} ({meta['tokenizer']} tokens)")
    print(model.describe())
    print(f"tokens per iteration: {tokens_per_iter:,} = {ddp_world_size} process(es) x {gradient_accumulation_steps} "
          f"accumulation x {batch_size} batch x {block_size} block")
if est and 'R' in model.config.structure:
    raise SystemExit("--est=True does not support recurrent blocks ('R' in the structure): train it without est")

raw_model = model  # the plain module (under FSDP sharded in place): evals, checkpoints, set_step and MFU use it
if use_compile:
    say("compiling the model (the first iteration takes a minute or so)")
model = ranks.wrap(model, use_compile, est)  # on the device, compiled, and DDP or FSDP under torchrun (distributed.py)
say(ranks.state_line(raw_model))  # the bytes each rank holds: 1/N of them under FSDP
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))  # fp16 needs loss scaling; bf16 does not
optimizer = raw_model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type)
# a resumed run: the optimizer, and this process's own state; resumed_at: the iter whose eval the checkpoint holds
resumed_at = None if checkpoint is None else restore(checkpoint, path, raw_model, optimizer, scaler, ddp_rank,
                                                    ddp_world_size, train_gen, device_type == 'cuda', levels, seed, say)

# out_dir: one run at a time, and not over another run's checkpoint (run_dir.py); rank 0 tells the others below
refusal = run.claim(init_from == 'resume', overwrite) if master_process and not eval_only else None  # see leave_if


def leave(message=None):
    """End the run on every rank at once (all call it at the same point), releasing out_dir first; with a message,
    every rank exits 1 and rank 0 prints it (one line)."""
    global model
    run.release()
    if ddp:  # free the DDP wrapper (its reducer holds gloo work) while the interpreter is whole: freed at exit
        model = None  # instead, it aborted a rank ("terminate called without an active exception") 1 run in 6
        gc.collect()
    ranks.leave(message)


def leave_if(message):
    """Rank 0's message (None: carry on) reaches every rank; with one, every rank leaves, together."""
    message = ranks.from_master(message)
    if message:
        leave(message)


leave_if(refusal)  # another run holds out_dir, or it holds another run's checkpoint (run.claim)
flops_per_iter_dense = 3 * forward_flops(raw_model, block_size) * (tokens_per_iter // block_size)  # bwd = 2x fwd
flops_spent = 0.0 if checkpoint is None else checkpoint.get('flops', iter_num * flops_per_iter_dense)
checkpoint = None  # free the memory


stage_at = partial(est_stage, max_iters=max_iters, stage1_end=est_stage1_end, stage2_end=est_stage2_end)  # 1, 2, 3
if est:
    say(est_line)


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


def calibrate_cuts():
    """At the end of training, each level's running cut re-estimated in eval mode (SubLLM.calibrate_cuts) on
    eval_iters train batches other than the eval's, so that the final eval's kept fractions are measured, not fitted."""
    generator = torch.Generator().manual_seed(eval_seed + 2_000_003)
    set_subnetwork(raw_model, None)  # EST: the full model, the one that is evaluated and saved
    before = [level.score_offset.item() for level in levels]
    with ctx:
        raw_model.calibrate_cuts([get_batch('train', generator)[0] for _ in range(eval_iters)])
    say(f"running cuts calibrated in eval mode on {eval_iters} train batches: " + ', '.join(
        f"d{level.depth} {b:+.3f} -> {level.score_offset.item():+.3f}" for level, b in zip(levels, before)))


@torch.no_grad()
def estimate_loss():
    """Mean loss of each split over eval_iters batches, the same batches at every eval so that evals compare, in
    eval mode (the inference path). For SUBLLM also val_loss_train_selection, the same val batches with the
    training-time selection (train mode, no gradients), and per level the fractions kept and agreeing (run_dir.py)."""
    # positive tokens that the training steps since the last eval skipped, per level (on this process)
    dropped = [drop / max(1, seen) for _, seen, _, drop in raw_model.selection_stats()]
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
                    for level, offset in zip(levels, offsets):  # before the next eval-mode batch reads them
                        level.score_offset.copy_(offset)
            out[f'{split}_loss'] = losses.mean().item()
            if levels:  # each level's share of its parent's tokens in eval mode: on val batches, and on train's
                out['kept' if split == 'val' else 'kept_train'] = [k / max(1, n) for _, n, k in raw_model.level_stats()]
        if levels:
            out['val_loss_train_selection'] = losses_train_selection.mean().item()
            out['agree'] = [agree / max(1, seen) for _, seen, agree, _ in raw_model.selection_stats()]
            out['dropped'] = dropped
    raw_model.reset_level_stats()  # the training steps until the next eval count from zero
    raw_model.train()
    return out


if (est or fsdp) and use_compile:  # the blocks are compiled in place: evals eager, as raw_model's are otherwise
    estimate_loss = torch.compiler.set_stance('force_eager')(estimate_loss)
    calibrate_cuts = torch.compiler.set_stance('force_eager')(calibrate_cuts)


def save_checkpoint(save=True, **extra):
    """Everything to resume the run from here, or to sample from it, with every rank's own state (every rank calls
    it), if rank 0's save says so: rank 0 writes it, or under FSDP every rank its shards. Returns the problem (a full
    disk), or None."""
    rng_states = ranks.gather(rng_state(train_gen, device_type == 'cuda', levels))  # each rank resumes exactly
    if not ranks.from_master(save):
        return None
    state = {'scaler': scaler.state_dict(), 'model_args': asdict(raw_model.config), 'iter_num': iter_num,
             'best_val_loss': best_val_loss, 'config': config, 'meta': meta, 'rng': rng_states,
             'train_seconds': train_seconds, 'flops': flops_spent, **extra}  # and the model's and optimizer's
    return run.save(state, raw_model, optimizer, master_process)


# logging: a resumed run keeps the log's records up to its checkpoint; a new run starts an empty log
problem = run.start_log(iter_num if init_from == 'resume' else None) if master_process and not eval_only else None
leave_if(problem)
if not eval_only:
    run.catch_preemption()  # SIGTERM or SIGUSR1: finish the iteration, save, exit 0 (on every rank)

# training loop
if init_from == 'resume' and iter_num >= max_iters and not eval_only and master_process:
    print(f"the checkpoint is at iter {iter_num} and max_iters={max_iters}: nothing to do (raise --max_iters)")
t0 = t_train = time.time()  # t_train: start of the current stretch of training, evals excluded
local_iter_num, running_mfu = 0, -1.0
while True:
    lr = get_lr(iter_num)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr

    if eval_only or ((iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != resumed_at):
        stop = save = None  # rank 0's: why the run stops (a loss that is not finite, a full disk), and whether to save
        if device_type == 'cuda':
            torch.cuda.synchronize()
        train_seconds += time.time() - t_train
        if levels and iter_num == max_iters and not eval_only and raw_model.config.running_cut != 'off':
            calibrate_cuts()
        losses = estimate_loss()  # every rank (FSDP needs them all in each forward); rank 0's numbers are the run's
        if master_process:
            print(eval_line(iter_num, losses, levels, raw_model.config.selection), flush=True)
            if not all(map(math.isfinite, [losses['train_loss'], losses['val_loss']])):
                stop = (f"the eval loss is not finite at iter {iter_num}: stopping; the last good checkpoint (if "
                        f"any) is kept in {run.ckpt_path}; try a lower --learning_rate")
            if stop is None and not eval_only:
                record = dict(iter=iter_num, tokens=iter_num * tokens_per_iter, time_s=round(train_seconds, 3),
                              flops=flops_spent, lr=lr, **losses)
                if est:  # the FLOPs that dense training would have spent
                    record.update(stage=stage_at(iter_num), flops_dense=iter_num * flops_per_iter_dense)
                stop = run.log(record)
            improved = losses['val_loss'] < best_val_loss
            best_val_loss = min(best_val_loss, losses['val_loss'])
            save = stop is None and iter_num > 0 and not eval_only and (improved or always_save_checkpoint
                                                                         or iter_num == max_iters)
        stop = save_checkpoint(save) or stop
        t0 = t_train = time.time()
        leave_if(stop)  # rank 0 tells every rank whether its eval stopped the run
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
            ranks.sync_gradients(model, micro_step == gradient_accumulation_steps - 1)  # only at the last micro-step
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
        lossf = ranks.mean(lossf)  # over the ranks: a rank whose loss is not finite stops them all, together
        if not math.isfinite(lossf):
            leave(f"loss is {lossf} at iter {iter_num}: stopping; the last good checkpoint (if any) is kept in "
                  f"{run.ckpt_path}; try a lower --learning_rate or --grad_clip")
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
    if ranks.any(run.preempted):  # SIGTERM or SIGUSR1 on any rank: every rank saves and leaves at this iteration
        train_seconds += time.time() - t_train
        leave_if(save_checkpoint(preempted=run.preempted or 'a signal to another rank',
                                 level_stats=[level.stats.cpu() for level in levels]))
        say(f"stopped by {run.preempted or 'a signal to another rank'} at iter {iter_num}, saved in {run.ckpt_path}: "
            f"to continue, run the same command with --init_from=resume")
        break

leave()  # every rank, after rank 0's last eval and checkpoint

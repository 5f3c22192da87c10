"""
What each subsampled level of a trained SUBLLM does, read from its checkpoint (docs/quality.md's diagnostics).

    python diagnose.py --out_dir=out-tiny
    python diagnose.py --out_dir=out-q/subllm-s1 --rows=16 --json=diag.json

It feeds `rows` val crops of the checkpoint's block_size, one at a time (so that no padding enters a level), in
eval mode, and records each level's scores `w . x - score_offset` at its input. Per level it prints: kept (the
fraction of its parent's tokens with score > 0, what decoding runs), mean |score|, the mean soft weight
`clamp(s, 0, 1)` of the kept tokens and the share of them at weight 1 (a weight under 1 damps what the inner blocks
add: a kept token's output is x + c * w * (y - x)), the bypass gate c, and the spread (std) over rows of each
row's top-k cut (the score between its ceil(keep * n) largest and the rest): with one global threshold at eval, rows
whose cuts spread keep keep_ratio only on average.

With --drift_steps=N it then goes on training the checkpoint for N steps (its optimizer state, train crops, the
final learning rate min_lr and the final Balancer schedule) and prints, per level, how fast the raw score level
moved (the batch's cut before the offset; a least-squares slope per step) and where the batch's cut of the offset
scores sat on average: the running cut lags a moving level by about its speed / 0.05, and eval keeps fewer tokens
(cut below 0) or more. --balancer tries another Balancer for those steps (docs/quality.md, section 4).
"""
import json as json_lib
import math
import os

import numpy as np
import torch

from configurator import check_ranges, configure
from dataset import open_dataset
from run_dir import load_checkpoint, model_from

# -----------------------------------------------------------------------------
out_dir = 'out'         # reads out_dir/ckpt.pt
data_dir = 'data'       # the val split of the checkpoint's dataset: data_dir/<dataset>/val.bin (or its val shard)
rows = 16               # val crops of block_size tokens, fed one at a time
seed = 1337             # picks the crops
json = ''               # also write the table as JSON to this path
drift_steps = 0         # then train this many steps on and report the score level's drift and the running cut's lag
balancer = ''           # the Balancer for those steps ('spec', 'centred', 'strong'); '': the checkpoint's
# -----------------------------------------------------------------------------
configure(globals())
check_ranges(globals(), {'rows': ('[1, inf)', ' (val crops to score)'), 'seed': '[0, inf)',
                         'drift_steps': ('[0, inf)', ' (0: no drift run)')})

checkpoint, ckpt_path = load_checkpoint(out_dir, ('model', 'model_args', 'config'))
model = model_from(checkpoint, ckpt_path)  # one line when it does not fit this model.py
model.eval()
levels = model.levels()
if not levels:
    raise SystemExit(f"{ckpt_path}: structure {model.config.structure} has no subsampled level to diagnose")
train_config = checkpoint['config']
T = train_config.get('block_size', model.config.block_size)  # the training crops' length
folder = os.path.join(data_dir, train_config['dataset'])
meta, files, _ = open_dataset(folder, T)  # as train.py finds and checks them: one line when something is off
data = np.memmap(os.path.join(folder, files['val'][0]), dtype=meta['dtype'], mode='r')
starts = torch.randint(len(data) - T, (rows,), generator=torch.Generator().manual_seed(seed)).tolist()

records = {id(level): [] for level in levels}  # per level: (scores (T_level,)) per row


def record(level):
    def hook(module, args, output):  # output: the scorer's (1, T_level, 1) before the offset
        records[id(level)].append(output.squeeze(-1).squeeze(0).float() - level.score_offset)
    return hook


hooks = [level.scorer.register_forward_hook(record(level)) for level in levels]
with torch.no_grad():
    for s in starts:
        model(torch.from_numpy(data[s:s + T].astype(np.int64))[None])
for hook in hooks:
    hook.remove()

table = []
for level in levels:
    scores = torch.cat(records[id(level)])  # every row's scores at this level's input
    kept = scores > 0
    weights = scores[kept].clamp(0, 1)
    cuts = []
    for row in records[id(level)]:  # each row's top-k cut, as training's top-k would place it
        k = math.ceil(level.keep_ratio * row.numel())
        if 0 < k < row.numel():
            ranked = row.sort(descending=True).values
            cuts.append(((ranked[k - 1] + ranked[k]) / 2).item())
    table.append({'depth': level.depth, 'keep_ratio': level.keep_ratio, 'kept': kept.float().mean().item(),
                  'mean_abs_score': scores.abs().mean().item(),
                  'mean_weight_kept': weights.mean().item() if weights.numel() else float('nan'),
                  'kept_at_weight_1': (weights == 1).float().mean().item() if weights.numel() else float('nan'),
                  'bypass_c': level.bypass.c.mean().item(),
                  'row_cut_mean': float(np.mean(cuts)) if cuts else float('nan'),
                  'row_cut_std': float(np.std(cuts)) if cuts else float('nan')})

print(f"{ckpt_path}: iter {checkpoint.get('iter_num')}, structure {model.config.structure}, {rows} val rows of {T}")
print(f"{'depth':>5} {'keep':>5} {'kept':>6} {'mean|s|':>8} {'w kept':>7} {'w=1':>6} {'c':>6} {'cut mean':>9} "
      f"{'cut std':>8}")
for r in table:
    print(f"{r['depth']:>5} {r['keep_ratio']:>5.2f} {r['kept']:>6.3f} {r['mean_abs_score']:>8.2f} "
          f"{r['mean_weight_kept']:>7.2f} {r['kept_at_weight_1']:>6.2f} {r['bypass_c']:>6.2f} "
          f"{r['row_cut_mean']:>9.3f} {r['row_cut_std']:>8.3f}")


def batch_cut(scores, keep_ratio):
    """The score between the ceil(keep * n) largest of a batch's n scores and the rest (Level.track_cut's 'batch')."""
    ranked = scores.flatten().sort(descending=True).values
    k = math.ceil(keep_ratio * ranked.numel())
    return ((ranked[k - 1] + ranked[min(k, ranked.numel() - 1)]) / 2).item()


if drift_steps > 0:
    if 'optimizer' not in checkpoint:
        raise SystemExit(f"{ckpt_path} has no optimizer state: --drift_steps needs a checkpoint of train.py")
    if balancer and balancer not in ('spec', 'centred', 'strong'):
        raise SystemExit(f"--balancer must be 'spec', 'centred' or 'strong' ('': the checkpoint's), got {balancer!r}")
    if balancer:
        model.config.balancer = balancer  # the levels read it at every forward
    c = train_config
    optimizer = model.configure_optimizers(c['weight_decay'], c['min_lr'], (c['beta1'], c['beta2']), 'cpu')
    optimizer.load_state_dict(checkpoint['optimizer'])
    for group in optimizer.param_groups:
        group['lr'] = c['min_lr']
    model.train()
    model.set_step(checkpoint['iter_num'], c['max_iters'])
    train_data = np.memmap(os.path.join(folder, files['train'][0]), dtype=meta['dtype'], mode='r')
    seen = {id(level): [] for level in levels}  # per step: (the cut of the offset scores, the offset)

    def watch(level):
        def hook(module, args, output):  # training: the raw scores, before track_cut moves the offset
            offset = level.score_offset.item()
            seen[id(level)].append((batch_cut(output.detach().float() - offset, level.keep_ratio), offset))
        return hook

    for level in levels:
        level.scorer.register_forward_hook(watch(level))
    gen = torch.Generator().manual_seed(seed)
    for step in range(drift_steps):
        ix = torch.randint(len(train_data) - T - 1, (c['batch_size'],), generator=gen).tolist()
        crops = torch.from_numpy(np.stack([train_data[i:i + T + 1] for i in ix]).astype(np.int64))
        model(crops[:, :-1], crops[:, 1:])[1].backward()
        if c['grad_clip']:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c['grad_clip'])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    print(f"{drift_steps} more training steps at lr {c['min_lr']:g}, balancer {model.config.balancer}:")
    for level, row in zip(levels, table):
        cuts, offsets = np.array(seen[id(level)]).T
        raw = cuts + offsets  # the batch's cut before the offset: the score level
        slope = float(np.polyfit(np.arange(drift_steps), raw, 1)[0]) if drift_steps > 1 else 0.0
        row['drift'] = {'steps': drift_steps, 'balancer': model.config.balancer, 'cut_mean': float(cuts.mean()),
                        'cut_std': float(cuts.std()), 'level_per_step': slope,
                        'offset_moved': level.score_offset.item() - float(offsets[0])}
        print(f"  depth {level.depth}: score level {row['drift']['level_per_step']:+.4f} a step; the batch's cut of "
              f"the offset scores {cuts.mean():+.3f} on average (std {cuts.std():.3f}; 0: the running cut keeps up)")

if json:
    with open(json, 'w') as f:
        json_lib.dump({'checkpoint': ckpt_path, 'iter': checkpoint.get('iter_num'), 'levels': table}, f, indent=1)

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
"""
import json as json_lib
import math
import os

import numpy as np
import torch

from configurator import configure
from dataset import open_dataset
from run_dir import load_checkpoint, model_from

# -----------------------------------------------------------------------------
out_dir = 'out'         # reads out_dir/ckpt.pt
data_dir = 'data'       # the val split of the checkpoint's dataset: data_dir/<dataset>/val.bin (or its val shard)
rows = 16               # val crops of block_size tokens, fed one at a time
seed = 1337             # picks the crops
json = ''               # also write the table as JSON to this path
# -----------------------------------------------------------------------------
configure(globals())

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


for level in levels:
    level.scorer.register_forward_hook(record(level))
with torch.no_grad():
    for s in starts:
        model(torch.from_numpy(data[s:s + T].astype(np.int64))[None])

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
if json:
    with open(json, 'w') as f:
        json_lib.dump({'checkpoint': ckpt_path, 'iter': checkpoint.get('iter_num'), 'levels': table}, f, indent=1)

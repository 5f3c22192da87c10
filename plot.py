"""
Compare training runs from their out_dir/log.jsonl files (written by train.py at every eval): a markdown table and,
when matplotlib is installed, a PNG of val loss against tokens, against training FLOPs (the frame of an efficiency method: SUBLLM spends
fewer per token) and against wall time.

    python plot.py out-parity-subllm out-parity-llama --png=assets/parity.png

matplotlib is optional (pip install matplotlib); without it the table is still printed.
"""
import json
import os
import sys


def read_log(out_dir):
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.exists(path):
        sys.exit(f"error: {path} not found: train first (python train.py ... --out_dir={out_dir})")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        sys.exit(f"error: {path} is empty: the run has not reached its first eval yet")
    return records


def val_loss_at_time(records, t):
    """Val loss at wall time t, linearly interpolated between evals (None if the run had not started by then)."""
    before = [r for r in records if r['time_s'] <= t]
    after = [r for r in records if r['time_s'] >= t]
    if not before:
        return None
    if not after:
        return before[-1]['val_loss']
    a, b = before[-1], after[0]
    if b['time_s'] == a['time_s']:
        return a['val_loss']
    return a['val_loss'] + (b['val_loss'] - a['val_loss']) * (t - a['time_s']) / (b['time_s'] - a['time_s'])


def table(runs):
    """runs: {name: records}. One row per run: at the last iter that every run reached, and at the wall time
    at which the fastest run stopped."""
    common_iter = min(recs[-1]['iter'] for recs in runs.values())
    common_time = min(recs[-1]['time_s'] for recs in runs.values())
    lines = [f"| run | val loss @ iter {common_iter} | val loss, training selection @ iter {common_iter} | "
             f"val loss @ {common_time:.0f} s | tokens/s | training TFLOPs | kept per level (eval) | "
             f"selections agree per level |", "|---|---|---|---|---|---|---|---|"]
    for name, recs in runs.items():
        at_iter = [r for r in recs if r['iter'] <= common_iter][-1]
        last = recs[-1]
        train_selection = at_iter.get('val_loss_train_selection')
        kept, agree = (' / '.join(f"{k:.3f}" for k in last.get(key, [])) or '-' for key in ('kept', 'agree'))
        tokens_per_s = last['tokens'] / last['time_s'] if last['time_s'] > 0 else float('nan')
        lines.append(f"| {name} | {at_iter['val_loss']:.4f} | "
                     f"{'-' if train_selection is None else f'{train_selection:.4f}'} | "
                     f"{val_loss_at_time(recs, common_time):.4f} | {tokens_per_s:,.0f} | "
                     f"{at_iter['flops'] / 1e12 if 'flops' in at_iter else float('nan'):.1f} | {kept} | {agree} |")
    return '\n'.join(lines)


def plot(runs, png):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot: pip install matplotlib")
        return
    fig, (by_tokens, by_flops, by_time) = plt.subplots(1, 3, figsize=(16, 4))
    for name, recs in runs.items():
        by_tokens.plot([r['tokens'] / 1e6 for r in recs], [r['val_loss'] for r in recs], label=name)
        with_flops = [r for r in recs if 'flops' in r]  # logs written before train.py logged FLOPs have none
        by_flops.plot([r['flops'] / 1e12 for r in with_flops], [r['val_loss'] for r in with_flops], label=name)
        by_time.plot([r['time_s'] / 60 for r in recs], [r['val_loss'] for r in recs], label=name)
    by_tokens.set_xlabel('tokens (M)')
    by_flops.set_xlabel('training FLOPs (TFLOP, as flops.forward_flops counts them)')
    by_time.set_xlabel('wall time (min)')
    for ax in (by_tokens, by_flops, by_time):
        ax.set_ylabel('val loss')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or '.', exist_ok=True)
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    flags = dict(a[2:].split('=', 1) for a in sys.argv[1:] if a.startswith('--') and '=' in a)
    unknown = set(flags) - {'png'}
    if not args or unknown:
        sys.exit("usage: python plot.py OUT_DIR [OUT_DIR ...] [--png=path.png]")
    runs = {os.path.basename(os.path.normpath(d)): read_log(d) for d in args}
    print(table(runs))
    if 'png' in flags:
        plot(runs, flags['png'])

"""
Compare training runs from their out_dir/log.jsonl files (written by train.py at every eval): a markdown table and,
when matplotlib is installed, a PNG of val loss against tokens, against training FLOPs (the frame of an efficiency
method: SUBLLM spends fewer per token) and against wall time.

    python plot.py out-parity-subllm out-parity-llama --png=assets/parity.png
    python plot.py --gap=docs/trend.csv --png=assets/trend_gap.png

--gap reads a table of final val losses, one row per seed of a SUBLLM run and its FLOP-matched LLaMA (columns
params_m, tokens_m, seed, subllm, llama, and optionally recipe), and shows the gap SUBLLM - LLaMA against tokens
(at the smallest params_m) and against parameters (at the smallest tokens_m), a line per recipe: the mean over
seeds, with their standard deviation.

matplotlib is optional (pip install matplotlib); without it the table is still printed. A line of a log that is not
a record (cut short by a crash, a bad edit) is skipped, and said.
"""
import csv
import os
import statistics
import sys

from run_dir import read_log, shown


FIELDS = ('iter', 'tokens', 'time_s', 'val_loss')  # what every record of train.py has, and the table needs


def records_of(out_dir):
    """The records of out_dir/log.jsonl (run_dir.read_log); a line that is not one is skipped, and said."""
    path = os.path.join(out_dir, 'log.jsonl')
    if not os.path.isfile(path):
        sys.exit(f"error: {path} not found: train first (python train.py ... --out_dir={out_dir})")
    try:
        records, _, bad = read_log(path, [(k, (int, float)) for k in FIELDS])
    except OSError as e:
        sys.exit(f"error: cannot read {path} ({e.strerror or e})")
    if bad:
        print(f"{path}: skipped {len(bad)} line(s) that are not records of train.py (line {shown(bad)})",
              file=sys.stderr)
    if not records:
        sys.exit(f"error: {path} has no records: the run has not reached its first eval yet")
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
        at_time = val_loss_at_time(recs, common_time)  # None: this run's log starts later (a resumed one)
        lines.append(f"| {name} | {at_iter['val_loss']:.4f} | "
                     f"{'-' if train_selection is None else f'{train_selection:.4f}'} | "
                     f"{'-' if at_time is None else f'{at_time:.4f}'} | {tokens_per_s:,.0f} | "
                     f"{at_iter['flops'] / 1e12 if 'flops' in at_iter else float('nan'):.1f} | {kept} | {agree} |")
    return '\n'.join(lines)


def pyplot():
    """matplotlib's pyplot, drawing to files; None (and said) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed, so no plot: pip install matplotlib")
        return None
    return plt


def save(fig, png):
    fig.tight_layout()
    try:
        os.makedirs(os.path.dirname(png) or '.', exist_ok=True)
        fig.savefig(png, dpi=120)
    except (OSError, ValueError) as e:  # ValueError: a file name matplotlib has no format for
        sys.exit(f"error: cannot write {png} ({getattr(e, 'strerror', None) or e})")
    print(f"wrote {png}")


def plot(runs, png):
    plt = pyplot()
    if plt is None:
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
    losses = [r['val_loss'] for recs in runs.values() for r in recs]
    top = max(recs[min(2, len(recs) - 1)]['val_loss'] for recs in runs.values())  # zoom past the first evals
    for ax in (by_tokens, by_flops, by_time):
        ax.set_ylim(min(losses) - 0.02, max(top, min(losses) + 0.1))
        ax.set_ylabel('val loss')
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, png)


def read_gaps(path):
    """{(recipe, params_m, tokens_m): [gap of each seed]} from a --gap table: SUBLLM's val loss minus its LLaMA's."""
    try:
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
        gaps = {}
        for row in rows:
            point = (row.get('recipe') or '', float(row['params_m']), float(row['tokens_m']))
            gaps.setdefault(point, []).append(float(row['subllm']) - float(row['llama']))
    except OSError as e:
        sys.exit(f"error: cannot read {path} ({e.strerror or e})")
    except (KeyError, TypeError, ValueError) as e:
        sys.exit(f"error: {path}: every row needs numbers in params_m, tokens_m, seed, subllm, llama ({e!r})")
    if not gaps:
        sys.exit(f"error: {path} has no rows")
    return gaps


def gap_table(gaps):
    lines = ["| recipe | SUBLLM parameters (M) | tokens (M) | seeds | gap SUBLLM - LLaMA (val loss) | per seed |",
             "|---|---|---|---|---|---|"]
    for (recipe, params, tokens), g in sorted(gaps.items()):
        spread = f" ± {statistics.stdev(g):.3f}" if len(g) > 1 else ""
        lines.append(f"| {recipe or '-'} | {params:g} | {tokens:g} | {len(g)} | {statistics.mean(g):+.3f}{spread} | "
                     f"{', '.join(f'{x:+.3f}' for x in g)} |")
    return '\n'.join(lines)


def gap_points(gaps, recipe, along):
    """[(x, the gap of each seed)] of one recipe along 'tokens' (at the smallest params_m) or 'params' (at the
    smallest tokens_m)."""
    base_params, base_tokens = min(p for _, p, _ in gaps), min(t for _, _, t in gaps)
    if along == 'tokens':
        return sorted((t, g) for (r, p, t), g in gaps.items() if r == recipe and p == base_params)
    return sorted((p, g) for (r, p, t), g in gaps.items() if r == recipe and t == base_tokens)


def plot_gaps(gaps, png):
    plt = pyplot()
    if plt is None:
        return
    recipes = sorted({r for r, _, _ in gaps})
    base_params, base_tokens = min(p for _, p, _ in gaps), min(t for _, _, t in gaps)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, along, label in [(axes[0], 'tokens', f'tokens (M), at {base_params:g}M parameters'),
                             (axes[1], 'params', f'SUBLLM parameters (M), at {base_tokens:g}M tokens')]:
        xs = set()
        for i, recipe in enumerate(recipes):
            points = gap_points(gaps, recipe, along)
            xs |= {x for x, _ in points}
            shift = 1 + 0.04 * (i - (len(recipes) - 1) / 2)  # recipes side by side at the same x (a log axis)
            line = ax.errorbar([x * shift for x, _ in points], [statistics.mean(g) for _, g in points], capsize=4,
                               marker='o', yerr=[statistics.stdev(g) if len(g) > 1 else 0 for _, g in points],
                               label=recipe or None)
            for x, g in points:
                ax.scatter([x * shift] * len(g), g, color=line[0].get_color(), s=10, alpha=0.5, zorder=3)
        ax.axhline(0, color='black', lw=0.8)
        ax.set_xscale('log')
        ax.minorticks_off()
        ax.set_xticks(sorted(xs), [f'{x:g}' for x in sorted(xs)])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        if any(recipes):
            ax.legend()
    axes[0].set_ylabel('val loss, SUBLLM - FLOP-matched LLaMA')
    fig.suptitle('mean over seeds ± their standard deviation (dots: each seed); below 0: SUBLLM is better')
    save(fig, png)


if __name__ == '__main__':
    if {'-h', '--help'} & set(sys.argv[1:]):
        print(__doc__.strip())
        sys.exit(0)
    args = [a for a in sys.argv[1:] if not a.startswith('-')]
    flags = dict(a[2:].partition('=')[::2] for a in sys.argv[1:] if a.startswith('-'))
    if (not args and 'gap' not in flags) or (args and 'gap' in flags) or set(flags) - {'png', 'gap'} \
            or '' in (flags.get('png'), flags.get('gap')):
        sys.exit("usage: python plot.py OUT_DIR [OUT_DIR ...] [--png=path.png], or python plot.py --gap=table.csv "
                 "[--png=path.png]")
    if 'gap' in flags:
        gaps = read_gaps(flags['gap'])
        print(gap_table(gaps))
        if 'png' in flags:
            plot_gaps(gaps, flags['png'])
        sys.exit(0)
    names = [os.path.basename(os.path.normpath(d)) for d in args]
    runs = {name if names.count(name) == 1 else os.path.normpath(d): records_of(d) for name, d in zip(names, args)}
    print(table(runs))
    if 'png' in flags:
        plot(runs, flags['png'])

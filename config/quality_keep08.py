# Quality ablation (docs/quality.md): config/parity_subllm.py with keep ratio 0.8 per level instead of 0.64.
exec(open('config/parity_subllm.py').read())
keep_ratio = 0.8
out_dir = 'out-quality-keep08'

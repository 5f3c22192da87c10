# Quality ablation (docs/quality.md): config/parity_subllm.py with the paper's scorer, w . x on the raw residual
# stream, instead of w . rms_norm(x).
exec(open('config/parity_subllm.py').read())
scorer_norm = False
out_dir = 'out-quality-raw-scorer'

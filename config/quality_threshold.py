# Quality study (docs/quality.md): SUBLLM with causal threshold selection, capacity slack 0.1 (1.049x the training
# FLOPs of top-k). Everything else is config/parity_subllm.py.
exec(open('config/parity_subllm.py').read())
selection = 'threshold'
capacity_slack = 0.1
out_dir = 'out-quality-threshold'

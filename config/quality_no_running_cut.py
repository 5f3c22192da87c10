# Quality ablation (docs/quality.md): config/parity_subllm.py without the running top-k cut subtracted from the
# scores (score_offset stays 0), so `score > 0` at eval rests on the Balancer alone.
exec(open('config/parity_subllm.py').read())
running_cut = 'off'
out_dir = 'out-quality-no-running-cut'

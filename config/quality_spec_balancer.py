# Quality ablation (docs/quality.md): config/parity_subllm.py with the spec's Balancer (Zipformer's gain 0.04 on the
# count push, the task gradient as it is) instead of ours (count gain 10, the task gradient's common mode removed).
exec(open('config/parity_subllm.py').read())
balancer = 'spec'
out_dir = 'out-quality-spec-balancer'

# Quality ablation (docs/quality.md): config/parity_subllm.py with one level of 4 blocks instead of two nested ones.
exec(open('config/parity_subllm.py').read())
structure = 'TTT(TTTT)TTT'
out_dir = 'out-quality-one-level'

# Quality trend (docs/quality.md): the FLOP-matched LLaMA (7 blocks, 0.962x the FLOPs) of
# config/trend_w256_subllm.py.
exec(open('config/trend_w256_subllm.py').read())
structure = 'TTTTTTT'
out_dir = 'out-trend/w256-llama7-s1337'

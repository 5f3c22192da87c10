# Quality trend (docs/quality.md): the FLOP-matched LLaMA (7 blocks, 0.969x SUBLLM's training FLOPs) of
# config/trend_5x_subllm.py: 5000 iterations, 10.2M byte tokens.
exec(open('config/trend_5x_subllm.py').read())
structure = 'TTTTTTT'
out_dir = 'out-trend/5x-llama7-s1337'

# The GPU duel's LLaMA (config/duel_subllm_50m.py): 11 blocks of the same width, 0.985x SUBLLM's training FLOPs at
# context 1024 (flops.forward_flops; 10 blocks would be 0.895x, 12 blocks 1.074x), everything else the same.
exec(open('config/duel_subllm_50m.py').read())
structure = 'TTTTTTTTTTT'
out_dir = 'out-duel-llama'

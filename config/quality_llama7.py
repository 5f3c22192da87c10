# Quality study (docs/quality.md): the FLOP-matched LLaMA. config/parity_llama.py with 7 blocks instead of 10, so
# that its training FLOPs per token are as close to SUBLLM top-k's (config/parity_subllm.py) as whole blocks allow:
# 0.969x of them (8 blocks would be 1.105x; the 10-block twin is 1.378x).
exec(open('config/parity_subllm.py').read())
structure = 'TTTTTTT'
out_dir = 'out-quality-llama7'

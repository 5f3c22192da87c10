# Quality study, second scale (docs/quality.md): config/parity_subllm.py at width 256 (8 heads, ~4x the parameters),
# same depth and tokens. --structure=TTTTTTTTTT for the LLaMA twin, --structure=TTTTTTT for the FLOP-matched LLaMA.
exec(open('config/parity_subllm.py').read())
n_embd = 256
n_head = 8
out_dir = 'out-quality-w256'

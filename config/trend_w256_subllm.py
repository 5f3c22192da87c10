# Quality trend (docs/quality.md): twice the width of the parity runs (n_embd 256, 8 heads: 8.7M parameters against
# 2.7M), the same 1000 iterations and 2.05M tokens, with round two's recipe (config/quality_batch_cut.py). Its
# FLOP-matched LLaMA (7 blocks: 0.962x the FLOPs at this width) is config/trend_w256_llama7.py.
exec(open('config/quality_batch_cut.py').read())
n_embd = 256
n_head = 8
out_dir = 'out-trend/w256-subllm-s1337'

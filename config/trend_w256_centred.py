# Quality trend (docs/quality.md): config/trend_w256_subllm.py (n_embd 256, 8 heads) with balancer='centred'
# (config/quality_centred.py). Its FLOP-matched LLaMA has no Balancer: config/trend_w256_llama7.py's runs serve both.
exec(open('config/trend_w256_subllm.py').read())
balancer = 'centred'
out_dir = 'out-trend/w256-centred-s1337'

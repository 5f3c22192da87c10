# Quality trend (docs/quality.md): config/trend_5x_subllm.py (5000 iterations) with balancer='centred'
# (config/quality_centred.py). Its FLOP-matched LLaMA has no Balancer: config/trend_5x_llama7.py's runs serve both.
exec(open('config/trend_5x_subllm.py').read())
balancer = 'centred'
out_dir = 'out-trend/5x-centred-s1337'

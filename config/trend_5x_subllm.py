# Quality trend (docs/quality.md): 5x the tokens of the parity runs (5000 iterations, 10.2M byte tokens), SUBLLM with
# round two's recipe (config/quality_batch_cut.py). Its FLOP-matched LLaMA: config/trend_5x_llama7.py. Seeds 1337
# and 1 (--seed=1 --out_dir=out-trend/5x-subllm-s1). A run that does not fit a session goes on with
# --init_from=resume (same command).
exec(open('config/quality_batch_cut.py').read())
max_iters = 5000
eval_interval = 250
out_dir = 'out-trend/5x-subllm-s1337'

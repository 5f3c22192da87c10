# Quality, round two (docs/quality.md): the spec's Balancer with the running cut taken over the whole batch
# (running_cut='batch', the default since round two) instead of the mean of each row's cut, which let the eval-time
# kept fraction drift 0.06-0.11 below keep. Everything else as config/parity_subllm.py (seeds 1337, 1, 2:
# --seed=N --out_dir=out-q2/batch-cut-sN).
exec(open('config/parity_subllm.py').read())
balancer = 'spec'
running_cut = 'batch'
out_dir = 'out-quality-batch-cut'

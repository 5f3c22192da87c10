# Quality round two (docs/quality.md section 4): round two's recipe (config/quality_batch_cut.py) with
# balancer='centred', the spec's Balancer with the task gradient's common mode taken out of the score gradient.
# The running cut cancels a shift of every score, so that common mode only moves the score level, and the running
# cut lags behind it (at n_embd 256 the level fell ~0.015 a step, and eval kept 0.57 for keep 0.64).
# Seeds 1337, 1, 2: --seed=N --out_dir=out-q2/centred-sN
exec(open('config/quality_batch_cut.py').read())
balancer = 'centred'
out_dir = 'out-q2/centred-s1337'

# Quality, round two (docs/quality.md): the paper's scorer, w . x on the raw residual stream instead of
# w . rms_norm(x), with the default recipe (config/quality_centred.py: the centred Balancer, the batch cut).
# Seeds 1337, 1, 2: --seed=N --out_dir=out-q2/raw-centred-sN
exec(open('config/quality_centred.py').read())
scorer_norm = False
out_dir = 'out-q2/raw-centred-s1337'

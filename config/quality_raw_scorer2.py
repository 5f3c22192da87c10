# Quality, round two (docs/quality.md): the paper's scorer, w . x on the raw residual stream instead of
# w . rms_norm(x), with round two's recipe (config/quality_batch_cut.py).
exec(open('config/quality_batch_cut.py').read())
scorer_norm = False
out_dir = 'out-quality-raw-scorer2'

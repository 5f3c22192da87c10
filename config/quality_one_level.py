# Quality ablation (docs/quality.md): one level of 4 blocks instead of two nested ones, with round two's recipe
# (config/quality_batch_cut.py). Its FLOP-matched LLaMA: see the config's line in docs/quality.md.
exec(open('config/quality_batch_cut.py').read())
structure = 'TTT(TTTT)TTT'
out_dir = 'out-quality-one-level'

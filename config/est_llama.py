# Evolving Subnetwork Training on the LLaMA twin of the parity runs (README, "Evolving Subnetwork Training"): the
# same model, data, tokens, seed and learning-rate schedule as config/parity_llama.py, with --est=True and the
# default stages (25% of the iters with half the blocks, heads and units; 40% all blocks, half the heads and units;
# the last 35% the full model). Compare with out-parity-llama:
#   OMP_NUM_THREADS=1 python train.py config/est_llama.py
#   python plot.py out-parity-llama out-est-llama
import os

exec(open(os.path.join(os.path.dirname(__file__), 'parity_llama.py')).read())
out_dir = 'out-est-llama'
est = True

# Evolving Subnetwork Training on SUBLLM (README, "Evolving Subnetwork Training"): the same model, data, tokens,
# seed and learning-rate schedule as config/parity_subllm.py, with --est=True and the default stages. Scorers,
# upsampling and bypasses always run, and every level keeps at least one of its blocks. Compare with
# out-parity-subllm:
#   OMP_NUM_THREADS=1 python train.py config/est_subllm.py
#   python plot.py out-parity-subllm out-est-subllm
import os

exec(open(os.path.join(os.path.dirname(__file__), 'parity_subllm.py')).read())
out_dir = 'out-est-subllm'
est = True

# Recurrent transformer (Kausik, "Scaling Efficient LLMs", arXiv 2402.14746) at CPU scale: one recurrent block
# (structure 'R', window 16) against a 1-layer and a 6-layer LLaMA of the same width, on the same tokens (same seed,
# data order and schedule). Byte tokens of the stdlib corpus, context 256: the parity configs' settings, with 700
# iterations. The paper's run is char-level Shakespeare at d=384, 6 heads; d=128, 4 heads, batch 8 here, to fit
# ~25 CPU minutes for all three runs.
#   python prepare.py --tokenizer=byte
#   python train.py config/recurrent_r.py && python train.py config/recurrent_t1.py && python train.py config/recurrent_t6.py
#   python plot.py out-rec-r out-rec-t1 out-rec-t6
# The results (table, hardware, wall time) are in the README.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'parity_subllm.py')).read())
out_dir = 'out-rec-r'
structure = 'R'
rec_window = 16
max_iters = 700  # 1.43M tokens

# Grow config/grow_base.py's trained 8 blocks to 12 with Transformer Layer Injection: after every 2nd block a copy
# of it with its attention output and MLP down projections zeroed (same function at iter 0), then 150 more iters.
#   python train.py config/grow_base.py && python train.py config/grow_tli_copy_zero.py
# The other growths change only the lines below the exec: config/grow_tli_copy.py, config/grow_dus.py.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'grow_base.py')).read())
init_from = 'grow'
grow_from = 'out-grow-base'
grow_method = 'tli'
grow_k = 2
grow_init = 'copy_zero'
out_dir = 'out-grow-tli-copy-zero'
eval_interval = 25              # finer, to count the steps back to the base model's loss
max_iters = 150                 # a new run: iter 0 is the grown model, with a fresh optimizer
learning_rate = 1e-3            # half the base's peak, after a short warmup
warmup_iters = 10

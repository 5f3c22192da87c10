# The 12-block model of config/grow_tli_copy_zero.py trained from scratch for the base's + the continued tokens
# (300 + 150 iters), with the base's schedule.
#   python train.py config/grow_scratch.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'grow_base.py')).read())
structure = 'TTTTTTTTTTTT'
out_dir = 'out-grow-scratch'
max_iters = 450

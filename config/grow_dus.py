# The Depth Up-Scaling baseline (SOLAR) of config/grow_tli_copy_zero.py: two copies of the 8 trained blocks, the
# last 2 of one and the first 2 of the other dropped: 12 blocks A0..A5 B2..B7. Same continued training.
#   python train.py config/grow_base.py && python train.py config/grow_dus.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'grow_tli_copy_zero.py')).read())
grow_method = 'dus'
grow_m = 2
out_dir = 'out-grow-dus'

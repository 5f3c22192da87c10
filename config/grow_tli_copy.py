# Like config/grow_tli_copy_zero.py, but the injected blocks are plain copies (not the identity at iter 0).
#   python train.py config/grow_base.py && python train.py config/grow_tli_copy.py
import os

exec(open(os.path.join(os.path.dirname(__file__), 'grow_tli_copy_zero.py')).read())
grow_init = 'copy'
out_dir = 'out-grow-tli-copy'

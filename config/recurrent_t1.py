# The regular twin of config/recurrent_r.py with structure 'T': same width, data, tokens, seed and schedule.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'recurrent_r.py')).read())
structure = 'T'
out_dir = 'out-rec-t1'

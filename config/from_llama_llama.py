# The LLaMA of config/from_llama.py trained on as it is (no levels), on the same schedule: the arm to beat.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'from_llama.py')).read())
structure = 'TTTTTTTTTT'
out_dir = 'out-from-llama-llama'

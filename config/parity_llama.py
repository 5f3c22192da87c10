# The LLaMA twin of config/parity_subllm.py: the same 10 blocks, data, tokens, seed and schedule, no levels.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'parity_subllm.py')).read())
structure = 'TTTTTTTTTT'
out_dir = 'out-parity-llama'

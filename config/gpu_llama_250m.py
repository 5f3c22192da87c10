# The LLaMA baseline of gpu_subllm_250m.py: the same 24 blocks, run and data, with no subsampled levels.
import os

exec(open(os.path.join(os.path.dirname(__file__), 'gpu_subllm_250m.py')).read())
structure = 'T' * 24
out_dir = 'out-llama-250m'

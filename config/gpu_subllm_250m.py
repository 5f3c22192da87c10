# SUBLLM at the paper's 0.25B scale (arXiv 2406.06571): 24 LLaMA blocks, d_model 768, 12 heads, two nested levels
# keeping 0.64 of their parent's tokens each, context 4096, GPT-2 tokens (vocab 50257 -> 50304), untied embeddings.
# 247M parameters. Its LLaMA baseline is config/gpu_llama_250m.py (same run, no levels).
#   python prepare.py --input='corpus/**/*.txt' --name=corpus --tokenizer=gpt2    # then add --dataset=corpus
#   python train.py config/gpu_subllm_250m.py                                      # one GPU
#   torchrun --standalone --nproc_per_node=8 train.py config/gpu_subllm_250m.py   # 8 GPUs
# Bring a real corpus: the default stdlib one is ~4M GPT-2 tokens, enough for a smoke test only (this config reads
# ~5B tokens). An iteration is 524,288 tokens (16 micro-steps x 8 sequences x 4096).
out_dir = 'out-subllm-250m'
eval_interval = 500
eval_iters = 50
log_interval = 10
always_save_checkpoint = True

dataset = 'stdlib'
gradient_accumulation_steps = 16  # in total over all GPUs: 8 GPUs do 2 micro-steps each
batch_size = 8
block_size = 4096

n_embd = 768
n_head = 12
structure = 'TTTTT(TTTTT(TTTT)TTTTT)TTTTT'
keep_ratio = 0.64
tie_embeddings = False

learning_rate = 6e-4
max_iters = 10000  # 5.2B tokens, about 20 tokens per parameter
warmup_iters = 1000
min_lr = 6e-5
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0

dtype = 'auto'  # bfloat16 where the GPU has it, else float16 with a GradScaler
compile = True

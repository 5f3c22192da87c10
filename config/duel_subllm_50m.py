# The GPU duel (issue #26, gpu_check.py --stages=duel): SUBLLM at ~55M parameters against the LLaMA with the same
# training FLOPs (config/duel_llama_50m.py: 11 blocks, 0.985x the FLOPs), same data, tokens, seed and schedule,
# with the default recipe (the centred Balancer, running cut over the batch). Byte tokens of the Python stdlib (nothing
# to download): python prepare.py --tokenizer=byte. 1500 iterations of 32 x 1024 tokens (49M tokens); about 2
# minutes each on an H200 with torch.compile (an estimate: not measured yet).
out_dir = 'out-duel-subllm'
eval_interval = 500
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'stdlib'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 1024

n_embd = 512
n_head = 8
structure = 'TTT(TTT(TTTT)TTT)TTT'  # 16 blocks, two nested levels: 54.8M parameters
keep_ratio = 0.64

learning_rate = 1e-3
max_iters = 1500
warmup_iters = 100
min_lr = 1e-4
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0

dtype = 'auto'
compile = True

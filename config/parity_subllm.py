# Quality parity at CPU scale (issue: SUBLLM against its LLaMA twin). Same data, tokens, seed and schedule as
# config/parity_llama.py; only the structure differs. 2.7M parameters, byte tokens, context 256.
#   python prepare.py --tokenizer=byte
#   python train.py config/parity_subllm.py & python train.py config/parity_llama.py & wait
#   python plot.py out-parity-subllm out-parity-llama --png=assets/parity.png
# The results (table, plot, hardware, wall time) are in the README.
out_dir = 'out-parity-subllm'
eval_interval = 100
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'stdlib'
gradient_accumulation_steps = 1
batch_size = 8
block_size = 256

n_embd = 128
n_head = 4
structure = 'TT(TT(TT)TT)TT'  # 10 blocks, two nested levels
keep_ratio = 0.64
balancer = 'strong'  # what the parity and quality runs used (docs/quality.md); the default is now 'centred'
running_cut = 'rows'  # the same: the mean of each row's top-k cut; the default is now 'batch'

learning_rate = 2e-3
max_iters = 1000  # 2M tokens
warmup_iters = 50
min_lr = 2e-4

device = 'cpu'
compile = False
seed = 1337

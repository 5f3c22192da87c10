# Recurrent transformer (Kausik, "Scaling Efficient LLMs", arXiv 2402.14746) at CPU scale: one recurrent block
# (structure 'R', window 16) against a 1-layer and a 6-layer LLaMA of the same width, on the same tokens (same seed,
# data order and schedule). Byte tokens of the stdlib corpus, context 256. The paper's run is char-level
# Shakespeare at d=384, 6 heads; d=128, 4 heads, batch 8 here, to fit ~25 CPU minutes for all three runs.
#   python prepare.py --tokenizer=byte
#   python train.py config/recurrent_r.py && python train.py config/recurrent_t1.py && python train.py config/recurrent_t6.py
#   python plot.py out-rec-r out-rec-t1 out-rec-t6
# The results (table, hardware, wall time) are in the README.
out_dir = 'out-rec-r'
eval_interval = 100
eval_iters = 20
log_interval = 50
always_save_checkpoint = False

dataset = 'stdlib'
batch_size = 8
block_size = 256

n_embd = 128
n_head = 4
structure = 'R'
rec_window = 16

learning_rate = 2e-3
max_iters = 700  # 1.43M tokens
warmup_iters = 50
min_lr = 2e-4

device = 'cpu'
compile = False
seed = 1337

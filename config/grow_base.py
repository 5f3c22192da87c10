# Growing a trained model (README, "Growing a trained model: Transformer Layer Injection"): the 8-block LLaMA base.
# The whole experiment, one run after another (one CPU thread each; wall times with evals on a busy 2-core VM):
#   python prepare.py --tokenizer=byte
#   python train.py config/grow_base.py              # 8 blocks, 300 iters (~5 min)
#   python train.py config/grow_tli_copy_zero.py     # 12 blocks grown from it, 150 more iters (~5 min each)
#   python train.py config/grow_tli_copy.py
#   python train.py config/grow_dus.py
#   python train.py config/grow_scratch.py           # 12 blocks from scratch, 300 + 150 iters (~12 min)
# The README's table is read from each out_dir's log.jsonl (a grown run counts its iters and tokens from the growth).
out_dir = 'out-grow-base'
eval_interval = 50
eval_iters = 20                 # the same val batches in every run: estimate_loss uses a fixed seed
log_interval = 50
always_save_checkpoint = False

dataset = 'stdlib'
gradient_accumulation_steps = 1
batch_size = 8
block_size = 128

n_embd = 128
n_head = 4
structure = 'TTTTTTTT'          # the LLaMA baseline: growth only needs blocks

learning_rate = 2e-3
max_iters = 300
warmup_iters = 30
min_lr = 2e-4

device = 'cpu'
compile = False
seed = 1337

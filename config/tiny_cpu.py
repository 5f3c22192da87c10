# A small SUBLLM (2.7M parameters) that trains on a CPU in a few minutes, on byte tokens:
#   python prepare.py --tokenizer=byte        # the default corpus, Python's stdlib source, 12M bytes
#   python train.py config/tiny_cpu.py
# Measured on a fresh clone with the default recipe (the centred Balancer, running cut over the batch), torch's
# default threads, on a 2-core VM busy with two other runs: 8 minutes for the README's whole quickstart line; the val
# loss falls 5.54 (uniform over 256 bytes) -> 2.40 (iter 100) -> 2.13 (200) -> 2.02 (300), and in eval mode, with
# the cuts calibrated at the end, level 1 keeps 0.68 of the val tokens and level 2 0.64 of level 1's (0.61 / 0.62 of
# the eval's train batches; keep_ratio 0.64, so all within +-0.05).
# The LLaMA baseline, same blocks without levels: add --structure=TTTTTTTTTT --out_dir=out-tiny-llama
# (measured the same way: 2m51s, 121 s of CPU; val loss 2.41 -> 2.11 -> 1.98).
out_dir = 'out-tiny'
eval_interval = 100
eval_iters = 10
log_interval = 20
always_save_checkpoint = False  # save when the val loss improves, and at the end

dataset = 'stdlib'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 128

n_embd = 128
n_head = 4
structure = 'TT(TT(TT)TT)TT'  # 10 blocks; two nested levels, 0.64 and 0.64 * 0.64 = 0.41 of the tokens
keep_ratio = 0.64

learning_rate = 2e-3  # a small model takes a large learning rate
max_iters = 300
warmup_iters = 30
min_lr = 2e-4

device = 'cpu'
compile = False  # compiling takes minutes on a CPU, longer than this whole run

# A SUBLLM made from a trained LLaMA (docs/from_llama.md): the LLaMA twin of the parity setup, 1000 iterations,
# exported to Hugging Face's layout, loaded with its 10 blocks in TT(TT(TT)TT)TT and trained on.
#   python prepare.py --tokenizer=byte
#   python train.py config/parity_llama.py                              # the LLaMA (out-parity-llama)
#   python hf.py --out_dir=out-parity-llama --export=out-parity-llama-hf
#   python train.py config/from_llama.py                                # this: the SUBLLM made from it
#   python train.py config/from_llama_llama.py                          # the LLaMA trained on, the same schedule
import os

exec(open(os.path.join(os.path.dirname(__file__), 'parity_subllm.py')).read())
out_dir = 'out-from-llama'
init_from = 'hf'
hf_model = 'out-parity-llama-hf'
hf_init = 'scratch'  # the new levels as for training from scratch; 'c1' and 'fitted' did no better (the doc)
balancer = 'centred'  # the default recipe (parity_subllm.py keeps the one its runs used)
running_cut = 'batch'

# continued training: a short warmup to a peak 0.3x the from-scratch one (the model is trained; its new scorers are
# not), cosine down to a tenth of it
learning_rate = 6e-4
warmup_iters = 50
min_lr = 6e-5
max_iters = 1000

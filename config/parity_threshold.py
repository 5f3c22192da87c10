# Third arm of the quality-parity experiment: SUBLLM trained with causal threshold selection (selection='threshold':
# training keeps the tokens whose score is > 0, as decoding does, in a fixed capacity of keep * T * 1.25 tokens).
# Everything else is config/parity_subllm.py.
#   python train.py config/parity_threshold.py
#   python plot.py out-parity-subllm out-parity-threshold out-parity-llama
exec(open('config/parity_subllm.py').read())
out_dir = 'out-parity-threshold'
selection = 'threshold'

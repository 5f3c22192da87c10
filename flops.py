"""
What a forward pass costs (SUBLLM.md §9), counted the way SUBLLM saves it: each block with the tokens it really
sees. train.py logs the FLOPs spent and the MFU from it, bench.py prints the FLOP ratio of SUBLLM to its LLaMA twin
beside the measured speedup: the gap is the overhead of scoring, sorting, gathering and scattering.
"""
import torch

from est import est_fractions
from model import Block, RecurrentBlock


def forward_flops(model, T, keep=None):
    """Forward FLOPs of a SubLLM for one sequence of T tokens. keep: a keep fraction per level depth (list);
    default what training runs: top-k's ceil(keep * T), or the fixed capacity of threshold selection. With an EST
    sub-network set (est.set_subnetwork), only what it runs. Matmuls 2 * tokens * weights; causal attention
    2 * T^2 * C (the score and value products, counted whole as nanoGPT and the paper do)."""
    cfg = model.config
    kv_dim = cfg.n_kv_head * (cfg.n_embd // cfg.n_head)
    attn_weights = 2 * cfg.n_embd * cfg.n_embd + 2 * cfg.n_embd * kv_dim
    mlp_weights = 3 * cfg.n_embd * cfg.ffn_hidden

    def block_flops(t, heads=1, units=1):  # heads, units: the fractions an EST sub-network runs
        return 2 * t * (heads * attn_weights + units * mlp_weights) + heads * 2 * t * t * cfg.n_embd

    def stack_flops(stack, t):
        total = 0.0
        for layer in stack.layers:
            if isinstance(layer, Block):
                if not layer.est_skip:  # with an EST sub-network: only the heads and units it runs
                    total += block_flops(t, *est_fractions(layer))  # fractions 1, 1 for the dense block
            elif isinstance(layer, RecurrentBlock):  # the block on each window as RecurrentBlock.recur runs it
                w = layer.window
                sizes = [min(w, t - start) for start in range(0, t, w)]  # the windows; the last may be shorter
                total += block_flops(sizes[0])                                 # H_0 = T(X_0)
                total += sum(block_flops(w + n) for n in sizes[1:])            # [Y; H] = T([H; X]): w + n wide
                total += block_flops(sizes[-1])                                # the last window's readout
            else:
                t_inner = layer.training_length(t) if keep is None else keep[layer.depth - 1] * t
                total += 2 * t * cfg.n_embd + stack_flops(layer.inner, t_inner)  # scorer + inner blocks
        return total
    return stack_flops(model.stack, T) + 2 * T * cfg.n_embd * cfg.vocab_size


def gpu_peak_flops():
    """Dense bf16 peak of the current CUDA device, from its name; None on CPU or for an unlisted GPU (an MFU against
    the A100's 312 TFLOPs would read over 100% on an H100)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in [('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
                       ('L40S', 362e12), ('L4', 121e12), ('A10', 125e12), ('4090', 165e12), ('3090', 71e12)]:
        if key in name:
            return flops
    return None


def estimate_mfu(model, fwdbwd_per_iter, dt, peak_flops=None):
    """Model FLOPs utilization: achieved FLOP/s (fwd + bwd = 3x fwd, over sequences of block_size) over the
    device's peak. None when the peak is unknown (CPU, unlisted GPU)."""
    peak_flops = peak_flops or gpu_peak_flops()
    if peak_flops is None:
        return None
    return 3 * forward_flops(model, model.config.block_size) * fwdbwd_per_iter / dt / peak_flops

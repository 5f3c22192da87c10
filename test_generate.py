"""
Tests of generate.py's decoding that are not about exactness (test_model.py's cache tests are): what a decode step
costs in kernels and host reads against the LLaMA twin, the buckets of rows, the KV cache's size, and the loop.
"""
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from generate import Decoder, KVCache, attend_sparse, bucket, generate, sparse_pattern
from model import SubLLM, SubLLMConfig, llama_twin


class Counter(TorchDispatchMode):
    """The aten ops (an eager step's kernels) and host reads (.item() is aten._local_scalar_dense; .tolist() on a
    CPU tensor reads without a dispatch, so Tensor.tolist is counted by the test) under it."""

    def __init__(self):
        super().__init__()
        self.ops = self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def calibrated(structure, seed=0):
    """The issue's tiny model (n_embd 64), its levels' cuts calibrated to keep 0.64 of what reaches them."""
    torch.manual_seed(seed)
    model = SubLLM(SubLLMConfig(vocab_size=256, block_size=96, n_embd=64, n_head=4, structure=structure)).eval()
    model.calibrate_cuts([torch.randint(256, (8, 64), generator=torch.Generator().manual_seed(seed))])
    return model


def step_costs(model, B, monkeypatch, steps=8):
    """Mean aten ops and host reads of a decode step after a 64-token prompt, at batch B."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, 'tolist', lambda t: reads.append(1) or tolist(t))
    idx = torch.randint(256, (B, 64 + steps), generator=torch.Generator().manual_seed(B))
    with torch.no_grad():
        decoder = Decoder(model, B, 64 + steps)
        decoder(idx[:, :64])
        counter, reads[:] = Counter(), []
        with counter:
            for t in range(64, 64 + steps):
                decoder(idx[:, t:t + 1])
        decoder.close()
    return counter.ops / steps, (counter.reads + len(reads)) / steps


@pytest.mark.parametrize('B', [1, 4, 64])
def test_a_decode_step_launches_about_what_llama_does_at_any_batch_and_reads_once_per_level(B, monkeypatch,
                                                                                            record_property):
    """The kernels of a decode step do not grow with the batch (a Python loop over rows would: 2.9x LLaMA's at
    batch 64 before), they are at most 1.2x the LLaMA twin's, and the host reads at most once per level the step
    reaches (the LLaMA twin never)."""
    subllm = calibrated('TT(TT(TT)TT)TT')
    ops, reads = step_costs(subllm, B, monkeypatch)
    llama_ops, llama_reads = step_costs(SubLLM(llama_twin(subllm.config)).eval(), B, monkeypatch)
    record_property('ops_ratio', ops / llama_ops)
    assert llama_reads == 0 and 0 < reads <= 2
    assert ops <= 1.2 * llama_ops, (ops, llama_ops)


def test_sparse_attention_reads_only_the_rows_that_enter():
    """Eager decoding on a CPU attends for the rows that enter a level through their slots (attend_sparse): the
    same as SDPA over each row's own cache up to its token, with grouped-query heads, reading nothing of the other
    rows' caches (NaN there changes nothing)."""
    torch.manual_seed(0)
    B, H, Hkv, D, capacity = 6, 4, 2, 8, 10
    cache = KVCache(B, capacity, Hkv, D, torch.float32, 'cpu')
    cache.k.normal_(), cache.v.normal_()
    cache.k[[0, 2, 5]], cache.v[[0, 2, 5]] = float('nan'), float('nan')  # rows that do not enter
    rows, slots = torch.tensor([4, 1, 3]), torch.tensor([[9], [0], [5]])  # each row's token: its last slot seen
    q = torch.randn(3, H, 1, D)
    decoder = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(n_head=H)), pattern_base={},
                              dtype=torch.float32)
    out = attend_sparse(q, cache, sparse_pattern(decoder, cache, rows, slots))
    for i, (r, s) in enumerate(zip(rows.tolist(), slots[:, 0].tolist())):
        keys, values = cache.k[r:r + 1, :, :s + 1], cache.v[r:r + 1, :, :s + 1]
        expected = torch.nn.functional.scaled_dot_product_attention(q[i:i + 1], keys, values, enable_gqa=True)
        assert torch.allclose(out[i:i + 1], expected, atol=1e-6), (r, s)


def test_buckets_are_a_few_sizes_that_hold_the_rows_that_enter():
    assert [bucket(n, 64) for n in (1, 2, 3, 5, 8, 9, 17, 41, 64)] == [2, 2, 4, 8, 8, 16, 24, 48, 64]
    assert [bucket(n, 4) for n in (1, 2, 3, 4)] == [2, 2, 4, 4] and bucket(1, 1) == 1
    assert len({bucket(n, 64) for n in range(1, 65)}) == 10  # 2, 4, then multiples of 8: a graph each, compiled


def test_a_levels_cache_holds_what_is_expected_to_enter_it():
    """Keys and values of a level's blocks: room for keep_ratio products of max_len (plus 10%), not max_len: the
    issue's structure caches 0.74 of LLaMA's tokens, so its caches take about 0.77 of LLaMA's bytes."""
    model = calibrated('TT(TT(TT)TT)TT')
    bytes_of = {}
    for name, m in (('subllm', model), ('llama', SubLLM(llama_twin(model.config)).eval())):
        decoder = Decoder(m, 2, 96)
        bytes_of[name] = decoder.cache_bytes()
        decoder.close()
    capacities = [96] * 4 + [math.ceil(96 * 0.64 * 1.1)] * 4 + [math.ceil(96 * 0.64 ** 2 * 1.1)] * 2
    assert bytes_of['subllm'] / bytes_of['llama'] == pytest.approx(sum(c + 1 for c in capacities) / (10 * 97))
    assert bytes_of['subllm'] < 0.8 * bytes_of['llama']


def test_generate_errors_and_a_prompt_that_needs_no_new_token():
    model = calibrated('T(T)T')
    prompt = torch.randint(256, (2, 10))
    assert torch.equal(generate(model, prompt, 0), prompt)
    with pytest.raises(ValueError, match="longer than block_size=96"):
        generate(model, prompt, 90)
    decoder = Decoder(model, 2, 12)
    with pytest.raises(ValueError, match="longer than the caches' max_len=12"):
        decoder(torch.randint(256, (2, 13)))
    decoder.close()
    with pytest.raises(ValueError, match="recurrent blocks"):
        Decoder(SubLLM(SubLLMConfig(vocab_size=64, block_size=32, n_embd=32, n_head=4, structure='TR')), 1, 8,
                compiled='aot_eager')

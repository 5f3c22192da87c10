"""Tests of the recurrent block ('R' in the structure; Kausik, arXiv 2402.14746): tiny configs on CPU."""
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from flops import forward_flops
from generate import Decoder, generate
from model import SubLLM, SubLLMConfig, RecurrentBlock, llama_twin
from test_model import cached_logits

V = 64  # vocabulary of the tiny models
HERE = os.path.dirname(os.path.abspath(__file__))


def build(structure='R', w=4, alpha=0.0, learn=False, seed=0, **kw):
    """A random tiny model with larger weights than the training init (std 1.5 / sqrt(fan_in)), so that attention
    is far from uniform and a wrong window, position or state shows in the outputs."""
    config = SubLLMConfig(vocab_size=V, block_size=64, n_embd=32, n_head=4, structure=structure, rec_window=w,
                          rec_alpha=alpha, rec_learn_alpha=learn, **kw)
    torch.manual_seed(seed)
    model = SubLLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.5 / math.sqrt(p.size(1)))
    return model


def close(a, b, tol=1e-5):
    """Equal up to float32 rounding, relative to the size of the values (the accumulate variant grows them)."""
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


def naive_recurrence(block, x, w, alpha, cos, sin):
    """The recurrence written out window by window with plain Block calls: right-pad x (B, T, C) to a multiple of
    w, H_0 = T(X_0), H_k = second half of T([H_{k-1} + a_{k-1}; X_k + a_{k-1}]), each readout Y_k = T(H_k + a_k)
    computed on its own (not taken from a step's first half), a_k = alpha * Y_{k-1}, a_0 = 0."""
    B, T, C = x.shape
    n = -(-T // w)
    X = torch.cat([x, x.new_zeros(B, n * w - T, C)], dim=1).view(B, n, w, C)
    cos, sin = cos[None, :2 * w], sin[None, :2 * w]
    H, A, Y = [block(X[:, 0], cos[:, w:], sin[:, w:])], [torch.zeros(B, w, C)], []
    for k in range(n):
        Y.append(block(H[k] + A[k], cos[:, :w], sin[:, :w]))
        if k + 1 < n:
            A.append(alpha * Y[k])
            out = block(torch.cat([H[k] + A[k], X[:, k + 1] + A[k]], dim=1), cos, sin)
            H.append(out[:, w:])
    return torch.cat(Y, dim=1)[:, :T]


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("w,T", [(4, 16), (4, 13), (4, 3), (1, 7), (8, 8), (8, 21)])
def test_recurrent_block_equals_naive_window_by_window(w, T, alpha):
    model = build(w=w, alpha=alpha).eval()
    layer = model.stack.layers[0]
    assert isinstance(layer, RecurrentBlock)
    x = torch.randn(2, T, 32)
    with torch.no_grad():
        fast = layer(x, (model.rope_cos, model.rope_sin))
        slow = naive_recurrence(layer.block, x, w, alpha, model.rope_cos, model.rope_sin)
    assert fast.shape == (2, T, 32)
    assert close(fast, slow)


@pytest.mark.parametrize("alpha,learn", [(0.0, False), (0.5, False), (0.5, True)])
@pytest.mark.parametrize("w", [1, 4, 8])
def test_perturbing_token_p_changes_no_output_before_p(w, alpha, learn):
    model = build('RR', w=w, alpha=alpha, learn=learn).eval()
    idx = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(w))
    with torch.no_grad():
        base = model(idx, idx)[0]
        for p in (0, 5, 11, 23):
            other = idx.clone()
            other[0, p] = (idx[0, p] + 1) % V
            changed = model(other, other)[0]
            assert torch.allclose(changed[:, :p], base[:, :p], atol=1e-6), p
            assert (changed[:, p] - base[:, p]).abs().max() > 1e-3, p  # the token itself does matter


@pytest.mark.parametrize("structure,alpha,learn", [('R', 0.0, False), ('TRT', 0.0, False), ('RR', 0.0, False),
                                                   ('RR', 0.5, True), ('T(TT)R', 0.5, False)])
@pytest.mark.parametrize("prompt", [2, 4, 7])  # shorter than, equal to, longer than w = 4
def test_stateful_decoding_equals_full_recompute(structure, alpha, learn, prompt):
    model = build(structure, w=4, alpha=alpha, learn=learn).eval()
    idx = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(prompt))
    with torch.no_grad():
        full = model(idx, idx)[0]
        one_by_one = cached_logits(model, idx, [prompt] + [1] * (19 - prompt))
        mixed = cached_logits(model, idx, [prompt, 1, 5, 1, 3] + [1] * (19 - prompt - 10))  # chunks across windows
    assert close(one_by_one, full) and close(mixed, full)
    with_cache = generate(model, idx[:, :prompt], 12, top_k=1, use_cache=True)
    without = generate(model, idx[:, :prompt], 12, top_k=1, use_cache=False)
    assert torch.equal(with_cache, without)
    assert not any(layer.decoding for layer in model.stack.layers if isinstance(layer, RecurrentBlock))  # freed


def test_decoding_state_holds_the_last_window_and_the_open_one():
    """While decoding, an R layer keeps w state vectors and fewer than w pending inputs, whatever the prefix."""
    model = build('R', w=4).eval()
    layer = model.stack.layers[0]
    decoder = Decoder(model, 1, 40)
    with torch.no_grad():
        decoder(torch.randint(0, V, (1, 10)))
        for _ in range(20):
            decoder(torch.randint(0, V, (1, 1)))
            h, a = layer.state
            assert h.shape == (1, 4, 32) and a is None and layer.pending.size(1) < 4
    assert layer.pending.size(1) == 30 % 4
    decoder.close()


def test_r_inside_a_level_raises():
    for structure in ('T(R)T', 'T(T(TR)T)T'):
        with pytest.raises(ValueError, match="'R' at position .* inside a subsampled level"):
            SubLLMConfig(structure=structure)
    for kw, message in [({'rec_window': 0}, "at least 1"), ({'rec_alpha': 1.5}, r"in \[0, 1\]")]:
        with pytest.raises(ValueError, match=message):
            SubLLMConfig(structure='R', **kw)


def test_parameters_are_those_of_the_blocks_used():
    """An R layer is one block: 'R' has the parameters of the 1-layer LLaMA 'T', 'TRT' of 'TTT'; a learned alpha
    adds one number per R layer; the twin replaces R with T."""
    for structure in ('R', 'TRT', 'RR'):
        twin = llama_twin(build(structure).config)
        assert twin.structure == structure.replace('R', 'T')
        assert build(structure).get_num_params() == SubLLM(twin).get_num_params()
        learned = build(structure, alpha=0.5, learn=True)
        assert learned.get_num_params() == SubLLM(twin).get_num_params() + structure.count('R')


def test_learned_alpha_gets_a_gradient_and_every_parameter_one():
    model = build('RR', w=4, alpha=0.5, learn=True)
    idx = torch.randint(0, V, (2, 13))
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(layer.alpha.grad.abs() > 0 for layer in model.stack.layers)


def test_forward_flops_count_each_window_step():
    """T = 40, w = 16: windows of 16, 16, 8. The block runs on X_0 (16 wide), [H; X_1] (32), [H; X_2] (24) and the
    last readout (8), against 40 wide once for a plain block."""
    model = build('R', w=16)
    c = model.config
    weights = 4 * c.n_embd * c.n_embd + 3 * c.n_embd * c.ffn_hidden

    def block(t):
        return 2 * t * weights + 2 * t * t * c.n_embd
    head = 2 * 40 * c.n_embd * c.vocab_size
    assert forward_flops(model, 40) == block(16) + block(32) + block(24) + block(8) + head
    assert forward_flops(SubLLM(llama_twin(c)), 40) == block(40) + head
    # linear in T: each further window costs the same
    assert forward_flops(model, 16 * 9) - forward_flops(model, 16 * 8) == block(32) + 2 * 16 * c.n_embd * c.vocab_size


def test_train_and_sample_a_recurrent_model(tmp_path, monkeypatch, capsys):
    """train.py (a subprocess) trains a tiny 'R' model for a few iterations (its loss falls); sample.py loads the
    checkpoint and decodes."""
    data = tmp_path / 'data' / 'tiny'
    data.mkdir(parents=True)
    np.tile(np.arange(16, dtype=np.uint16), 200).tofile(data / 'train.bin')  # a repeating pattern: easy to learn
    np.tile(np.arange(16, dtype=np.uint16), 40).tofile(data / 'val.bin')
    (data / 'meta.json').write_text(json.dumps(dict(tokenizer='byte', vocab_size=256, dtype='uint16',
                                                    train_tokens=3200, val_tokens=640, source='test_recurrent.py')))
    out = str(tmp_path / 'out')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE)
    run = subprocess.run([sys.executable, os.path.join(HERE, 'train.py'), '--structure=R', '--rec_window=4',
                          '--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2',
                          '--max_iters=20', '--eval_interval=10', '--log_interval=10', '--warmup_iters=0',
                          '--learning_rate=1e-2', '--device=cpu', '--compile=False', f'--data_dir={tmp_path / "data"}',
                          '--dataset=tiny', f'--out_dir={out}'], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert 'recurrent, structure R, window 4' in run.stdout
    log = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert log[-1]['val_loss'] < 0.5 * log[0]['val_loss']
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)
    assert ckpt['model_args']['structure'] == 'R' and ckpt['model_args']['rec_window'] == 4
    monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={out}', '--device=cpu', '--num_samples=1',
                                      '--max_new_tokens=10', '--start=ab'])
    runpy.run_path(os.path.join(HERE, 'sample.py'), run_name='__main__')  # in this process: torch is imported
    printed = capsys.readouterr().out
    assert 'structure R' in printed and 'decode: 9 tokens' in printed


def test_bench_measures_a_recurrent_model_against_its_twin(monkeypatch, tmp_path, capsys):
    path = tmp_path / 'bench.json'
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--device=cpu', '--n_embd=32', '--n_head=2', '--ffn_hidden=64',
                                      '--vocab_size=256', '--structure=TRT', '--rec_window=8', '--seq_lens=32,64',
                                      '--modes=prefill,decode', '--tokens_per_batch=128', '--decode_batch=2', '--decode_tokens=4', '--warmup=0',
                                      '--iters=1', f'--json={path}'])
    runpy.run_path(os.path.join(HERE, 'bench.py'), run_name='__main__')
    out = json.loads(path.read_text())
    assert out['config']['structure'] == 'TRT' and out['config']['rec_window'] == 8
    assert len(out['records']) == 2 * 2 * 3 and not any(r['oom'] for r in out['records'])
    prefill = {(r['model'], r['seq_len']): r['flops'] for r in out['records'] if r['mode'] == 'prefill'}
    # the twin's attention grows with T, the recurrent block's does not: its FLOP share shrinks as T doubles
    assert prefill[('subllm', 64)] / prefill[('llama', 64)] < prefill[('subllm', 32)] / prefill[('llama', 32)]
    assert '| LLaMA tok/s | recurrent tok/s |' in capsys.readouterr().out

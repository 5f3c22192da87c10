"""
Smoke tests of bench.py on a tiny model on the CPU: it runs bench.py in this process with runpy (torch is already
imported: fast) and checks the records it writes with --json. No timing assertions: only that every measurement is
there and well-formed, that the scorer calibration keeps the configured fraction, and that an out-of-memory error
at one length becomes a row of the table instead of a crash.
"""
import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.join(HERE, 'bench.py')
TINY = ['--device=cpu', '--n_embd=32', '--n_head=2', '--ffn_hidden=64', '--vocab_size=256', '--structure=TT(T(T)T)T',
        '--keep_ratio=0.64', '--tokens_per_batch=512', '--decode_batch=2', '--decode_tokens=4', '--warmup=0',
        '--iters=1']


def bench(monkeypatch, tmp_path, *args):
    """Run bench.py in this process; returns its JSON output and what it printed."""
    path = tmp_path / 'bench.json'
    monkeypatch.setattr(sys, 'argv', ['bench.py', *TINY, f'--json={path}', *args])
    runpy.run_path(BENCH, run_name='__main__')
    return json.loads(path.read_text())


def test_every_mode_model_and_length_gives_a_well_formed_record(monkeypatch, tmp_path, capsys):
    out = bench(monkeypatch, tmp_path, '--seq_lens=32,64')
    records = out['records']
    expected = {(mode, model, T, B) for T in (32, 64) for model in ('llama', 'subllm')
                for mode, B in [('train', 512 // T), ('prefill', 512 // T), ('decode', 1), ('decode', 2)]}
    assert sorted((r['mode'], r['model'], r['seq_len'], r['batch_size']) for r in records) == sorted(expected)
    for r in records:
        assert not r['oom']
        for key in ('tokens_per_s', 'ms_per_iter', 'flops', 'ratio', 'flop_ratio'):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert isinstance(r['peak_mem_bytes'], int) and r['peak_mem_bytes'] >= 0  # CPU: peak RSS delta
        assert r['mfu'] is None  # no peak FLOP/s for a CPU
        if r['model'] == 'llama':
            assert r['ratio'] == r['flop_ratio'] == 1.0 and r['keep_fractions'] == []
        else:
            assert len(r['keep_fractions']) == 2 and all(0 <= k <= 1 for k in r['keep_fractions'])
            assert r['flop_ratio'] > 1.0  # SUBLLM does less work per token at any keep < 1
        if r['mode'] == 'decode':
            assert math.isfinite(r['blocks_ratio']) and r['blocks_ratio'] > 0
            assert r['blocks_per_token'] == 6 if r['model'] == 'llama' else 3 <= r['blocks_per_token'] <= 6
            assert r['ops_per_step'] > 100 and r['cache_bytes'] > 0  # a decode step's kernels; keys and values
            # host reads: none for LLaMA; for SUBLLM one per level a step reaches (level 1 always, level 2 not always)
            assert r['reads_per_step'] == 0 if r['model'] == 'llama' else 1 <= r['reads_per_step'] <= 2
        if r['mode'] == 'train' and r['model'] == 'subllm':
            k1 = math.ceil(0.64 * r['seq_len'])  # top-k keeps exactly ceil(keep * T) of its parent's tokens
            assert r['keep_fractions'] == [k1 / r['seq_len'], math.ceil(0.64 * k1) / k1]
    table, decode_table = capsys.readouterr().out.split('\n| mode |')[1].split('\n| decode seq_len |')
    assert len([line for line in table.splitlines() if line.startswith('| ')]) == 8  # one row per mode, T, batch
    assert len([line for line in decode_table.splitlines() if line.startswith('| ')]) == 4  # one per decode row
    decodes = {(r['seq_len'], r['batch_size']): r for r in records if r['mode'] == 'decode' and r['model'] == 'subllm'}
    for (T, B), r in decodes.items():  # the SUBLLM cache holds about what enters its levels: less than LLaMA's
        llama = next(x for x in records if x['model'] == 'llama' and (x['mode'], x['seq_len'], x['batch_size']) ==
                     ('decode', T, B))
        assert r['cache_bytes'] < llama['cache_bytes']


def test_calibrated_random_scorers_keep_the_keep_ratio_at_every_level_in_prefill_and_decoding(monkeypatch, tmp_path):
    """A random-init scorer keeps ~half the tokens with `score > 0`, and its scores shift from one sequence to the
    next; bench.py sets each level's offset on the measurement's own tokens, so that every level keeps keep_ratio
    of the tokens that reach it (to within a token of the 32 decoded at batch 1) in prefill and in decoding."""
    out = bench(monkeypatch, tmp_path, '--seq_lens=64', '--modes=train,prefill,decode', '--keep_ratio=0.5,0.8',
                '--decode_batch=4', '--decode_tokens=64', '--iters=2')
    subs = [r for r in out['records'] if r['model'] == 'subllm']
    assert [(r['mode'], r['batch_size']) for r in subs] == [('train', 8), ('prefill', 8), ('decode', 1), ('decode', 4)]
    for r in subs[1:]:
        assert r['keep_fractions'] == pytest.approx([0.5, 0.8], abs=0.05), r
    decode1 = subs[2]  # at batch 1 a step runs a level's blocks for its one row or not at all
    assert decode1['blocks_per_step'] == pytest.approx(decode1['blocks_per_token'])


def test_training_leaves_the_score_offsets_as_they_were(monkeypatch, tmp_path):
    """Training mode moves score_offset towards the top-k cut (Level.track_cut); bench.py puts it back, so that a
    checkpoint's scorers are measured as trained."""
    monkeypatch.setattr(sys, 'argv', ['bench.py', *TINY, '--seq_lens=32', '--modes=train', '--iters=2'])
    g = runpy.run_path(BENCH, run_name='__main__')
    assert all(level.score_offset.item() == 0.0 for level in g['models']['subllm'].levels())


def test_decode_calls_rewind_to_the_prompt_and_equal_the_full_forward(monkeypatch, tmp_path):
    """Each timed decode call rewinds the caches to the prefilled prompt: every call gives the logits of the full
    eval forward, at batch 1 and at a batch whose rows enter the levels at different steps."""
    monkeypatch.setattr(sys, 'argv', ['bench.py', *TINY, '--seq_lens=32', '--modes=decode', '--decode_tokens=12'])
    g = runpy.run_path(BENCH, run_name='__main__')
    for name, model in g['models'].items():
        for B in (1, 3):
            tokens = torch.randint(256, (B, 16 + 12), generator=torch.Generator().manual_seed(B))
            logits = []
            hook = model.lm_head.register_forward_hook(lambda m, args, out: logits.append(out[:, -1]))
            call, result = g['run_decode'](name, tokens, B, 32)
            logits.clear()  # the prompt's
            call()
            call()
            hook.remove()
            result(2)
            with torch.no_grad():
                full = torch.stack([model(tokens[:, :16 + j + 1])[0][:, -1] for j in range(12)])
            assert len(logits) == 36  # the first call also decodes once counted (count_decode), then twice timed
            for start in (0, 12, 24):
                assert torch.allclose(torch.stack(logits[start:start + 12]), full, atol=1e-5), (name, B, start)


def test_mid_preset_is_the_32m_model_of_issue_20(monkeypatch, tmp_path):
    path = tmp_path / 'mid.json'
    monkeypatch.setattr(sys, 'argv', ['bench.py', '--device=cpu', '--preset=mid', '--modes=prefill', '--seq_lens=8',
                                      '--tokens_per_batch=8', '--warmup=0', '--iters=1', f'--json={path}'])
    runpy.run_path(BENCH, run_name='__main__')
    out = json.loads(path.read_text())
    c = out['config']
    assert (c['n_embd'], c['n_head'], c['ffn_hidden'], c['vocab_size'], c['structure']) == \
        (512, 8, 1408, 512, 'TT(TT(TT)TT)TT')
    assert round(out['n_params']['subllm'] / 1e6, 1) == 32.6


def test_out_of_memory_at_one_length_is_a_row_not_a_crash(monkeypatch, tmp_path, capsys):
    sdpa = F.scaled_dot_product_attention

    def sdpa_that_runs_out_of_memory_at_64(q, k, v, **kwargs):
        if q.size(2) >= 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return sdpa(q, k, v, **kwargs)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', sdpa_that_runs_out_of_memory_at_64)
    out = bench(monkeypatch, tmp_path, '--seq_lens=32,64', '--modes=train,prefill')
    for r in out['records']:
        assert r['oom'] == (r['seq_len'] == 64)
        assert (r['tokens_per_s'] is None) == r['oom'] and (r['ratio'] is None) == r['oom']
    rows = capsys.readouterr().out.split('\n| mode |')[1].splitlines()
    assert sum('| 64 |' in line and '| OOM | OOM |' in line for line in rows) == 2  # train and prefill at 64


def test_bad_flag_is_a_one_line_error():
    result = subprocess.run([sys.executable, BENCH, '--n_embed=32'], capture_output=True, text=True, cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE), timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "unknown setting 'n_embed' (from --n_embed=32)" in result.stderr and 'n_embd' in result.stderr


def test_threshold_selection_trains_on_its_fixed_capacity(monkeypatch, tmp_path):
    """--selection=threshold: training runs each level on its capacity, ceil(keep * T * 1.25) at depth 1 and
    ceil(keep * that) inside, and the FLOP ratio counts those slots."""
    out = bench(monkeypatch, tmp_path, '--seq_lens=32', '--modes=train', '--selection=threshold')
    sub = next(r for r in out['records'] if r['model'] == 'subllm')
    c1 = math.ceil(0.64 * 32 * 1.25)
    assert sub['keep_fractions'] == [c1 / 32, math.ceil(0.64 * c1) / c1]
    assert 1.0 < sub['flop_ratio'] < 6 / (2 + 2 * c1 / 32 + 2 * math.ceil(0.64 * c1) / 32) + 0.01

"""
Tests of sample.py on a tiny random-weight model saved as a checkpoint with the keys train.py writes (byte tokens).
Most run sample.py in this process with runpy (torch is already imported: fast); the one-line errors on stderr of
the command line run it as a subprocess.
"""
import os
import random
import re
import runpy
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch

from model import SubLLM, SubLLMConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, 'sample.py')
SEP = '---------------'


def save_checkpoint(out_dir, structure='T(T(T)T)T', prefix=''):
    """out_dir/ckpt.pt of a random tiny model, with the keys (and kinds of values) train.py saves."""
    torch.manual_seed(0)
    config = SubLLMConfig(vocab_size=256, block_size=64, n_embd=32, n_head=4, structure=structure)
    model = SubLLM(config)
    # a fresh AdamW's state_dict, written out: building one imports torch._dynamo (seconds)
    optimizer = {'state': {}, 'param_groups': [{'lr': 1e-3, 'params': list(range(len(list(model.parameters()))))}]}
    np_state = np.random.get_state()
    rng = {'torch': torch.get_rng_state(), 'cuda': None, 'numpy': (np_state[0], np_state[1].tolist(), *np_state[2:]),
           'python': random.getstate(), 'batches': torch.Generator().get_state()}
    os.makedirs(out_dir, exist_ok=True)
    torch.save({'model': {prefix + k: v for k, v in model.state_dict().items()},
                'optimizer': optimizer, 'scaler': torch.amp.GradScaler('cpu', enabled=False).state_dict(),
                'model_args': asdict(config), 'iter_num': 100, 'best_val_loss': 5.5, 'config': {'out_dir': out_dir},
                'meta': {'tokenizer': 'byte', 'vocab_size': 256, 'dtype': 'uint16'}, 'rng': [rng],
                'train_seconds': 1.0}, os.path.join(out_dir, 'ckpt.pt'))
    return '--out_dir=' + out_dir


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(str(tmp_path / 'out'))


def sample(monkeypatch, capsys, *args):
    """Run sample.py in this process; returns its stdout."""
    monkeypatch.setattr(sys, 'argv', ['sample.py', '--device=cpu', *args])
    runpy.run_path(SAMPLE, run_name='__main__')
    return capsys.readouterr().out


def level_percents(out):
    return [float(p) for p in re.findall(r"^level \d+: (\d+\.\d)% of generated tokens entered", out, re.M)]


def test_prints_samples_speed_and_levels(ckpt, tmp_path, monkeypatch, capsys):
    prompt = tmp_path / 'prompt.txt'
    prompt.write_text('def main(')
    out = sample(monkeypatch, capsys, ckpt, f'--start=FILE:{prompt}', '--num_samples=2', '--max_new_tokens=20')
    assert out.count(SEP) == 2
    samples = out.split(SEP)[:2]
    assert all('def main(' in s for s in samples)
    assert re.search(r"^decode: 38 tokens in \d+\.\d+ s, \d+\.\d tokens/s \(with the KV cache", out, re.M)
    percents = level_percents(out)
    assert len(percents) == 2 and percents[1] <= percents[0]  # nested: entering level 2 means entering level 1
    assert re.search(r"^level 2: .* \(\d+\.\d% of those that reached it\)$", out, re.M)


def test_greedy_same_with_and_without_cache(ckpt, monkeypatch, capsys):
    args = [ckpt, '--start=hello', '--top_k=1', '--num_samples=2', '--max_new_tokens=40']
    cached = sample(monkeypatch, capsys, *args, '--use_cache=True')
    full = sample(monkeypatch, capsys, *args, '--use_cache=False')
    assert cached.rsplit(SEP, 1)[0] == full.rsplit(SEP, 1)[0]  # the samples (and the header line)
    assert 'without the KV cache' in full
    # the level lines too: counted on the cached decode path, and in one reference forward without the cache
    assert level_percents(cached) == level_percents(full)
    assert 0 < level_percents(cached)[0] < 100  # both kept and skipped tokens occurred


def test_baseline_and_compiled_prefix(tmp_path, monkeypatch, capsys):
    out = sample(monkeypatch, capsys, save_checkpoint(str(tmp_path / 'b'), structure='TTT', prefix='_orig_mod.'),
                 '--num_samples=1', '--max_new_tokens=3', '--temperature=1')
    assert out.count(SEP) == 1 and 'tokens/s' in out and 'no subsampled levels' in out


@pytest.mark.parametrize('args, words', [
    (['--start='], 'encodes to no tokens'),
    (['--start=FILE:EMPTY'], 'encodes to no tokens'),
    (['--start=FILE:/no/such/prompt.txt'], 'cannot read the prompt file'),
    (['--max_new_tokens=100'], 'block_size=64'),
    (['--max_new_tokens=0'], 'at least 1'),
    (['--temperature=0'], '--temperature must be > 0'),
    (['--num_samples=many'], '--num_samples expects int'),
    (['--use_cache=yes'], '--use_cache expects True or False'),
    (['--topk=5'], "unknown setting 'topk' (from --topk=5); valid keys: out_dir, start, num_samples"),
])
def test_one_line_errors(ckpt, tmp_path, monkeypatch, capsys, args, words):
    empty = tmp_path / 'empty.txt'
    empty.write_text('')
    args = [a.replace('EMPTY', str(empty)) for a in args]
    with pytest.raises(SystemExit) as e:
        sample(monkeypatch, capsys, ckpt, *args)
    message = e.value.code
    assert isinstance(message, str) and '\n' not in message and words in message  # Python prints it, exits 1


@pytest.mark.parametrize('args, words', [([], 'train a model first'), (['--start='], 'encodes to no tokens')])
def test_command_line_errors(ckpt, tmp_path, args, words):
    """As a command: exit status 1, the one-line message on stderr, no traceback."""
    out_dir = ckpt if args else '--out_dir=' + str(tmp_path / 'nothing')
    r = subprocess.run([sys.executable, SAMPLE, out_dir, '--device=cpu', *args], capture_output=True, text=True,
                       cwd=HERE, env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr


def diagnose_setup(tmp_path, **config):
    """A checkpoint whose levels have a running cut, and the dataset of its run (as prepare.py writes it)."""
    out_dir = str(tmp_path / 'out')
    save_checkpoint(out_dir)
    checkpoint = torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=False)
    checkpoint['config'] = {'out_dir': out_dir, 'dataset': 'toy', 'block_size': 48, **config}
    for key in [k for k in checkpoint['model'] if k.endswith('score_offset')]:  # a trained model's running cut
        checkpoint['model'][key] = torch.tensor(0.02)
    torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt'))
    os.makedirs(tmp_path / 'data' / 'toy')
    val = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint16)
    val.tofile(tmp_path / 'data' / 'toy' / 'val.bin')
    val.tofile(tmp_path / 'data' / 'toy' / 'train.bin')
    (tmp_path / 'data' / 'toy' / 'meta.json').write_text('{"tokenizer": "byte", "vocab_size": 256, "dtype": "uint16", '
                                                         '"train_tokens": 5000, "val_tokens": 5000}')
    return out_dir, checkpoint, val


def test_diagnose_reports_what_the_levels_keep(tmp_path, monkeypatch, capsys):
    """diagnose.py on a checkpoint: per level, the kept fraction equals the model's own eval-mode count on the same
    crops fed one at a time, and mean |score| and the soft weights are those of the scores w . x - offset."""
    out_dir, checkpoint, val = diagnose_setup(tmp_path)
    report = tmp_path / 'diag.json'
    monkeypatch.setattr(sys, 'argv', ['diagnose.py', f'--out_dir={out_dir}', f'--data_dir={tmp_path / "data"}',
                                      '--rows=4', f'--json={report}'])
    runpy.run_path(os.path.join(HERE, 'diagnose.py'), run_name='__main__')
    assert re.search(r"^\s+2\s+0\.64\s+0\.\d{3}\s", capsys.readouterr().out, re.M)  # a row per level
    levels = __import__('json').loads(report.read_text())['levels']

    model = SubLLM(SubLLMConfig(**checkpoint['model_args']))
    model.load_state_dict(checkpoint['model'])
    model.eval()
    starts = torch.randint(len(val) - 48, (4,), generator=torch.Generator().manual_seed(1337)).tolist()
    with torch.no_grad():
        for s in starts:
            model(torch.from_numpy(val[s:s + 48].astype(np.int64))[None])
    assert len(levels) == 2
    for row, (depth, offered, kept) in zip(levels, model.level_stats()):
        assert row['depth'] == depth and row['kept'] == pytest.approx(kept / offered)
        assert 1 >= row['kept_at_weight_1'] >= 0 and 0 < row['mean_weight_kept'] <= 1 and row['mean_abs_score'] > 0


@pytest.mark.parametrize("balancer", ["", "spec"])
def test_diagnose_drift_steps_report_the_cut_that_moved_the_running_offset(tmp_path, monkeypatch, capsys, balancer):
    """--drift_steps trains on from the checkpoint's optimizer state: each level's running offset moves by 0.05 of
    the batch cut it saw at every step, so the reported mean cut of the offset scores times 0.05 * steps is how far
    the offset moved; --balancer swaps the Balancer for those steps, and a checkpoint without an optimizer is one
    line."""
    config = dict(batch_size=4, min_lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, max_iters=200)
    out_dir, checkpoint, _ = diagnose_setup(tmp_path, **config)
    model = SubLLM(SubLLMConfig(**checkpoint['model_args']))
    checkpoint['optimizer'] = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu').state_dict()
    torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt'))
    report = tmp_path / 'diag.json'
    argv = ['diagnose.py', f'--out_dir={out_dir}', f'--data_dir={tmp_path / "data"}', '--rows=2', f'--json={report}',
            '--drift_steps=6', f'--balancer={balancer}']
    monkeypatch.setattr(sys, 'argv', argv)
    runpy.run_path(os.path.join(HERE, 'diagnose.py'), run_name='__main__')
    assert re.search(r"^  depth 2: score level [-+]\d\.\d{4} a step", capsys.readouterr().out, re.M)
    levels = __import__('json').loads(report.read_text())['levels']
    for row in levels:
        drift = row['drift']
        assert drift['balancer'] == (balancer or 'centred') and drift['steps'] == 6
        assert drift['offset_moved'] != 0
        assert drift['offset_moved'] == pytest.approx(0.05 * drift['cut_mean'] * 6, rel=1e-4, abs=1e-7)
    monkeypatch.setattr(sys, 'argv', argv[:-1] + ['--balancer=centered'])
    with pytest.raises(SystemExit, match=r"^--balancer must be 'spec', 'centred' or 'strong'"):
        runpy.run_path(os.path.join(HERE, 'diagnose.py'), run_name='__main__')
    monkeypatch.setattr(sys, 'argv', argv[:3] + ['--rows=0'])  # was a traceback (torch.cat of no scores)
    with pytest.raises(SystemExit, match=r"^--rows must be at least 1 \(val crops to score\), got 0$"):
        runpy.run_path(os.path.join(HERE, 'diagnose.py'), run_name='__main__')
    monkeypatch.setattr(sys, 'argv', argv)
    del checkpoint['optimizer']
    torch.save(checkpoint, os.path.join(out_dir, 'ckpt.pt'))
    with pytest.raises(SystemExit, match=r"has no optimizer state: --drift_steps needs a checkpoint of train.py"):
        runpy.run_path(os.path.join(HERE, 'diagnose.py'), run_name='__main__')

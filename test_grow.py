"""
Tests of growing a trained model (grow.grow: Transformer Layer Injection and Depth Up-Scaling) and of
train.py --init_from=grow, on tiny models. train.py and sample.py run in this process with runpy (fast).
"""
import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from generate import generate
from grow import grow
from model import SubLLM, SubLLMConfig

HERE = os.path.dirname(os.path.abspath(__file__))
NESTED = 'TT(TT(TT)TT)TT'


def tiny_model(structure, seed=0):
    """A random tiny model whose levels are not at their initial values (offsets and gates are copied too)."""
    torch.manual_seed(seed)
    model = SubLLM(SubLLMConfig(vocab_size=64, block_size=32, n_embd=32, n_head=4, structure=structure,
                                keep_ratio=(0.6, 0.5)))
    with torch.no_grad():
        for p in model.parameters():  # larger than the init's 0.02: every block and level changes the output a lot
            p.add_(0.1 * torch.randn_like(p))
        for level in model.levels():
            level.score_offset.fill_(0.3 * torch.randn(()).item())
    return model.eval()


def logits_of(model, idx):
    return model(idx, idx)[0]  # with targets: the logits of every position


@pytest.mark.parametrize('structure', ['TTTTTT', NESTED])
def test_tli_copy_zero_computes_the_same_function_and_copy_does_not(structure):
    model = tiny_model(structure)
    idx = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = logits_of(model, idx)
        same = grow(model, 'tli', k=2, init='copy_zero')
        after = logits_of(same, idx)
        changed = logits_of(grow(model, 'tli', k=2, init='copy'), idx)
    assert len(same.blocks()) == len(model.blocks()) * 3 // 2 and not same.training
    assert torch.equal(before, after)  # bit for bit: a zeroed block adds exactly 0 to the residual stream
    assert (changed - before).abs().max() > 0.1  # a plain copy is a different function: the test above is not empty
    assert [(lv.depth, lv.keep_ratio) for lv in same.levels()] == [(lv.depth, lv.keep_ratio) for lv in model.levels()]
    # decoding with the KV caches that setup_cache allocates in every block, injected ones included
    prompt = idx[:1, :8]
    reference = generate(model, prompt, 16, top_k=1)
    assert torch.equal(generate(same, prompt, 16, top_k=1), reference)
    assert torch.equal(generate(same, prompt, 16, top_k=1, use_cache=False), reference)


@pytest.mark.parametrize('structure, k, grown', [
    ('TTTTTTTT', 1, 'T' * 16), ('TTTTTTTT', 2, 'T' * 12), ('TTTTTTTT', 3, 'T' * 10),
    (NESTED, 1, 'TTTT(TTTT(TTTT)TTTT)TTTT'), (NESTED, 2, 'TTT(TTT(TTT)TTT)TTT'), (NESTED, 3, 'TT(TTT(TTT)TT)TTT'),
])
def test_tli_injects_a_copy_after_every_kth_block_in_its_level(structure, k, grown):
    model = tiny_model(structure)
    new = grow(model, 'tli', k=k, init='copy_zero')
    assert new.config.structure == grown and len(new.blocks()) == grown.count('T')
    old_blocks, new_blocks = model.blocks(), iter(new.blocks())
    for i, old in enumerate(old_blocks):  # each old block in order, and after every k-th one its zeroed copy
        assert torch.equal(next(new_blocks).attn.wq.weight, old.attn.wq.weight)
        if (i + 1) % k == 0:
            copy = next(new_blocks)
            assert torch.equal(copy.attn.wq.weight, old.attn.wq.weight) and torch.equal(copy.mlp.up.weight,
                                                                                         old.mlp.up.weight)
            assert not copy.attn.wo.weight.any() and not copy.mlp.down.weight.any()
    for old, lv in zip(model.levels(), new.levels(), strict=True):  # the same levels, in the same order
        assert torch.equal(lv.scorer.weight, old.scorer.weight) and torch.equal(lv.bypass.c, old.bypass.c)
        assert lv.score_offset == old.score_offset


def test_dus_8_blocks_drop_2_gives_a0_to_a5_then_b2_to_b7():
    model = tiny_model('TTTTTTTT')
    new = grow(model, 'dus', m=2)
    assert new.config.structure == 'T' * 12
    sources = [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    for block, i in zip(new.blocks(), sources, strict=True):
        for (name, p), (_, q) in zip(block.named_parameters(), model.blocks()[i].named_parameters()):
            assert torch.equal(p, q), (i, name)
        assert block.attn.wo.weight.any()  # DUS copies blocks as they are, whatever init says
    assert torch.equal(new.lm_head.weight, model.lm_head.weight)


def test_dus_keeps_whole_levels_and_refuses_to_cut_one_in_half():
    model = tiny_model('TT(TT)TT')
    new = grow(model, 'dus', m=2)  # A0 A1 (A2 A3) + (B2 B3) B4 B5: two copies of the one level
    assert new.config.structure == 'TT(TT)(TT)TT'
    for lv in new.levels():
        assert torch.equal(lv.scorer.weight, model.levels()[0].scorer.weight)
    with pytest.raises(ValueError, match=r"DUS with m=3 cuts a level of 'TT\(TT\)TT' in half.*LLaMA baseline"):
        grow(model, 'dus', m=3)  # copy A would end inside the level: 'TT(T' + ...
    with pytest.raises(ValueError, match=r"cuts a level"):
        grow(tiny_model('TTT(TT)TTT'), 'dus', m=4)  # both halves cut the level, yet 'TTT(T' + 'T)TTT' is balanced


@pytest.mark.parametrize('kwargs, message', [
    (dict(method='tli', k=0), r'k=0: .* give 1 <= k <= 6'),
    (dict(method='tli', k=7), r'k=7: .* give 1 <= k <= 6'),
    (dict(method='dus', m=6), r'm=6: .* give 1 <= m < 6'),
    (dict(method='dus', m=0), r'm=0'),
    (dict(method='stack'), r"method must be 'tli' .* or 'dus'"),
    (dict(init='zero'), r"init must be 'copy_zero' or 'copy'"),
])
def test_bad_growth_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grow(tiny_model('TTTTTT'), **kwargs)


def test_a_recurrent_block_cannot_be_grown():
    with pytest.raises(ValueError, match="recurrent block"):
        grow(tiny_model('TRT'))


# -----------------------------------------------------------------------------
# train.py --init_from=grow

TINY = ['--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1',
        '--device=cpu', '--compile=False', '--learning_rate=1e-2', '--warmup_iters=0']


@pytest.fixture
def data(tmp_path):
    """A corpus of one crop of block_size + 1 tokens: every batch is that crop, so the loss can fall fast."""
    d = tmp_path / 'data' / 'tiny'
    d.mkdir(parents=True)
    crop = np.random.default_rng(1).integers(0, 256, 33).astype(np.uint16)
    crop.tofile(d / 'train.bin')
    crop.tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps(dict(tokenizer='byte', vocab_size=256, dtype='uint16')))
    return [f'--data_dir={tmp_path / "data"}', '--dataset=tiny']


def run(monkeypatch, script, *args):
    """Run a script in this process with these command-line arguments; returns its globals."""
    monkeypatch.setattr(sys, 'argv', [script, *args])
    return runpy.run_path(os.path.join(HERE, script), run_name='__main__')


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


@pytest.mark.parametrize('structure, grown', [('TTTT', 'TTTTTT'), ('T(TT)T', 'T(TTT)TT')])
def test_grown_run_starts_at_the_base_loss_trains_resumes_and_samples(monkeypatch, tmp_path, data, structure, grown):
    base, out = str(tmp_path / 'base'), str(tmp_path / 'grown')
    run(monkeypatch, 'train.py', *TINY, *data, f'--structure={structure}', f'--out_dir={base}', '--max_iters=8',
        '--eval_interval=8')
    # the base checkpoint evaluated again: the logged eval, exactly (an eval moves no running offset)
    base_losses = run(monkeypatch, 'train.py', *TINY, *data, f'--out_dir={base}', '--init_from=resume',
                      '--eval_only=True')['losses']
    assert read_log(base)[-1]['val_loss'] == base_losses['val_loss']

    flags = [*TINY, *data, '--init_from=grow', f'--grow_from={base}', f'--out_dir={out}', '--eval_interval=4']
    run(monkeypatch, 'train.py', *flags, '--max_iters=8')
    log = read_log(out)
    assert [r['iter'] for r in log] == [0, 4, 8]
    assert log[0]['val_loss'] == base_losses['val_loss']  # copy_zero: exactly the base model's loss at iter 0
    assert log[0]['train_loss'] == base_losses['train_loss']
    assert log[-1]['train_loss'] < 0.9 * log[0]['train_loss']  # and the grown model trains
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'))
    assert ckpt['model_args']['structure'] == grown and ckpt['iter_num'] == 8

    run(monkeypatch, 'train.py', *flags, '--init_from=resume', '--max_iters=12')  # no grow flag needed to resume
    assert [r['iter'] for r in read_log(out)] == [0, 4, 8, 12]
    assert torch.load(os.path.join(out, 'ckpt.pt'))['iter_num'] == 12
    sampled = run(monkeypatch, 'sample.py', f'--out_dir={out}', '--device=cpu', '--num_samples=1',
                  '--max_new_tokens=8')
    assert sampled['model'].config.structure == grown


def test_grow_errors_in_train_py_are_one_line_messages(monkeypatch, tmp_path, data):
    base = str(tmp_path / 'base')
    flags = [*TINY, *data, '--structure=TT(TT)TT', '--max_iters=1', '--eval_interval=1']
    run(monkeypatch, 'train.py', *flags, f'--out_dir={base}')
    grow_flags = [*flags, '--init_from=grow', f'--out_dir={tmp_path / "grown"}']
    for args, message in [
        ([f'--grow_from={tmp_path / "nowhere"}'], r"init_from=grow needs --grow_from=OUT_DIR .* no checkpoint at"),
        ([], r"init_from=grow needs --grow_from"),
        ([f'--grow_from={base}', f'--out_dir={base}'], r"out_dir and grow_from are both .* its own --out_dir"),
        ([f'--grow_from={base}', '--grow_method=moe'], r"cannot grow .*ckpt.pt: method must be 'tli'"),
        ([f'--grow_from={base}', '--grow_init=random'], r"init must be 'copy_zero' or 'copy'"),
        ([f'--grow_from={base}', '--grow_k=0'], r"k=0: .* give 1 <= k <= 6"),
        ([f'--grow_from={base}', '--grow_method=dus', '--grow_m=3'], r"DUS with m=3 cuts a level"),
    ]:
        with pytest.raises(SystemExit, match=message):
            run(monkeypatch, 'train.py', *grow_flags, *args)

"""
Tests of hf.py against transformers: a tiny random LlamaForCausalLM saved with save_pretrained loads here with the
same logits, to_hf writes what transformers loads, a SUBLLM made from a LLaMA is that LLaMA when its levels keep
everything, train.py --init_from=hf trains it, prepare.py --tokenizer=hf:DIR and sample.py use the model's own
tokenizer. transformers is imported once for the module (CI installs it; skipped without it).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf  # noqa: E402
from generate import generate  # noqa: E402
from hf import from_hf, init_levels, llama_updates, to_hf  # noqa: E402
from test_grow import run  # noqa: E402
from test_train import read_log  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16}  # shorter than the sequences below: the scaling matters


def hf_llama(path, layers=4, kv_heads=4, tie=False, rope_scaling=None, vocab=256, seed=0, shard=None):
    """A random LlamaForCausalLM saved with save_pretrained into path, its weights larger than the init's (every
    block matters), its norms not ones (a norm loaded into the wrong place shows)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         rope_theta=500000.0 if rope_scaling else 10000.0,
                         rope_scaling=rope_scaling and dict(rope_scaling),
                         rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(path, **({'max_shard_size': shard} if shard else {}))
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx, idx)[0]  # with targets: every position


IDX = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('kv_heads, tie, scaling, shard', [(4, False, None, None), (2, True, LLAMA3, '20KB'),
                                                          (1, False, LLAMA3, None)])
def test_transformers_llama_loads_with_equal_logits_and_greedy_generations(tmp_path, kv_heads, tie, scaling, shard):
    theirs = hf_llama(tmp_path, kv_heads=kv_heads, tie=tie, rope_scaling=scaling, shard=shard)
    assert os.path.exists(tmp_path / 'model.safetensors.index.json') == bool(shard)  # sharded: its index is read
    ours = from_hf(str(tmp_path)).eval()
    c = ours.config
    assert (c.n_kv_head, c.tie_embeddings, c.rope_scaling is not None) == (kv_heads, tie, bool(scaling))
    assert c.vocab_size == 256
    with torch.no_grad():
        expected = theirs(IDX).logits
    assert (logits(ours, IDX) - expected).abs().max() < 1e-4  # every position, fp32
    prompt = IDX[:1, :6]
    generated = theirs.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert torch.equal(generate(ours, prompt, 20, top_k=1), generated)


def test_a_model_trained_here_goes_to_transformers_and_back_bit_exact(tmp_path, monkeypatch):
    """to_hf of a trained baseline (GQA, tied, a vocab padded to 64 by train.py: 100 -> 128), through hf.py's
    command line as the user runs it."""
    data = make_data(tmp_path / 'data', vocab=100)
    out = tmp_path / 'out'
    run(monkeypatch, 'train.py', *TINY, *data, '--structure=TTT', '--n_kv_head=1', '--tie_embeddings=True',
        f'--out_dir={out}', '--max_iters=4', '--eval_interval=4')
    run(monkeypatch, 'hf.py', f'--out_dir={out}', f'--export={tmp_path / "export"}')
    trained = torch.load(out / 'ckpt.pt')
    model = SubLLM(SubLLMConfig(**trained['model_args']))
    model.load_state_dict(trained['model'])
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / 'export').eval()
    assert theirs.config.vocab_size == 128 and theirs.config.num_key_value_heads == 1
    idx = IDX[:, :32] % 100
    with torch.no_grad():
        assert (logits(model.eval(), idx) - theirs(idx).logits).abs().max() < 1e-4
    back = from_hf(str(tmp_path / 'export'))
    assert back.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_subllm_made_from_a_llama_is_that_llama_when_its_levels_keep_every_token(tmp_path):
    theirs = hf_llama(tmp_path, layers=6, kv_heads=2)
    llama = from_hf(str(tmp_path)).eval()
    subllm = from_hf(str(tmp_path), 'T(T(TT)T)T', keep_ratio=1.0)
    assert [lv.depth for lv in subllm.levels()] == [1, 2] and subllm.levels()[0].bypass.c[0] == 0.5  # as for training
    with torch.no_grad():
        for level in subllm.levels():  # every score 1: kept, with soft weight 1; c = 1: the level's output in full
            level.scorer.weight.zero_()
            level.score_offset.fill_(-1.0)
            level.bypass.c.fill_(1.0)
        expected = theirs(IDX).logits
    assert (logits(llama, IDX) - expected).abs().max() < 1e-4
    assert (logits(subllm.eval(), IDX) - expected).abs().max() < 1e-4  # eval: score > 0
    assert (logits(subllm.train(), IDX) - expected).abs().max() < 1e-4  # training: top-k of all, soft weights
    with torch.no_grad():  # the check has teeth: a level at c 0.5 is another function
        subllm.levels()[1].bypass.c.fill_(0.5)
    assert (logits(subllm.eval(), IDX) - expected).abs().max() > 1e-2


def test_fitted_scorers_rank_tokens_by_how_much_the_level_changes_them(tmp_path):
    hf_llama(tmp_path, layers=6)
    model = from_hf(str(tmp_path), 'T(T(TT)T)T', keep_ratio=0.25)  # far from the half that uncalibrated cuts keep
    batches = [IDX[i:i + 1] for i in range(2)]
    targets = llama_updates(model, batches)
    for how in ('c1', 'fitted'):
        init_levels(model, how, batches)
        for level, (x, change) in targets.items():
            with torch.no_grad():
                scores = level.score(x[None])[0]
            correlation = torch.corrcoef(torch.stack([scores, change]))[0, 1]
            assert level.bypass.c[0] == 1.0
            if how == 'fitted':
                assert correlation > 0.5 and abs(scores.std() - 1) < 0.05  # the fit, at the random init's scale
            if level.depth == 1:  # the cut calibrated: eval keeps keep_ratio of the tokens (level 2 sees others)
                assert abs((scores > 0).float().mean() - 0.25) < 0.05
        with torch.no_grad():
            model.eval()(torch.cat(batches))  # and a forward in eval mode runs with them


def test_bad_directories_and_settings_are_one_line_errors(tmp_path, monkeypatch):
    good = tmp_path / 'good'
    hf_llama(good, layers=2)
    config = json.loads((good / 'config.json').read_text())

    def variant(name, change=None, drop=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if change:
            (d / 'config.json').write_text(json.dumps({**config, **change}))
        if drop:
            (d / drop).unlink()
        return str(d)
    monkeypatch.setattr('huggingface_hub.constants.HF_HUB_OFFLINE', True)
    cases = [
        (lambda: from_hf(str(tmp_path / 'nowhere')), r"no directory .*nowhere: give a Hugging Face model directory"),
        (lambda: from_hf('no-such-org/no-such-model'), r"cannot download no-such-org/no-such-model .*offline"),
        (lambda: from_hf(variant('noconfig', drop='config.json')), r"no config.json in .*noconfig"),
        (lambda: from_hf(variant('mistral', {'model_type': 'mistral'})), r"is a mistral model .* only the LLaMA"),
        (lambda: from_hf(variant('bias', {'attention_bias': True})), r"biases in attention or MLP .* not supported"),
        (lambda: from_hf(variant('window', {'sliding_window': 64})), r"sliding-window attention is not supported"),
        (lambda: from_hf(variant('yarn', {'rope_parameters': {'rope_type': 'yarn', 'factor': 2.0}})),
         r"rope_type 'yarn' \(only plain RoPE and 'llama3'\)"),
        (lambda: from_hf(variant('noweights', drop='model.safetensors')), r"no model.safetensors .* in .*noweights"),
        (lambda: from_hf(variant('shape', {'intermediate_size': 64})),
         r"layers.0.mlp.gate_proj.weight has shape \(48, 32\), config.json makes it \(64, 32\)"),
        (lambda: from_hf(variant('layers', {'num_hidden_layers': 3})), r"has no model.layers.2.*do not match config"),
        (lambda: from_hf(str(good), 'T(TT)'), r"structure 'T\(TT\)' must place the model's 2 blocks"),
        (lambda: from_hf(str(good), n_embd=64), r"n_embd come\(s\) from .*config.json"),
        (lambda: to_hf(from_hf(str(good), '(TT)'), str(tmp_path / 'x')), r"to_hf writes a LLaMA, and structure"),
    ]
    pickled = variant('pickle', drop='model.safetensors')
    torch.save({}, os.path.join(pickled, 'pytorch_model.bin'))
    cases.append((lambda: from_hf(pickled), r"pytorch_model.bin, a pickle, .* safetensors only"))
    damaged = variant('damaged')
    with open(os.path.join(damaged, 'model.safetensors'), 'r+b') as f:
        f.write(b'\xff' * 16)  # the header's length and start
    cases.append((lambda: from_hf(damaged), r"cannot read .*damaged/model.safetensors \("))
    (tmp_path / 'a_file').write_text('x')
    cases.append((lambda: from_hf(str(tmp_path / 'a_file')), r"a_file is a file: give the model's directory"))
    for make, message in cases:
        with pytest.raises(SystemExit, match=message) as e:
            make()
        assert '\n' not in str(e.value), str(e.value)

# -----------------------------------------------------------------------------
# train.py --init_from=hf, prepare.py --tokenizer=hf:DIR, sample.py, hf.py's command line


from model import SubLLM, SubLLMConfig  # noqa: E402

TINY = ['--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1',
        '--device=cpu', '--compile=False', '--learning_rate=1e-2', '--warmup_iters=0']


def make_data(root, vocab=256, tokens=33):
    """A corpus of one crop (block_size + 1 tokens: every batch is that crop, so the loss can fall fast)."""
    d = root / 'tiny'
    d.mkdir(parents=True)
    ids = np.random.default_rng(0).integers(0, vocab, tokens).astype(np.uint16)
    ids.tofile(d / 'train.bin')
    ids.tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps(dict(tokenizer='byte', vocab_size=vocab, dtype='uint16')))
    return [f'--data_dir={root}', '--dataset=tiny']


def test_train_py_init_from_hf_trains_a_subllm_made_from_a_llama_resumes_and_samples(tmp_path, monkeypatch):
    hf_llama(tmp_path / 'llama', layers=4, kv_heads=2, tie=True, rope_scaling=LLAMA3)
    data, out = make_data(tmp_path / 'data'), str(tmp_path / 'out')
    flags = [*TINY, *data, '--init_from=hf', f'--hf_model={tmp_path / "llama"}', '--structure=T(TT)T',
             '--hf_init=fitted', '--keep_ratio=0.25', '--n_embd=64', f'--out_dir={out}', '--eval_interval=6']
    run(monkeypatch, 'train.py', *flags, '--max_iters=12')
    log = read_log(out)
    assert [r['iter'] for r in log] == [0, 6, 12]
    assert abs(log[0]['kept'][0] - 0.25) < 0.1  # the cut set at conversion: eval keeps keep_ratio from the start
    assert log[-1]['train_loss'] < log[0]['train_loss'] - 0.5  # it trains
    args = torch.load(os.path.join(out, 'ckpt.pt'))['model_args']
    assert (args['n_embd'], args['n_kv_head'], args['rope_scaling'], args['structure']) == (32, 2, {
        k: v for k, v in LLAMA3.items() if k != 'rope_type'}, 'T(TT)T')  # config.json's dims, not --n_embd=64
    run(monkeypatch, 'train.py', *flags, '--init_from=resume', '--max_iters=14', '--eval_interval=7')
    assert read_log(out)[-1]['iter'] == 14
    sampled = run(monkeypatch, 'sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=4')
    assert sampled['model'].config.rope_scaling is not None
    for args, message in [(['--hf_model='], r"--init_from=hf needs --hf_model=DIR"),
                          (['--hf_init=zeros'], r"--hf_init must be one of scratch, c1, fitted"),
                          (['--structure=T(TT)TT'], r"must place the model's 4 blocks"),
                          (make_data(tmp_path / 'wide', vocab=300), r"the data's vocab \(300, byte\) is larger than "
                           r"the model's \(256\): prepare the data with the tokenizer the model was trained on")]:
        with pytest.raises(SystemExit, match=message):
            run(monkeypatch, 'train.py', *flags, f'--out_dir={tmp_path / "other"}', *args)


def test_train_py_tiny_cpu_config_init_from_hf_as_typed(tmp_path):
    """The README's command on a save_pretrained directory of the config's 10 blocks, as a user runs it (a process;
    settings that make it short, and the data of this test)."""
    hf_llama(tmp_path / 'llama', layers=10)
    data = make_data(tmp_path / 'data', tokens=200)
    r = subprocess.run([sys.executable, 'train.py', 'config/tiny_cpu.py', '--init_from=hf',
                        f'--hf_model={tmp_path / "llama"}', *data, '--max_iters=2', '--eval_iters=1',
                        '--eval_interval=2', f'--out_dir={tmp_path / "out"}'], cwd=HERE, capture_output=True,
                       text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr
    assert 'from ' in r.stdout and '10 blocks, n_embd 32' in r.stdout and 'SUBLLM, structure TT(TT(TT)TT)TT' in r.stdout


def write_tokenizer(directory, text, vocab=300):
    """A small BPE tokenizer.json trained on text, its eos token '<eos>' named in tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=['<eos>'],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<eos>'}))
    return tok


def test_the_models_own_tokenizer_prepares_the_data_trains_and_samples(tmp_path, monkeypatch):
    text = ''.join(f"def f{i}(x):\n    return x * {i} + '<eos>'\n\n" for i in range(400))
    model_dir = tmp_path / 'llama'
    tok = write_tokenizer(model_dir, text)
    hf_llama(model_dir, layers=4, vocab=320)  # the tokenizer's 300 tokens, padded
    (tmp_path / 'corpus.txt').write_text(text)
    import prepare
    meta = prepare.prepare(input=str(tmp_path / 'corpus.txt'), tokenizer=f'hf:{model_dir}',
                           out_root=str(tmp_path / 'data'), name='tiny')
    assert meta['tokenizer'] == f'hf:{model_dir.resolve()}' and meta['vocab_size'] == 300
    assert meta['eot_token'] == tok.token_to_id('<eos>') and len(meta['tokenizer_sha256']) == 64
    ids = np.fromfile(tmp_path / 'data' / 'tiny' / 'train.bin', dtype=np.uint16).tolist()
    decoded = prepare.get_tokenizer(meta['tokenizer']).decode(ids[:40])
    assert text.startswith(decoded)  # "'<eos>'" in the text is text: no eos token inside a document
    assert meta['eot_token'] not in ids[:len(ids) - 1]

    data = [f'--data_dir={tmp_path / "data"}', '--dataset=tiny']
    out = str(tmp_path / 'out')
    run(monkeypatch, 'train.py', *TINY, *data, '--init_from=hf', f'--hf_model={model_dir}', '--structure=T(TT)T',
        f'--out_dir={out}', '--max_iters=2', '--eval_interval=2')
    sampled = run(monkeypatch, 'sample.py', f'--out_dir={out}', '--num_samples=1', '--max_new_tokens=8',
                  '--start=def f1(')
    assert sampled['tok'].name == meta['tokenizer']

    # the model's own tokenizer, with data of another: one line
    byte_data = make_data(tmp_path / 'bytes')
    with pytest.raises(SystemExit, match=r"was tokenized with byte, not with .*own tokenizer: python prepare.py "
                                         r"--tokenizer=hf:"):
        run(monkeypatch, 'train.py', *TINY, *byte_data, '--init_from=hf', f'--hf_model={model_dir}',
            f'--out_dir={tmp_path / "out2"}')
    # hf.py: the directory as a checkpoint that sample.py reads with its tokenizer; then a changed tokenizer.json
    run(monkeypatch, 'hf.py', f'--hf_model={model_dir}', f'--out_dir={tmp_path / "converted"}')
    sampled = run(monkeypatch, 'sample.py', f'--out_dir={tmp_path / "converted"}', '--num_samples=1',
                  '--max_new_tokens=4', '--start=def')
    assert sampled['tok'].name == meta['tokenizer'] and sampled['model'].config.vocab_size == 320
    write_tokenizer(model_dir, text, vocab=280)  # another tokenizer.json in its place
    with pytest.raises(SystemExit, match=r"tokenizer.json is not the tokenizer this model's data was prepared with"):
        run(monkeypatch, 'sample.py', f'--out_dir={out}')

"""
Tests of train.py on tiny models and tiny token files made here (prepare.py is not needed).
Most run train.py in this process with runpy (torch is already imported: fast); the command-line paths (a one-line
error on stderr, torchrun with 2 processes) run it as a subprocess.
"""
import functools
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

from model import SubLLM, SubLLMConfig

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, 'train.py')
TINY = ['--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=4', '--gradient_accumulation_steps=1', '--eval_iters=2', '--log_interval=1',
        '--warmup_iters=0', '--device=cpu', '--compile=False', '--structure=TT(T(T)T)T']
CKPT_KEYS = {'model', 'optimizer', 'scaler', 'model_args', 'iter_num', 'best_val_loss', 'flops', 'config', 'meta',
             'rng', 'train_seconds'}


def make_data(root, train, val, vocab_size=64):
    """root/tiny/{train,val}.bin and meta.json, as prepare.py writes them."""
    d = root / 'tiny'
    d.mkdir(parents=True)
    np.asarray(train, dtype=np.uint16).tofile(d / 'train.bin')
    np.asarray(val, dtype=np.uint16).tofile(d / 'val.bin')
    meta = dict(tokenizer='byte', vocab_size=vocab_size, dtype='uint16', train_tokens=len(train),
                val_tokens=len(val), source='test_train.py')
    (d / 'meta.json').write_text(json.dumps(meta))
    return ['--data_dir=' + str(root), '--dataset=tiny']


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    return make_data(tmp_path / 'data', rng.integers(0, 64, 4000), rng.integers(0, 64, 600))


def train(monkeypatch, *args):
    """Run train.py in this process with these command-line arguments."""
    monkeypatch.setattr(sys, 'argv', ['train.py', *args])
    runpy.run_path(TRAIN, run_name='__main__')


def interrupt_and_resume(monkeypatch, flags, out_dir, at_iter, checkpoint_iter):
    """Run train.py with these flags into out_dir, stop it with Ctrl-C at the start of iter at_iter (after the
    checkpoint of checkpoint_iter), then resume it to the end."""
    original = SubLLM.set_step

    def interrupted_set_step(self, step, max_steps=None):
        if step == at_iter:
            raise KeyboardInterrupt
        original(self, step, max_steps)
    monkeypatch.setattr(SubLLM, 'set_step', interrupted_set_step)
    with pytest.raises(KeyboardInterrupt):
        train(monkeypatch, *flags, f'--out_dir={out_dir}')
    assert torch.load(out_dir / 'ckpt.pt')['iter_num'] == checkpoint_iter
    steps = []  # the iterations that the resumed run trains

    def recorded_set_step(self, step, max_steps=None):
        steps.append(step)
        original(self, step, max_steps)
    monkeypatch.setattr(SubLLM, 'set_step', recorded_set_step)
    train(monkeypatch, *flags, f'--out_dir={out_dir}', '--init_from=resume')
    monkeypatch.setattr(SubLLM, 'set_step', original)
    assert steps[0] == checkpoint_iter  # it goes on from its checkpoint: a restart from iter 0 would match a fresh run


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]


def env1():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE)


@pytest.mark.parametrize('structure', ['TT(T(T)T)T', 'TTTTTT'])
def test_loss_falls_on_a_repeated_batch_and_checkpoint_has_what_sample_needs(monkeypatch, tmp_path, structure):
    rng = np.random.default_rng(1)
    crop, val_crop = rng.integers(0, 64, (2, 33))  # exactly block_size + 1 tokens: every batch of a split is its crop
    out = str(tmp_path / 'out')
    train(monkeypatch, *TINY, *make_data(tmp_path / 'data', crop, val_crop), f'--out_dir={out}',
          f'--structure={structure}', '--max_iters=30', '--eval_interval=10', '--learning_rate=1e-2',
          '--eval_iters=20')  # 20 val batches: a running cut moved by each would be 64% of the way to val's

    log = read_log(out)
    assert [r['iter'] for r in log] == [0, 10, 20, 30]
    assert log[-1]['train_loss'] < 0.5 * log[0]['train_loss']  # it memorises the batch
    assert log[-1]['tokens'] == 30 * 4 * 32
    fields = {'iter', 'tokens', 'time_s', 'flops', 'lr', 'train_loss', 'val_loss'}
    if structure == 'TTTTTT':  # the LLaMA baseline: same script, no levels
        assert set(log[-1]) == fields
    else:
        assert set(log[-1]) == fields | {'val_loss_train_selection', 'kept', 'kept_train', 'agree', 'dropped'}
        for key in ('kept', 'kept_train'):
            assert len(log[-1][key]) == 2 and all(0 <= k <= 1 for k in log[-1][key])

    # the checkpoint and the one before it (saved at iters 20 and 30); no ckpt.pt.tmp, no train.lock left behind
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'ckpt_prev.pt', 'log.jsonl']
    ckpt = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=True)  # plain types only: safe to load
    assert set(ckpt) == CKPT_KEYS
    assert ckpt['iter_num'] == 30 and ckpt['meta']['vocab_size'] == 64 and ckpt['config']['max_iters'] == 30
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    model = SubLLM(SubLLMConfig(**ckpt['model_args']))
    model.load_state_dict(ckpt['model'])  # strict: everything sample.py needs, without the data dir
    assert model.config.structure == structure
    if structure != 'TTTTTT':  # the last eval's kept fractions: the final weights and running cut, in eval mode, on
        kept = {}              # each split's crop; the val pass's train-mode forwards must not move the cut it reads
        for key, tokens in (('kept_train', crop), ('kept', val_crop)):
            model.eval().reset_level_stats()
            with torch.no_grad():
                model(torch.from_numpy(np.tile(tokens[:-1], (4, 1))).long())
            kept[key] = [k / n for _, n, k in model.level_stats()]
            assert log[-1][key] == pytest.approx(kept[key])
        assert kept['kept'] != kept['kept_train']  # two samples: a mix-up of the splits fails the line above
        # train.py calibrated the running cuts in eval mode at the end, on train batches (all this crop): again
        # on the same batches moves nothing, where the running cut of training is another value
        saved_cuts = [level.score_offset.item() for level in model.levels()]
        model.calibrate_cuts([torch.from_numpy(np.tile(crop[:-1], (4, 1))).long()] * 20)
        assert [level.score_offset.item() for level in model.levels()] == pytest.approx(saved_cuts, abs=1e-6)


def test_resume_after_interruption_reproduces_the_uninterrupted_run(monkeypatch, tmp_path, data):
    flags = [*TINY, *data, '--max_iters=12', '--eval_interval=4', '--learning_rate=3e-3', '--warmup_iters=3']
    train(monkeypatch, *flags, f'--out_dir={tmp_path / "a"}')
    interrupt_and_resume(monkeypatch, flags, tmp_path / 'b', at_iter=6, checkpoint_iter=4)

    log_a, log_b = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    for r in log_a + log_b:
        r.pop('time_s')
    assert [r['iter'] for r in log_b] == [0, 4, 8, 12]  # appended after the checkpoint's eval, no duplicates
    assert log_a == log_b  # the same losses, exactly
    model_a, model_b = (torch.load(tmp_path / d / 'ckpt.pt')['model'] for d in 'ab')
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)


def test_a_resumed_process_runs_only_the_iterations_after_its_checkpoint_and_restores_the_random_state(tmp_path,
                                                                                                      data):
    """As a user runs it (processes): a run stopped at iter 6 resumes from its checkpoint of iter 4 and trains only
    iterations 4 to 11. It restores the weights, the optimizer and every random state from the checkpoint, so that
    resumed with another --seed it still ends exactly as the uninterrupted run: a restart from iter 0 cannot, and
    neither can a resume that draws its batches or dropout from the new seed."""
    wrapper = tmp_path / 'train_and_record_steps.py'  # train.py, writing each iteration it trains to STEPS_FILE
    wrapper.write_text("import os, runpy, model\n"
                       "original = model.SubLLM.set_step\n"
                       "def set_step(self, step, max_steps=None):\n"
                       "    if step == int(os.environ.get('STOP_AT', -1)):\n"
                       "        raise KeyboardInterrupt  # Ctrl-C at the start of that iteration\n"
                       "    with open(os.environ['STEPS_FILE'], 'a') as f:\n"
                       "        f.write(f'{step}\\n')\n"
                       "    original(self, step, max_steps)\n"
                       "model.SubLLM.set_step = set_step\n"
                       f"runpy.run_path({TRAIN!r}, run_name='__main__')\n")
    flags = [*TINY, *data, '--max_iters=12', '--eval_interval=4', '--learning_rate=3e-3', '--dropout=0.1']

    def run(out, name, *extra, stop_at=-1):
        env = dict(env1(), STEPS_FILE=str(tmp_path / name), STOP_AT=str(stop_at))
        p = subprocess.run([sys.executable, str(wrapper), *flags, f'--out_dir={tmp_path / out}', *extra],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)
        return p, [int(line) for line in (tmp_path / name).read_text().split()]
    p, steps_a = run('a', 'a.steps')
    assert p.returncode == 0, p.stderr[-3000:]
    p, steps_b = run('b', 'b.steps', stop_at=6)
    assert p.returncode != 0 and steps_b == [0, 1, 2, 3, 4, 5]
    assert torch.load(tmp_path / 'b' / 'ckpt.pt')['iter_num'] == 4
    p, steps_resumed = run('b', 'resumed.steps', '--init_from=resume', '--seed=7')
    assert p.returncode == 0, p.stderr[-3000:]
    assert "seed=7 (was 1337)" in p.stdout  # said, not refused: the states come from the checkpoint
    assert steps_a == list(range(12)) and steps_resumed == list(range(4, 12))
    log_a, log_b = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    for r in log_a + log_b:
        r.pop('time_s')
    assert [r['iter'] for r in log_b] == [0, 4, 8, 12] and log_a == log_b
    ckpt_a, ckpt_b = (torch.load(tmp_path / d / 'ckpt.pt') for d in 'ab')
    assert all(torch.equal(ckpt_a['model'][k], ckpt_b['model'][k]) for k in ckpt_a['model'])
    for state_a, state_b in zip(ckpt_a['optimizer']['state'].values(), ckpt_b['optimizer']['state'].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)  # Adam's moments too


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_eval_of_a_checkpoint_repeats_the_logged_eval(monkeypatch, tmp_path, data, capsys, selection):
    """The eval's training-selection pass must not move the running score offsets (they decide eval-time
    selection): evaluating the saved checkpoint again gives the logged losses and kept fractions exactly."""
    out = str(tmp_path / 'out')
    train(monkeypatch, *TINY, *data, f'--out_dir={out}', '--max_iters=6', '--eval_interval=3',
          f'--selection={selection}')
    last = read_log(out)[-1]
    capsys.readouterr()
    train(monkeypatch, *TINY, *data, f'--out_dir={out}', '--init_from=resume', '--eval_only=True')
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"step 6: train loss {last['train_loss']:.4f}, val loss {last['val_loss']:.4f}, "
                           f"val loss with {selection} selection {last['val_loss_train_selection']:.4f}, "
                           f"kept d1 {last['kept'][0]:.3f} d2 {last['kept'][1]:.3f}, "
                           f"agree d1 {last['agree'][0]:.3f} d2 {last['agree'][1]:.3f}"), line
    assert all(0.5 < a <= 1 for a in last['agree'])


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, data):
    original = SubLLM.forward

    def forward(self, idx, targets=None):  # the training loss turns NaN at iter 3 (its 4th training forward)
        logits, loss = original(self, idx, targets)
        if self.training and torch.is_grad_enabled():
            forward.calls += 1
            if forward.calls > 3:
                loss = loss * float('nan')
        return logits, loss
    forward.calls = 0
    monkeypatch.setattr(SubLLM, 'forward', forward)
    out = tmp_path / 'out'
    with pytest.raises(SystemExit, match=r'loss is nan at iter \d.*last good checkpoint'):
        train(monkeypatch, *TINY, *data, f'--out_dir={out}', '--max_iters=10', '--eval_interval=2')
    assert torch.load(out / 'ckpt.pt')['iter_num'] == 2
    assert [r['iter'] for r in read_log(out)] == [0, 2]


def test_ddp_two_processes_gloo_completes_and_writes_one_checkpoint(tmp_path, data):
    # (a race at teardown once failed 1 run in 6: the 2-process runs of test_distributed.py, test_preemption.py,
    # test_reliability.py and the bare torchrun test below tear groups down too, in every CI run)
    # each rank runs train.py, then saves the weights it ends with: gradient sync must have kept them equal
    wrapper = tmp_path / 'train_and_dump.py'
    wrapper.write_text(f"import os, runpy, torch\n"
                       f"g = runpy.run_path({TRAIN!r}, run_name='__main__')\n"
                       f"path = os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt')\n"
                       f"torch.save(g['raw_model'].state_dict(), path)\n")
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(wrapper), *TINY,
           *data, f'--out_dir={out}', '--max_iters=4', '--eval_interval=4', '--gradient_accumulation_steps=4',
           '--always_save_checkpoint=False']
    p = subprocess.run(cmd, capture_output=True, text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('iter 3: loss') == 1  # only rank 0 logs
    assert '2 process(es)' in p.stdout and 'x 2 accumulation' in p.stdout
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']  # only rank 0 saves
    assert [r['iter'] for r in read_log(out)] == [0, 4]
    assert read_log(out)[-1]['tokens'] == 4 * (4 * 4 * 32)  # iters x (accumulation x batch x block, all ranks)
    ckpt = torch.load(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 4 and len(ckpt['rng']) == 2  # every rank's random state, for an exact resume
    assert not torch.equal(ckpt['rng'][0]['batches'], ckpt['rng'][1]['batches'])  # ranks read different crops
    rank0, rank1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    for k in ckpt['model']:  # 4 steps on different crops per rank, yet the same weights: the gradients were synced
        if k.endswith('score_offset'):  # a running statistic (like BatchNorm's): DDP broadcasts rank 0's at every
            continue                    # forward, and each rank's last update stays local
        assert torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], ckpt['model'][k]), k


def test_a_bad_flag_is_one_line_on_stderr(tmp_path):
    p = subprocess.run([sys.executable, TRAIN, '--batch_sise=8'], capture_output=True, text=True, env=env1(),
                       cwd=tmp_path, timeout=60)
    assert p.returncode == 1 and p.stdout == ''
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr  # no traceback
    assert "unknown setting 'batch_sise'" in p.stderr and 'batch_size' in p.stderr and 'keep_ratio' in p.stderr


@pytest.mark.parametrize('args, message', [
    (['--batch_sise=8'], r"unknown setting 'batch_sise' \(from --batch_sise=8\); valid keys: .*batch_size"),
    (['--batch_size=big'], r"batch_size expects int, got 'big'"),
    (['--compile=yes'], r"compile expects True or False"),
    (['--keep_ratio=0.5,x'], r"keep_ratio expects float"),
    (['batchsize=8'], r"config file 'batchsize=8' not found"),
    (['--data_dir=nowhere'], r"no train.bin, val.bin, meta.json in nowhere/tiny/: run `python prepare.py` first"),
    (['--block_size=1000'], r"block_size=1000 is larger than the val split \(600 tokens"),
    (['--n_head=3'], r"bad model settings: n_embd=32 must be divisible by n_head=3"),
    (['--structure=TT(T'], r"bad model settings: structure 'TT\(T': 1 '\(' never closed"),
    (['--init_from=resume'], r"no checkpoint at"),
])
def test_user_errors_are_one_line_messages(monkeypatch, tmp_path, data, args, message):
    with pytest.raises(SystemExit, match=message):
        train(monkeypatch, *TINY, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=1', *args)


def test_token_ids_beyond_the_vocab_are_an_error(monkeypatch, tmp_path):
    data = make_data(tmp_path / 'data', np.full(100, 70), np.full(100, 3))  # meta says vocab 64
    with pytest.raises(SystemExit, match=r"train.bin holds token id 70, but the model's vocab_size is 64"):
        train(monkeypatch, *TINY, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=1', '--eval_interval=5')


def test_compile_failure_says_compile_false(monkeypatch, tmp_path, data):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no working C++ compiler")
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend=broken_backend))
    try:
        with pytest.raises(SystemExit, match=r"torch.compile failed \(.*no working C\+\+ compiler.*--compile=False"):
            train(monkeypatch, *TINY, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=1', '--compile=True')
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize('name', ['tiny_cpu', 'gpu_subllm_250m', 'gpu_llama_250m'])
def test_configs_are_valid_and_the_gpu_ones_are_the_paper_size(monkeypatch, tmp_path, name):
    path = os.path.join(HERE, 'config', f'{name}.py')
    # train.py accepts every setting of the config (the run then stops at the missing data)
    with pytest.raises(SystemExit, match='run `python prepare.py`'):
        train(monkeypatch, path, f'--data_dir={tmp_path}')
    settings = {'__file__': path}
    exec(open(path).read(), settings)
    if name == 'tiny_cpu':
        return
    fields = ('block_size', 'n_embd', 'n_head', 'structure', 'keep_ratio', 'tie_embeddings')
    with torch.device('meta'):
        model = SubLLM(SubLLMConfig(vocab_size=50304, **{k: settings[k] for k in fields}))
    assert 0.24e9 < model.get_num_params() < 0.26e9 and len(model.blocks()) == 24
    assert [lv.depth for lv in model.levels()] == ([] if 'llama' in name else [1, 2])


def test_tiny_cpu_config_runs(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    data = make_data(tmp_path / 'data', rng.integers(0, 256, 2000), rng.integers(0, 256, 400), vocab_size=256)
    out = tmp_path / 'out'
    train(monkeypatch, os.path.join(HERE, 'config', 'tiny_cpu.py'), *data, f'--out_dir={out}', '--max_iters=2',
          '--eval_iters=1')
    assert [r['iter'] for r in read_log(out)] == [0, 2]


def test_ddp_a_nan_loss_on_one_rank_stops_every_rank_with_one_line(tmp_path, data):
    # rank 1's training loss turns NaN at iter 3: the ranks agree at the log step, leave together, exit 1 at once
    # (no rank waits for a timeout), and rank 0 prints the reason once; the checkpoint of iter 2 stays
    wrapper = tmp_path / 'train_nan_on_rank1.py'
    wrapper.write_text(f"import os, runpy, torch\n"
                       f"import model\n"
                       f"original, calls = model.SubLLM.forward, [0]\n"
                       f"def forward(self, idx, targets=None):\n"
                       f"    logits, loss = original(self, idx, targets)\n"
                       f"    if self.training and torch.is_grad_enabled() and os.environ['RANK'] == '1':\n"
                       f"        calls[0] += 1\n"
                       f"        if calls[0] > 3:\n"
                       f"            loss = loss * float('nan')\n"
                       f"    return logits, loss\n"
                       f"model.SubLLM.forward = forward\n"
                       f"runpy.run_path({TRAIN!r}, run_name='__main__')\n")
    out = tmp_path / 'out'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(wrapper), *TINY,
           *data, f'--out_dir={out}', '--max_iters=10', '--eval_interval=2', '--gradient_accumulation_steps=2']
    p = subprocess.run(cmd, capture_output=True, text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode != 0
    assert p.stderr.count('loss is nan at iter 3: stopping; the last good checkpoint') == 1, p.stderr[-3000:]
    assert 'Traceback' not in p.stderr.split('torch/distributed/elastic')[0]  # the ranks' own output: no traceback
    assert 'terminate called' not in p.stderr
    assert torch.load(out / 'ckpt.pt')['iter_num'] == 2
    assert [r['iter'] for r in read_log(out)] == [0, 2]


def make_shards(root, train, val, vocab_size=64, complete=True):
    """root/shards/: train_000000.bin, ... and val_000000.bin, listed in meta.json, as prepare.py writes a shard set."""
    d = root / 'shards'
    d.mkdir(parents=True)
    meta = dict(tokenizer='byte', vocab_size=vocab_size, dtype='uint16', complete=complete, source='test_train.py')
    for split, arrays in (('train', train), ('val', val)):
        meta[f'{split}_shards'] = [dict(file=f'{split}_{k:06d}.bin', tokens=len(a)) for k, a in enumerate(arrays)]
        for k, a in enumerate(arrays):
            np.asarray(a, dtype=np.uint16).tofile(d / f'{split}_{k:06d}.bin')
    (d / 'meta.json').write_text(json.dumps(meta))
    return ['--data_dir=' + str(root), '--dataset=shards']


def test_shards_train_with_crops_in_proportion_to_their_size_and_resume_exactly(monkeypatch, tmp_path):
    rng = np.random.default_rng(2)
    # token ranges tell the shards apart: [0, 20) in shard 0, [20, 40) in shard 1 (too short for one crop of 33
    # tokens: it never appears), [40, 60) in shard 2
    train_shards = [rng.integers(0, 20, 3000), rng.integers(20, 40, 20), rng.integers(40, 60, 1000)]
    data = make_shards(tmp_path / 'data', train_shards, [rng.integers(0, 64, 300), rng.integers(0, 64, 300)])
    flags = [*TINY, *data, '--max_iters=8', '--eval_interval=4', '--learning_rate=3e-3']
    train(monkeypatch, *flags, f'--out_dir={tmp_path / "a"}')
    interrupt_and_resume(monkeypatch, flags, tmp_path / 'b', at_iter=6, checkpoint_iter=4)
    log_a, log_b = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    for r in log_a + log_b:
        r.pop('time_s')
    assert [r['iter'] for r in log_a] == [0, 4, 8] and log_a == log_b  # the same crops after the resume

    monkeypatch.setattr(sys, 'argv', ['train.py', *flags, f'--out_dir={tmp_path / "c"}', '--max_iters=0'])
    get_batch = runpy.run_path(TRAIN, run_name='__main__')['get_batch']
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([get_batch('train', generator)[0] for _ in range(200)])  # (800, 32)
    shard = x // 20
    assert (shard == shard[:, :1]).all()  # a crop never spans two shards
    counts = torch.bincount(shard[:, 0], minlength=3).tolist()
    assert counts[1] == 0 and abs(counts[0] / 800 - (3000 - 32) / (3000 - 32 + 1000 - 32)) < 0.05


def test_one_shard_trains_exactly_as_the_single_file_layout(monkeypatch, tmp_path):
    rng = np.random.default_rng(3)
    tokens, val = rng.integers(0, 64, 3000), rng.integers(0, 64, 500)
    for layout, data in (('file', make_data(tmp_path / 'd1', tokens, val)),
                         ('shards', make_shards(tmp_path / 'd2', [tokens], [val]))):
        train(monkeypatch, *TINY, *data, f'--out_dir={tmp_path / layout}', '--max_iters=4', '--eval_interval=2')
    log_file, log_shards = read_log(tmp_path / 'file'), read_log(tmp_path / 'shards')
    assert [{k: v for k, v in r.items() if k != 'time_s'} for r in log_file] == \
        [{k: v for k, v in r.items() if k != 'time_s'} for r in log_shards]


def test_an_unfinished_shard_set_is_refused(monkeypatch, tmp_path):
    data = make_shards(tmp_path / 'data', [np.zeros(500)], [np.zeros(500)], complete=False)
    with pytest.raises(SystemExit, match=r"not complete \(prepare.py was interrupted.*run the same prepare.py command"):
        train(monkeypatch, *TINY, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=1')


def test_bare_torchrun_runs_the_defaults_on_2_processes_and_refuses_3(tmp_path):
    # the user's first command, in a fresh directory after `python prepare.py`: no config file, only flags that make
    # it short (size, iterations, eval). The default accumulation (8) divides 1, 2, 4 and 8 processes; 3 is refused
    p = subprocess.run([sys.executable, os.path.join(HERE, 'prepare.py'), '--tokenizer=byte'], capture_output=True,
                       text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    short = ['--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=2', '--max_iters=2', '--eval_interval=2',
             '--eval_iters=1']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone']
    p = subprocess.run([*torchrun, '--nproc_per_node=2', TRAIN, *short], capture_output=True, text=True, env=env1(),
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 process(es)' in p.stdout and '= 2 process(es) x 4 accumulation x 2 batch x 32 block' in p.stdout
    assert [r['iter'] for r in read_log(tmp_path / 'out')] == [0, 2]
    p = subprocess.run([*torchrun, '--nproc_per_node=3', TRAIN, *short], capture_output=True, text=True, env=env1(),
                       cwd=tmp_path, timeout=300)
    assert p.returncode != 0
    assert 'gradient_accumulation_steps=8 counts micro-steps over all processes, so it must be divisible by the ' \
           'number of processes (3)' in p.stderr


@pytest.mark.parametrize('size', [1000, 3001])  # cut short (an interrupted copy), and an odd byte size
def test_a_shard_whose_size_disagrees_with_meta_json_is_one_line_naming_it(monkeypatch, tmp_path, size):
    data = make_shards(tmp_path / 'data', [np.zeros(2000), np.zeros(1500)], [np.zeros(500)])
    os.truncate(tmp_path / 'data' / 'shards' / 'train_000001.bin', size)
    with pytest.raises(SystemExit) as e:
        train(monkeypatch, *TINY, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=1')
    assert str(e.value) == (f"{tmp_path}/data/shards/train_000001.bin has {size:,} bytes, but meta.json says 1,500 "
                            f"uint16 tokens (3,000 bytes): it was cut short or damaged; run the same prepare.py "
                            f"command again")
    assert not (tmp_path / 'out').exists()  # checked before anything was written


def test_a_single_file_layout_cut_short_is_refused(monkeypatch, tmp_path, data):
    os.truncate(tmp_path / 'data' / 'tiny' / 'val.bin', 800)  # meta.json says 600 tokens: 1,200 bytes
    with pytest.raises(SystemExit, match=r"tiny/val.bin has 800 bytes, but meta.json says 600 uint16 tokens"):
        train(monkeypatch, *TINY, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=1')

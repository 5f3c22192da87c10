"""
Tests of gpu_check.py, the one-command GPU acceptance run, where no GPU is: its CPU size end to end (the same three
stages and report at toy size, so that the script does not rot between GPU runs), a failing stage that leaves the
others running, and the GPU size's commands, which every script must accept (the GPU run itself needs a GPU).
"""
import json
import math
import os
import re
import runpy
import signal
import subprocess
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_CHECK = os.path.join(HERE, 'gpu_check.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1')


def gpu_check(tmp_path, *args):
    """Run gpu_check.py at CPU size; returns the finished process and the JSON report (None if none was written)."""
    out = tmp_path / 'check.json'
    result = subprocess.run([sys.executable, GPU_CHECK, '--size=cpu', f'--out={out}', *args], cwd=HERE, env=ENV,
                            capture_output=True, text=True, timeout=300)
    return result, json.loads(out.read_text()) if out.exists() else None


def test_cpu_size_runs_the_three_stages_and_reports_their_numbers(tmp_path):
    result, report = gpu_check(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report['ok'] and list(report['stages']) == ['equivalence', 'bench', 'train']
    assert report['size'] == 'cpu' and report['torch'] and report['date'] and report['seconds'] > 0  # budget: below
    for stage in report['stages']:
        assert (tmp_path / f'check.{stage}.log').stat().st_size > 0

    eq = report['stages']['equivalence']  # test_model.py's KV-cache tests, in bf16 on the CPU here
    names = {t['name'].split('[')[0] for t in eq['tests']}
    assert {'test_cached_decoding_equals_full_forward', 'test_cached_decoding_baseline',
            'test_greedy_generation_same_with_and_without_cache', 'test_cached_decoding_under_autocast'} <= names
    assert eq['passed'] == len(eq['tests']) >= 20 and eq['failed'] == 0
    assert (eq['device'], eq['dtype']) == ('cpu', 'bfloat16')
    assert 0 <= eq['max_logit_diff'] < eq['tolerance'] == 0.25 and 0 <= eq['max_greedy_gap'] < eq['tolerance']

    bench = report['stages']['bench']  # one row per mode, length and batch; both models measured
    expected = {(mode, T, B) for T in (32, 64)
                for mode, B in [('train', 512 // T), ('prefill', 512 // T), ('decode', 1), ('decode', 2)]}
    assert {(r['mode'], r['seq_len'], r['batch']) for r in bench['rows']} == expected
    assert len(bench['records']) == 2 * len(bench['rows'])
    for r in bench['rows']:
        for key in ('llama_tokens_per_s', 'subllm_tokens_per_s', 'speedup', 'flop_ratio'):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r['flop_ratio'] > 1 and not r['oom']
        assert r['llama_mem_bytes'] >= 0 and r['llama_mfu'] is None  # no peak FLOP/s on a CPU
        if r['mode'] == 'decode':  # an eager step's kernels and host reads (none for LLaMA), the caches' bytes
            assert r['llama_reads_per_step'] == 0 < r['subllm_reads_per_step'] <= 2 and r['subllm_ops_per_step'] > 0
            assert 0 < r['subllm_cache_bytes'] < r['llama_cache_bytes']

    train = report['stages']['train']  # the 250m config's file, toy-sized, 10 iterations on stdlib bytes
    assert train['config'] == 'config/gpu_subllm_250m.py' and 'stdlib' in train['data']
    assert [i for i, _ in train['loss_curve']] == list(range(10))
    assert all(math.isfinite(loss) for _, loss in train['loss_curve'])
    assert [e['iter'] for e in train['evals']] == [0, 3, 6, 9, 10] and train['loss_decreased']
    assert train['tokens_per_iter'] == 4 * 64 and train['vocab_size'] == 256 and train['tokens_per_s'] > 0
    assert train['mfu'] is None and train['steady_iters'] == [3, 10]

    for line in ('equivalence  ok', 'bench        ok', 'train        ok', 'all passed', '| mode | seq_len |'):
        assert line in result.stdout


def test_a_failing_stage_is_reported_and_the_next_one_still_runs(tmp_path):
    result, report = gpu_check(tmp_path, '--stages=equivalence,bench', '--equiv_dtype=float64',
                               '--bench_seq_lens=32')
    assert result.returncode == 1 and not report['ok']
    eq, bench = report['stages']['equivalence'], report['stages']['bench']
    assert not eq['ok'] and eq['passed'] == 0 and 'exit status' in eq['error']
    assert 'SUBLLM_TEST_DTYPE must be float32' in (tmp_path / 'check.equivalence.log').read_text()
    assert bench['ok'] and bench['rows']
    assert 'FAILED' in result.stdout and 'train' not in report['stages']


def test_the_gpu_size_commands_are_accepted_by_their_scripts(tmp_path):
    """--dry_run lists the GPU run's commands without a GPU; each script parses its flags (--help, added last,
    exits 0 only after every flag before it was accepted) and pytest collects the KV-cache tests."""
    listed = subprocess.run([sys.executable, GPU_CHECK, '--size=gpu', '--dry_run=True', f'--work_dir={tmp_path}'],
                            cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    plan = json.loads(listed.stdout)
    assert plan['env']['equivalence'] == {'SUBLLM_TEST_DEVICE': 'cuda', 'SUBLLM_TEST_DTYPE': 'bfloat16'}
    (prepare, train), (bench, compiled, decode) = plan['commands']['train'], plan['commands']['bench']
    assert '--max_iters=150' in train and 'config/gpu_subllm_250m.py' in train
    assert {'--preset=1300m', '--seq_lens=2048', '--decode_batch=8', '--decode_batch_large=64'} <= set(bench)
    assert {'--preset=1300m', '--seq_lens=4096', '--modes=train', '--compile=True'} <= set(compiled)
    assert {'--preset=1300m', '--modes=decode', '--decode_batch_large=64', '--compile=True'} <= set(decode)
    for cmd in (prepare, train, bench, compiled, decode):
        done = subprocess.run(cmd + ['--help'], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and not done.stderr.strip(), (cmd, done.stderr)
    (pytest_cmd,) = plan['commands']['equivalence']
    collected = subprocess.run([c for c in pytest_cmd if not c.startswith('--junitxml')] + ['--collect-only'],
                               cwd=HERE, env=dict(ENV, **plan['env']['equivalence']), capture_output=True,
                               text=True, timeout=120)
    assert collected.returncode == 0, collected.stdout[-2000:]
    n = re.search(r"(\d+)/\d+ tests collected", collected.stdout)
    assert n and int(n.group(1)) >= 20 and 'test_cached_decoding_equals_full_forward' in collected.stdout


def test_the_duel_trains_both_arms_on_the_same_data_and_compares_them_at_one_iter(tmp_path):
    """--stages=duel at CPU size: SUBLLM and the FLOP-matched LLaMA (the pair's configs, toy-sized) both train to
    the end; the report's val losses and FLOPs are those of each run's log at the same iter, and the gap is their
    difference. At GPU size its commands are the configs' own, which train.py accepts."""
    result, report = gpu_check(tmp_path, '--stages=duel', f'--work_dir={tmp_path / "work"}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    duel = report['stages']['duel']
    assert duel['ok'] and duel['iter'] == 10 and 'stdlib' in duel['data']
    logs = {arm: [json.loads(line) for line in open(tmp_path / 'work' / f'duel-{arm}' / 'log.jsonl')]
            for arm in ('subllm', 'llama')}
    for arm, log in logs.items():
        assert duel[arm]['val_loss'] == log[-1]['val_loss'] and duel[arm]['flops'] == log[-1]['flops']
        assert log[-1]['iter'] == 10 and log[-1]['tokens'] == logs['subllm'][-1]['tokens']  # the same tokens
    assert duel['subllm']['kept'] and duel['llama']['kept'] is None  # levels in one arm only
    assert duel['gap'] == duel['subllm']['val_loss'] - duel['llama']['val_loss']
    assert 'duel' in result.stdout and 'gap' in result.stdout
    listed = subprocess.run([sys.executable, GPU_CHECK, '--size=gpu', '--dry_run=True', '--stages=duel',
                             f'--work_dir={tmp_path}'], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    prepare, subllm, llama = json.loads(listed.stdout)['commands']['duel']
    assert 'config/duel_subllm_50m.py' in subllm and 'config/duel_llama_50m.py' in llama
    for cmd in (prepare, subllm, llama):
        done = subprocess.run(cmd + ['--help'], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and not done.stderr.strip(), (cmd, done.stderr)


def test_each_stage_gets_the_time_left_less_what_the_later_stages_keep(tmp_path, monkeypatch):
    """The budget, on a clock the test controls (the wall clock plays no part): a stage's timeout is the budget's
    time left less the minimum kept for each later stage (at size cpu: 3, 12 and 15 s); a stage that takes all of
    its time leaves the next one exactly its minimum, and the report adds up the clock."""
    monkeypatch.setattr(sys, 'argv', ['gpu_check.py', '--size=cpu', '--budget_s=460', f'--out={tmp_path / "c.json"}',
                                      f'--work_dir={tmp_path / "work"}'])
    main = runpy.run_path(GPU_CHECK, run_name='gpu_check_under_test')['main']
    module = main.__globals__  # the namespace main runs in
    clock = [5000.0]
    module['time'] = types.SimpleNamespace(time=lambda: clock[0])
    module['t_start'], module['deadline'] = clock[0], clock[0] + 460
    timeouts = {}

    def stage(name, needs):  # a stage that needs this many seconds, and is stopped at its timeout
        def run_stage(timeout, work):
            timeouts[name] = timeout
            clock[0] += min(needs, timeout)
            return dict(ok=needs <= timeout, seconds=min(needs, timeout),
                        **({} if needs <= timeout else {'error': 'ran out of time (--budget_s)'}))
        return run_stage
    module['RUNS'].update(equivalence=stage('equivalence', 100), bench=stage('bench', 1000), train=stage('train', 10))
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert main() == 1
    finally:
        signal.signal(signal.SIGTERM, sigterm)  # main turns SIGTERM into an exit: not this process's
    assert timeouts == {'equivalence': 460 - 12 - 15, 'bench': 460 - 100 - 15, 'train': 15}
    report = json.loads((tmp_path / 'c.json').read_text())
    assert report['seconds'] == 455 and not report['ok']
    assert [(s['ok'], s['seconds']) for s in report['stages'].values()] == [(True, 100), (False, 345), (True, 10)]


def test_the_fsdp_stage_runs_train_py_sharded_and_resumes_it(tmp_path):
    """--stages=fsdp at CPU size (train.py alone, a world of one, gloo, eager): 4 iterations with sharded
    checkpoints, resumed from them for 2 more; at GPU size the same commands under torchrun, at their size and
    compiled."""
    result, report = gpu_check(tmp_path, '--stages=fsdp', f'--work_dir={tmp_path / "work"}')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    fsdp = report['stages']['fsdp']
    assert fsdp['ok'] and [i for i, _ in fsdp['evals']] == [0, 2, 4, 6] and fsdp['state_mb'] > 0
    assert sorted(os.listdir(tmp_path / 'work' / 'fsdp')) == ['ckpt.dcp', 'ckpt_prev.dcp', 'log.jsonl']
    assert 'fsdp         ok' in result.stdout
    listed = subprocess.run([sys.executable, GPU_CHECK, '--size=gpu', '--dry_run=True', '--stages=fsdp',
                             f'--work_dir={tmp_path}'], cwd=HERE, env=ENV, capture_output=True, text=True, timeout=120)
    _, first, resumed = json.loads(listed.stdout)['commands']['fsdp']  # the CPU run's, but for size and compile
    assert {'--fsdp=True', '--compile=True', '--nproc_per_node=1'} <= set(first) and '--init_from=resume' in resumed

"""
Preemption: SIGTERM (or SIGUSR1) ends a run after its current iteration with a checkpoint from which
--init_from=resume continues exactly as the uninterrupted run, in one process and under torchrun (2 processes, gloo);
a second signal ends it at once. The runs are subprocesses, and the signals real ones.
"""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from test_train import TINY, TRAIN, env1, make_data, read_log, train

FLAGS = [*TINY, '--max_iters=12', '--eval_interval=4', '--learning_rate=3e-3', '--warmup_iters=3']


def wrapper(tmp_path, body):
    """A script that runs train.py after `body` (Python that may patch model.SubLLM.set_step, which every
    iteration calls first)."""
    path = tmp_path / 'run_train.py'
    path.write_text(f"import os, runpy, signal, time\nimport model\noriginal = model.SubLLM.set_step\n{body}\n"
                    f"runpy.run_path({TRAIN!r}, run_name='__main__')\n")
    return str(path)


def signal_at(step, *signals, pause=0.0):
    """set_step sends these signals to its own process at iteration `step`, `pause` seconds apart."""
    return (f"def set_step(self, step, max_steps=None):\n"
            f"    if step == {step}:\n"
            f"        for k, s in enumerate({[int(s) for s in signals]}):\n"
            f"            time.sleep({pause} * (k > 0))\n"
            f"            os.kill(os.getpid(), s)\n"
            f"            time.sleep(0.2)\n"
            f"    original(self, step, max_steps)\n"
            f"model.SubLLM.set_step = set_step\n")


def logged(out):
    return [{k: v for k, v in r.items() if k != 'time_s'} for r in read_log(out)]


def weights(out):
    return torch.load(out / 'ckpt.pt')['model']


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    return make_data(tmp_path / 'data', rng.integers(0, 64, 4000), rng.integers(0, 64, 600))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_the_iteration_and_resume_continues_exactly(monkeypatch, tmp_path, data, sig):
    train(monkeypatch, *FLAGS, *data, f'--out_dir={tmp_path / "a"}')  # uninterrupted
    out = tmp_path / 'b'
    cmd = [sys.executable, wrapper(tmp_path, signal_at(6, sig)), *FLAGS, *data, f'--out_dir={out}']
    p = subprocess.run(cmd, capture_output=True, text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == (f"stopped by {sig.name} at iter 7, saved in {out}/ckpt.pt: to "
                                                 f"continue, run the same command with --init_from=resume")
    assert 'iter 6: loss' in p.stdout and 'iter 7: loss' not in p.stdout  # iteration 6 finished, and no more
    ckpt = torch.load(out / 'ckpt.pt')
    assert ckpt['iter_num'] == 7 and ckpt['preempted'] == sig.name
    assert torch.load(out / 'ckpt_prev.pt')['iter_num'] == 4  # the eval's checkpoint before it
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'ckpt_prev.pt', 'log.jsonl']  # the lock released
    assert [r['iter'] for r in read_log(out)] == [0, 4]
    train(monkeypatch, *FLAGS, *data, f'--out_dir={out}', '--init_from=resume')
    assert logged(out) == logged(tmp_path / 'a')  # the same losses, exactly, each eval once
    a, b = weights(tmp_path / 'a'), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_at_an_eval_iteration_resumes_with_that_eval(monkeypatch, tmp_path, data):
    """Stopped after iteration 7, the checkpoint is at iter 8, whose eval has not run: the resumed run runs it."""
    train(monkeypatch, *FLAGS, *data, f'--out_dir={tmp_path / "a"}')
    out = tmp_path / 'b'
    cmd = [sys.executable, wrapper(tmp_path, signal_at(7, signal.SIGTERM)), *FLAGS, *data, f'--out_dir={out}']
    p = subprocess.run(cmd, capture_output=True, text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and torch.load(out / 'ckpt.pt')['iter_num'] == 8, p.stderr[-3000:]
    assert [r['iter'] for r in read_log(out)] == [0, 4]
    train(monkeypatch, *FLAGS, *data, f'--out_dir={out}', '--init_from=resume')
    assert logged(out) == logged(tmp_path / 'a')


def test_a_second_signal_ends_the_run_at_once(tmp_path, data):
    """The second SIGTERM, 2.5 s after the first (more than the 2 s in which SIGTERMs count as one preemption),
    arrives while iteration 6 still runs: the process ends by it, with no checkpoint of its own, and frees the lock."""
    out = tmp_path / 'out'
    body = signal_at(6, signal.SIGTERM, signal.SIGTERM, pause=2.5)
    cmd = [sys.executable, wrapper(tmp_path, body), *FLAGS, *data, f'--out_dir={out}']
    p = subprocess.run(cmd, capture_output=True, text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode == -signal.SIGTERM, p.stderr[-3000:]
    assert 'stopped by' not in p.stdout and 'iter 6: loss' not in p.stdout
    assert torch.load(out / 'ckpt.pt')['iter_num'] == 4 and not (out / 'train.lock').exists()


def test_torchrun_sigterm_stops_every_rank_at_one_iteration_and_resume_continues_exactly(tmp_path, data):
    """torchrun passes its SIGTERM on to both ranks; they agree on the iteration, rank 0 saves every rank's random
    states, each rank exits 0, and the resumed 2-process run ends as the uninterrupted one."""
    slow = wrapper(tmp_path, "def set_step(self, step, max_steps=None):\n    time.sleep(0.1)\n"
                             "    original(self, step, max_steps)\nmodel.SubLLM.set_step = set_step\n")
    flags = [*TINY, *data, '--max_iters=40', '--eval_interval=8', '--gradient_accumulation_steps=2']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', slow, *flags]
    p = subprocess.run([*torchrun, f'--out_dir={tmp_path / "a"}'], capture_output=True, text=True, env=env1(),
                       cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / 'b'
    run = subprocess.Popen([*torchrun, f'--out_dir={out}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env1(), cwd=tmp_path)
    deadline = time.time() + 200
    while not ((out / 'log.jsonl').exists() and (out / 'log.jsonl').read_text().endswith('\n')):  # the first eval
        assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # a few iterations in
    run.send_signal(signal.SIGTERM)
    stdout, stderr = run.communicate(timeout=120)
    ranks = stderr.split('torch/distributed/elastic')[0]
    assert 'Traceback' not in ranks and 'terminate called' not in stderr, stderr[-3000:]
    assert 'exitcode  : -' not in stderr and 'exitcode  : 1' not in stderr  # no rank killed or failed
    ckpt = torch.load(out / 'ckpt.pt')
    assert 0 < ckpt['iter_num'] < 40 and ckpt['preempted'] == 'SIGTERM' and len(ckpt['rng']) == 2
    assert stdout.count(f"stopped by SIGTERM at iter {ckpt['iter_num']}, saved in {out}/ckpt.pt") == 1  # rank 0
    assert not (out / 'train.lock').exists()
    p = subprocess.run([*torchrun, f'--out_dir={out}', '--init_from=resume'], capture_output=True, text=True,
                       env=env1(), cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert logged(out) == logged(tmp_path / 'a')
    a, b = weights(tmp_path / 'a'), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)

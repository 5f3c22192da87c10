"""
Tests of train.py over several processes (distributed.py, run_dir.py): FSDP (--fsdp=True) against DDP, sharded
checkpoints that resume exactly and reshard to another number of processes, a launch over two "nodes", and the
training loop's arithmetic (gradient accumulation, the learning-rate schedule) in one process, under DDP and under
FSDP alike. The processes run under torchrun with gloo on the CPU; a world of one runs in this process. A torchrun
launch costs seconds, so the tests share a few of them: the module's `runs` (one of each kind, 12 iterations) are
recorded by RECORDER and checked from several sides.
"""
import contextlib
import io
import math
import os
import runpy
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from model import SubLLM, SubLLMConfig
from run_dir import load_checkpoint
from test_train import TRAIN, env1, make_data, read_log, train

HERE = os.path.dirname(os.path.abspath(__file__))
# a SUBLLM with two nested levels, 4 micro-steps per iteration over all processes; warmup for 3 iterations, cosine
# down to min_lr at 8, then min_lr; the gradient's norm is ~0.5: clipped at every step
FLAGS = ['--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=2', '--structure=TT(T(T)T)', '--device=cpu',
         '--compile=False', '--max_iters=12', '--eval_interval=4', '--eval_iters=1', '--log_interval=1',
         '--gradient_accumulation_steps=4', '--learning_rate=1e-3', '--min_lr=1e-4', '--warmup_iters=3',
         '--lr_decay_iters=8', '--grad_clip=0.3']
# the schedule of FLAGS, written out: (it + 1) / 4 of the peak while warming up, the cosine from the peak at 3 to the
# floor at 8, the floor after
LRS = ([1e-3 * (it + 1) / 4 for it in range(3)] +
       [1e-4 + 0.5 * (1 + math.cos(math.pi * (it - 3) / 5)) * 9e-4 for it in range(3, 8)] + [1e-4] * 4)

# train.py, recording on each rank: the training losses, the learning rate of each optimizer step, iteration 0's
# crops, weights (in full), random state, gradients (reduced over the ranks, before clipping, in full) and the norm
# that clip_grad_norm_ clipped them by, the bytes
# of state the rank holds after the first step, and after a resume the state it resumed from (in full). With STOP_AT
# and STOP_RANK, that rank sends itself SIGUSR1 (a preemption) at the start of that iteration.
RECORDER = r'''
import os, runpy, signal, torch
import model, run_dir
from torch.utils._pytree import tree_map
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
rank = int(os.environ.get('RANK', 0))
record = dict(losses=[], lrs=[], crops=[], state_bytes=None, step=None)
whole = lambda t: (t.full_tensor() if hasattr(t, 'full_tensor') else t.detach()).clone()  # not the live one
local = lambda t: t.to_local() if hasattr(t, 'to_local') else t
copied = lambda state: tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, state)  # not the live ones
originals = model.SubLLM.set_step, model.SubLLM.forward, run_dir.restore, torch.nn.utils.clip_grad_norm_
set_step, forward, restore, clip = originals

def recording_set_step(self, step, max_steps=None):
    if step == 0:
        record.update(weights0={k: whole(t) for k, t in self.state_dict().items()}, rng0=torch.get_rng_state())
    if step == int(os.environ.get('STOP_AT', -1)) and rank == int(os.environ.get('STOP_RANK', 0)):
        os.kill(os.getpid(), signal.SIGUSR1)
    record['step'] = step
    set_step(self, step, max_steps)

def recording_forward(self, idx, targets=None):
    logits, loss = forward(self, idx, targets)
    if self.training and torch.is_grad_enabled():
        record['losses'].append(loss.item())
        if record['step'] == 0:
            record['crops'].append((idx.clone(), targets.clone()))
    return logits, loss

def recording_clip(parameters, max_norm, *args, **kwargs):
    parameters = list(parameters)
    grads = None if 'grads0' in record else [whole(p.grad) for p in parameters]
    norm = clip(parameters, max_norm, *args, **kwargs)
    if grads is not None:
        record.update(grads0=grads, norm0=whole(norm))
    return norm

def recording_restore(checkpoint, path, model, optimizer, *args, **kwargs):
    resumed_at = restore(checkpoint, path, model, optimizer, *args, **kwargs)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    record['loaded'] = copied(get_state_dict(model, optimizer, options=full))
    return resumed_at

def before_step(optimizer, args, kwargs):
    record['lrs'].append(optimizer.param_groups[0]['lr'])

def after_step(optimizer, args, kwargs):
    if record['state_bytes'] is None:
        params = [p for group in optimizer.param_groups for p in group['params']]
        tensors = params + [p.grad for p in params] + [
            t for state in optimizer.state.values() for k, t in state.items() if k != 'step']
        record['state_bytes'] = sum(local(t).numel() * local(t).element_size() for t in tensors)

model.SubLLM.set_step, model.SubLLM.forward = recording_set_step, recording_forward
run_dir.restore, torch.nn.utils.clip_grad_norm_ = recording_restore, recording_clip
hooks = [register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step)]
try:
    runpy.run_path(os.environ['TRAIN'], run_name='__main__')
finally:
    torch.save(record, os.path.join(os.environ['RECORD'], f'rank{rank}.pt'))
    model.SubLLM.set_step, model.SubLLM.forward, run_dir.restore, torch.nn.utils.clip_grad_norm_ = originals
    for hook in hooks:
        hook.remove()
'''


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


class Run:
    """A recorded train.py run: out_dir, stdout (of all its processes), rank r's record as record[r]."""

    def __init__(self, out, stdout, records):
        self.out, self.stdout, self.record = out, stdout, records


# stand-ins for SLURM's srun (it starts its command once per node, train.py replaced by RECORDER) and scontrol (the
# job's nodes are all this machine), so that slurm/train.sbatch runs here as sbatch would run it on SLURM_NNODES nodes
SRUN = r'''import os, subprocess, sys
torchrun, *args = sys.argv[1:]
assert torchrun == 'torchrun'
cmd = [sys.executable, '-m', 'torch.distributed.run'] + [os.environ['RECORDER'] if a == 'train.py' else a for a in args]
nodes = [subprocess.Popen(cmd, env=dict(os.environ, SLURM_NODEID=str(node)))
         for node in range(int(os.environ['SLURM_NNODES']))]
sys.exit(max(node.wait() for node in nodes))
'''


def slurm_job(tmp, nodes, script):
    """The environment in which `bash slurm/train.sbatch` runs a job of `nodes` nodes of one process each here."""
    (tmp / 'bin').mkdir(exist_ok=True)
    (tmp / 'bin' / 'srun').write_text(f"#!{sys.executable}\n{SRUN}")
    (tmp / 'bin' / 'scontrol').write_text("#!/bin/sh\necho localhost\n")
    for stand_in in ('srun', 'scontrol'):
        (tmp / 'bin' / stand_in).chmod(0o755)
    return dict(PATH=f"{tmp / 'bin'}:{os.environ['PATH']}", RECORDER=str(script), SLURM_NNODES=str(nodes),
                SLURM_JOB_NODELIST='node[1-2]', SLURM_JOB_ID='4242', GPUS_PER_NODE='1', MASTER_PORT=str(free_port()))


def launch(tmp, name, *args, nproc=2, nodes=1, slurm=False, env=None, record=None):
    """train.py with FLAGS and args through RECORDER, into out_dir tmp/name, recorded into tmp/<record or name>.record:
    torchrun --standalone with nproc processes, or `nodes` torchruns of one process each that meet in a c10d
    rendezvous on localhost (two "nodes"), started by slurm/train.sbatch if slurm, or nproc=0: in this process
    (--fsdp=True makes a world of one)."""
    out, record_dir = tmp / name, tmp / f'{record or name}.record'
    record_dir.mkdir()
    script = tmp / 'recorder.py'
    script.write_text(RECORDER)
    argv = [*FLAGS, f'--data_dir={tmp / "data"}', '--dataset=tiny', *args, f'--out_dir={out}']
    env = dict(env1(), TRAIN=TRAIN, RECORD=str(record_dir), **(env or {}))
    if nproc == 0:
        stdout = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
            mp.setattr(sys, 'argv', ['recorder.py', *argv])
            mp.setenv('TRAIN', TRAIN)
            mp.setenv('RECORD', str(record_dir))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                runpy.run_path(str(script), run_name='__main__')
            finally:
                torch.set_num_threads(threads)
        return Run(out, stdout.getvalue(), [torch.load(record_dir / 'rank0.pt', weights_only=False)])
    if slurm:
        torchrun = [['bash', os.path.join(HERE, 'slurm', 'train.sbatch')]]
        env.update(slurm_job(tmp, nodes, script))
    elif nodes == 1:
        torchrun = [[sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']]
    else:
        rendezvous = ['--rdzv_backend=c10d', f'--rdzv_endpoint=localhost:{free_port()}', f'--rdzv_id={name}']
        torchrun = [[sys.executable, '-m', 'torch.distributed.run', f'--nnodes={nodes}', '--nproc_per_node=1',
                     *rendezvous]] * nodes
    procs = [subprocess.Popen([*cmd, *([] if slurm else [str(script)]), *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp) for cmd in torchrun]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    return Run(out, ''.join(o[0] for o in outputs),
               [torch.load(record_dir / f'rank{r}.pt', weights_only=False) for r in range(max(nproc, nodes))])


@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('distributed')
    rng = np.random.default_rng(0)
    make_data(tmp / 'data', rng.integers(0, 64, 4000), rng.integers(0, 64, 600))
    return tmp


@pytest.fixture(scope='module')
def runs(tmp):
    """The same 12 iterations: in one process (here), over 2 processes with DDP on two "nodes" (two torchruns of one
    process each, as on two machines) started by slurm/train.sbatch, and with FSDP in one torchrun."""
    return {'single': launch(tmp, 'single', nproc=0), 'ddp': launch(tmp, 'ddp', nodes=2, slurm=True),
            'fsdp': launch(tmp, 'fsdp', '--fsdp=True')}


def without_time(out):
    return [{k: v for k, v in r.items() if k != 'time_s'} for r in read_log(out)]


def weights(out):
    """The final weights, from ckpt.pt or consolidated from ckpt.dcp/ (load_checkpoint, as sample.py reads them)."""
    return load_checkpoint(out)[0]['model']


def max_diff(a, b):
    """The largest difference between two lists of numbers or two dicts of tensors."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def eval_numbers(out):
    """Every number of every record of out's log.jsonl (losses, kept fractions, ...), but time_s."""
    return [x for r in read_log(out) for k, v in r.items() if k != 'time_s'
            for x in (v if isinstance(v, list) else [v])]


def test_fsdp_trains_as_ddp_to_1e_5_and_ends_with_the_same_weights(runs):
    """2 processes, the same settings (DDP on two "nodes", through slurm/train.sbatch): the loss of every micro-step of
    the 12 iterations on both ranks, every eval and the final weights agree to 1e-5 (measured: 1e-7, the clip's norm
    of sharded gradients adds in another order; docs/distributed.md). Each rank keeps its own running cut
    (score_offset) under both: a broadcast or sharded cut, shards of different initial weights, or a clip by one
    rank's part of the gradient would not."""
    ddp, fsdp = runs['ddp'], runs['fsdp']
    assert 'saving checkpoint to' in fsdp.stdout and os.path.isdir(fsdp.out / 'ckpt.dcp')
    for rank in (0, 1):
        assert len(fsdp.record[rank]['losses']) == 12 * 2
        assert max_diff(ddp.record[rank]['losses'], fsdp.record[rank]['losses']) < 1e-5
    assert ddp.record[0]['losses'] != ddp.record[1]['losses']  # each rank trains on its own crops
    assert [r['iter'] for r in read_log(fsdp.out)] == [0, 4, 8, 12]
    assert max_diff(eval_numbers(ddp.out), eval_numbers(fsdp.out)) < 1e-5
    assert max_diff(weights(ddp.out), weights(fsdp.out)) < 1e-5


def reference_gradients(run):
    """Iteration 0's gradients as the loop must make them, from what each rank recorded: on each rank the mean over
    its micro-steps of each one's loss gradient (the running cut moving between them, the rank's random state drawing
    the Balancer's coin flips, as in the run), then the mean over the ranks."""
    model_args = load_checkpoint(run.out)[0]['model_args']
    total = None
    with torch.random.fork_rng():
        for record in run.record:
            model = SubLLM(SubLLMConfig(**model_args))
            model.load_state_dict(run.record[0]['weights0'])
            model.set_step(0, 12)
            torch.set_rng_state(record['rng0'])
            for x, y in record['crops']:
                (model(x, y)[1] / len(record['crops'])).backward()
            grads = [p.grad for p in model.parameters()]
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [g / len(run.record) for g in total]


@pytest.mark.parametrize('kind', ['single', 'ddp', 'fsdp'])
def test_an_iterations_gradient_is_the_mean_over_every_micro_step_of_every_rank(runs, kind):
    """Before clipping, with 4 micro-steps per iteration (4 in one process, 2 on each of 2): a loss not divided by
    the micro-steps makes it 4x or 2x too large (AdamW's scale invariance and the clip hide that from the losses); a
    missing reduction over the ranks, or one at every micro-step that DDP or FSDP got wrong, gives another gradient."""
    run = runs[kind]
    assert all(len(r['crops']) == 4 // len(run.record) for r in run.record)
    recorded, reference = run.record[0]['grads0'], reference_gradients(run)
    assert len(recorded) == len(reference)
    for g, r in zip(recorded, reference):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-7), (g.norm(), r.norm())
    assert all(torch.equal(g, h) for g, h in zip(recorded, run.record[-1]['grads0']))  # every rank steps with it
    # clipped by the norm of the whole gradient (under FSDP: of every rank's shards), not of this rank's part
    total = torch.cat([g.flatten() for g in recorded]).double().norm().item()
    assert all(r['norm0'].item() == pytest.approx(total, rel=1e-4) for r in run.record) and total > 0.3


@pytest.mark.parametrize('kind', ['single', 'ddp', 'fsdp'])
def test_the_learning_rate_warms_up_then_follows_the_cosine_to_its_floor(runs, kind):
    """The rate AdamW steps with, and the one log.jsonl says, at every iteration: a warmup that is skipped (the peak
    from iteration 0), a schedule that is off by one or that never reaches min_lr fails."""
    for record in runs[kind].record:
        assert record['lrs'] == pytest.approx(LRS, rel=1e-9)
    assert LRS[0] == pytest.approx(1e-3 / 4) and LRS[3] == 1e-3 and LRS[8] == 1e-4 and len(LRS) == 12
    assert [r['lr'] for r in read_log(runs[kind].out)] == pytest.approx(LRS[::4] + [1e-4], rel=1e-9)


def printed_state_mb(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith('per-rank model + optimizer state: '))
    return float(line.split(': ')[1].split(' MB')[0])


def test_each_fsdp_rank_holds_half_the_state_and_says_so(runs):
    """The line train.py prints at the start is what each rank holds after the first step (weights, gradients and
    AdamW's moments; measured), the whole of it in one process or under DDP, about half under FSDP at 2."""
    whole = runs['single'].record[0]['state_bytes']
    for kind in ('single', 'ddp'):
        assert [r['state_bytes'] for r in runs[kind].record] == [whole] * len(runs[kind].record)
        assert printed_state_mb(runs[kind].stdout) == pytest.approx(whole / 1e6, abs=0.006)
    shards = [r['state_bytes'] for r in runs['fsdp'].record]
    assert all(0.45 < s / whole < 0.55 for s in shards) and sum(shards) >= whole
    assert printed_state_mb(runs['fsdp'].stdout) == pytest.approx(shards[0] / 1e6, abs=0.006)
    assert '1/2 of them' in runs['fsdp'].stdout


def test_fsdp_on_two_nodes_preempted_on_one_resumes_exactly_in_one_torchrun(runs, tmp):
    """Two torchruns of one process each, as on two machines (c10d rendezvous on localhost; runs['ddp'] trained so
    too), with FSDP: rank 1 alone gets SLURM's SIGUSR1 at iteration 5; both ranks finish it, save their shards at iter
    6 and exit 0. Resumed by one torchrun of 2 processes, the run ends exactly as the one that was never stopped:
    every eval, every loss after the resume, the final weights."""
    name = 'nodes-fsdp'
    stopped = launch(tmp, name, '--fsdp=True', nodes=2, env=dict(STOP_AT='5', STOP_RANK='1'))
    assert 'stopped by a signal to another rank at iter 6' in stopped.stdout
    checkpoint, path = load_checkpoint(tmp / name, ('model', 'rng', 'preempted'))
    assert path == str(tmp / name / 'ckpt.dcp') and sorted(os.listdir(path)) == [
        '.metadata', '__0_0.distcp', '__1_0.distcp', 'run.pt']
    assert checkpoint['iter_num'] == 6 and checkpoint['preempted'] == 'a signal to another rank'
    assert len(checkpoint['rng']) == 2 and [r['iter'] for r in read_log(tmp / name)] == [0, 4]
    assert sorted(os.listdir(tmp / name)) == ['ckpt.dcp', 'ckpt_prev.dcp', 'log.jsonl']
    resumed = launch(tmp, name, '--fsdp=True', '--init_from=resume', record=f'{name}.resumed')
    assert without_time(tmp / name) == without_time(runs['fsdp'].out)
    for rank in (0, 1):  # the micro-steps of iterations 6 to 11, exactly
        assert resumed.record[rank]['losses'] == runs['fsdp'].record[rank]['losses'][6 * 2:]
    assert max_diff(weights(tmp / name), weights(runs['fsdp'].out)) == 0


def consolidated(out):
    """ckpt.dcp/ of out, model and optimizer in full, by torch's own converter (not by run_dir.py)."""
    path = out.parent / f'{out.name}.consolidated.pt'
    dcp_to_torch_save(out / 'ckpt.dcp', path)
    return torch.load(path, weights_only=False)


def test_a_sharded_checkpoint_of_2_processes_resumes_at_4_and_at_1_with_its_weights_and_optimizer_state(runs, tmp):
    """The FSDP run's checkpoint (iter 12, saved by 2 processes) resumes resharded: each of 4 processes, or the one,
    reads the rows it holds now, and in full they are the saved weights and AdamW state, exactly. The random states
    of 2 processes do not fit 4 or 1: reseeded, and said. Each run trains on to iter 13 and saves its own checkpoint,
    each of its ranks holding about 1/4 (or all) of the state."""
    saved = consolidated(runs['fsdp'].out)
    assert max_diff(weights(runs['fsdp'].out), saved['model']) == 0  # run_dir's consolidation (sample.py & co)
    whole = runs['single'].record[0]['state_bytes']
    for n in (4, 1):
        shutil.copytree(runs['fsdp'].out, tmp / f'reshard{n}')
        run = launch(tmp, f'reshard{n}', '--fsdp=True', '--init_from=resume', '--max_iters=13', nproc=n if n > 1 else 0)
        model, optimizer = run.record[0]['loaded']
        assert max_diff(model, saved['model']) == 0
        assert optimizer['state'].keys() == saved['optimizer']['state'].keys()
        for param, state in saved['optimizer']['state'].items():  # step, exp_avg, exp_avg_sq
            assert max_diff(optimizer['state'][param], state) == 0
        assert (f"the checkpoint has random states for 2 processes, this run has {n}: the weights and optimizer "
                f"state are the checkpoint's") in run.stdout
        assert [r['iter'] for r in read_log(tmp / f'reshard{n}')] == [0, 4, 8, 12, 13]
        assert load_checkpoint(tmp / f'reshard{n}')[0]['iter_num'] == 13
        assert len(os.listdir(tmp / f'reshard{n}' / 'ckpt.dcp')) == n + 2  # a file per rank, .metadata, run.pt
        assert all(abs(r['state_bytes'] / whole - 1 / n) < 0.05 for r in run.record)
        assert printed_state_mb(run.stdout) == pytest.approx(run.record[0]['state_bytes'] / 1e6, abs=0.006)


def test_fsdp_in_one_process_trains_exactly_as_without_it_also_with_a_recurrent_block(monkeypatch, tmp):
    """python train.py --fsdp=True: a world of one, the same numbers as without FSDP, bit for bit. The block inside a
    recurrent block is a unit of its own that runs once per window in a forward: FSDP must gather it for each run
    and reduce its gradient once, after all of them (a reduction after the first would lose the others')."""
    flags = [*FLAGS, f'--data_dir={tmp / "data"}', '--dataset=tiny', '--structure=TR(T(T)T)', '--max_iters=6']
    for name, fsdp in (('rec', 'False'), ('rec-fsdp', 'True')):
        train(monkeypatch, *flags, f'--fsdp={fsdp}', f'--out_dir={tmp / name}')
    assert without_time(tmp / 'rec') == without_time(tmp / 'rec-fsdp')
    assert max_diff(weights(tmp / 'rec'), weights(tmp / 'rec-fsdp')) == 0


def test_a_damaged_sharded_checkpoint_falls_back_to_the_one_before_and_a_half_written_one_is_never_read(
        monkeypatch, runs, tmp):
    """A shard file cut short (a crash or a full disk while it was copied): load_checkpoint says so and reads
    ckpt_prev.dcp/; what a crash left of a save (ckpt.dcp.tmp/) is never read, and the resumed run deletes it. The
    run (here in one process) goes on from iter 8 and leaves ckpt.dcp/ and ckpt_prev.dcp/ of its last two saves,
    nothing else."""
    out = tmp / 'damaged'
    shutil.copytree(runs['fsdp'].out, out)
    shard = out / 'ckpt.dcp' / '__0_0.distcp'
    os.truncate(shard, shard.stat().st_size // 2)
    (out / 'ckpt.dcp.tmp').mkdir()
    (out / 'ckpt.dcp.tmp' / '__0_0.distcp').write_bytes(b'half a shard')
    said = []
    checkpoint, path = load_checkpoint(out, say=said.append)
    assert path == str(out / 'ckpt_prev.dcp') and checkpoint['iter_num'] == 8
    assert said == [f"{out}/ckpt.dcp cannot be read (ValueError: __0_0.distcp is cut short): using {path} instead, "
                    f"the checkpoint before it (iter 8)"]
    train(monkeypatch, *FLAGS, f'--data_dir={tmp / "data"}', '--dataset=tiny', '--fsdp=True', '--init_from=resume',
          '--max_iters=13', f'--out_dir={out}')
    assert [r['iter'] for r in read_log(out)] == [0, 4, 8, 12, 13]
    assert sorted(os.listdir(out)) == ['ckpt.dcp', 'ckpt_prev.dcp', 'log.jsonl']  # no temp directory, no lock
    assert load_checkpoint(out)[0]['iter_num'] == 13
    os.rename(out / 'ckpt.dcp', out / 'ckpt.dcp.moved')
    assert load_checkpoint(out, say=said.append)[0]['iter_num'] == 12 and said[-1].startswith(f"no {out}/ckpt.dcp:")


@pytest.mark.parametrize('args, message', [
    (['--init_from=resume'], "fsdp/ckpt.dcp is a sharded checkpoint (--fsdp=True): resume it with --fsdp=True, at "
                             "any number of processes"),
    (['--init_from=resume', '--fsdp=True', '--out_dir=SINGLE'], "single/ckpt.pt was saved without --fsdp: resume it "
                                                                "without --fsdp=True"),
    (['--fsdp=True', '--dtype=float16'], "--fsdp=True computes in bfloat16 or float32"),
])
def test_fsdp_mistakes_are_one_line(monkeypatch, runs, tmp, args, message):
    args = [a.replace('SINGLE', str(runs['single'].out)) for a in args]
    with pytest.raises(SystemExit) as e:
        train(monkeypatch, *FLAGS, f'--data_dir={tmp / "data"}', '--dataset=tiny', f'--out_dir={runs["fsdp"].out}',
              *args)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_fsdp_a_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(monkeypatch, tmp):
    original = SubLLM.forward

    def forward(self, idx, targets=None):  # the training loss turns NaN at iter 3 (4 micro-steps an iteration)
        logits, loss = original(self, idx, targets)
        if self.training and torch.is_grad_enabled():
            forward.calls += 1
            loss = loss * float('nan') if forward.calls > 3 * 4 else loss
        return logits, loss
    forward.calls = 0
    monkeypatch.setattr(SubLLM, 'forward', forward)
    out = tmp / 'nan'
    with pytest.raises(SystemExit, match=r'^loss is nan at iter 3: stopping; the last good checkpoint'):
        train(monkeypatch, *FLAGS, f'--data_dir={tmp / "data"}', '--dataset=tiny', '--fsdp=True', '--eval_interval=2',
              f'--out_dir={out}')
    assert load_checkpoint(out)[0]['iter_num'] == 2 and sorted(os.listdir(out)) == ['ckpt.dcp', 'log.jsonl']


def test_fsdp_with_est_trains_as_est_without_it(monkeypatch, tmp):
    """--est=True skips blocks and slices their weights: under FSDP (a world of one) a skipped block is never gathered
    and gets no gradient, a sliced one is gathered whole; the run is the one without FSDP, exactly."""
    flags = [*FLAGS, f'--data_dir={tmp / "data"}', '--dataset=tiny', '--est=True', '--max_iters=6',
             '--eval_interval=3', '--est_stage1_end=0.5', '--est_stage2_end=0.8']
    for name, fsdp in (('est', 'False'), ('est-fsdp', 'True')):
        train(monkeypatch, *flags, f'--fsdp={fsdp}', f'--out_dir={tmp / name}')
    assert without_time(tmp / 'est') == without_time(tmp / 'est-fsdp')
    assert max_diff(weights(tmp / 'est'), weights(tmp / 'est-fsdp')) == 0


def test_fsdp_with_compiled_blocks_trains_as_eager(monkeypatch, tmp):
    """With --compile=True each block is compiled before it is sharded (backend aot_eager here, inductor on a GPU),
    and the evals run eager: the run is the eager one's to 1e-5."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, 'compile', lambda self, *a, **k: compile_module(self, backend='aot_eager'))
    flags = [*FLAGS, f'--data_dir={tmp / "data"}', '--dataset=tiny', '--fsdp=True', '--max_iters=3',
             '--eval_interval=3', '--structure=TTT']  # one shape: a level's blocks would compile once per length
    train(monkeypatch, *flags, f'--out_dir={tmp / "eager"}')
    try:
        train(monkeypatch, *flags, '--compile=True', f'--out_dir={tmp / "compiled"}')
    finally:
        torch._dynamo.reset()
    assert max_diff(eval_numbers(tmp / 'eager'), eval_numbers(tmp / 'compiled')) < 1e-5
    assert max_diff(weights(tmp / 'eager'), weights(tmp / 'compiled')) < 1e-5

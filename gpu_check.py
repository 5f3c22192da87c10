"""
The GPU acceptance run (#17): one command that, on one GPU and in under 8 minutes, runs three stages, each a
subprocess with a time limit (a stage that fails or runs out of time is recorded, and the next one still runs),
then prints a summary and writes every number to --out (JSON) and each stage's whole output to <out>.<stage>.log:

  equivalence  test_model.py's KV-cache tests (pytest -k cache) on the GPU in bf16 autocast, as sample.py decodes:
               each cached decoding step gives the full forward's logits up to bf16 rounding (tolerance 0.25 on
               logits below 6; a level score within 0.1 of the cut may fall on either side: test_model.py's
               docstring), and greedy decoding with the cache picks the full forward's argmax.
  bench        bench.py --preset=1300m at 2k, SUBLLM against its LLaMA twin: train, prefill, and decode at
               batch 1, 8 and 64; tokens/s, speedup beside the FLOP ratio, peak memory, MFU, and for decoding the
               aten ops and host reads per step and the KV cache's bytes. Eager, 2 warmup then 6 timed iterations.
               Then the compiled training step of both models at 4k (the paper's headline point, +26%; train.py's
               path), and compiled decoding at 2k, batch 1, 8 and 64 (generate.py: a CUDA graph per segment between
               host reads), their compilation in the warmup, not timed, with the graphs compiled (training: one per
               model, more is a recompile) and the graph breaks (none expected). The eager 4k and 8k lengths were
               dropped to make room (--bench_seq_lens=2048,4096 brings 4k back); compiling the whole sweep is
               --bench_compile=True with a larger --budget_s.
  train        150 iterations of config/gpu_subllm_250m.py (the paper's 0.25B SUBLLM, torch.compile, bf16) on the
               Python stdlib's bytes (prepare.py --tokenizer=byte; random bytes if that fails) in the config's
               GPT-2 vocabulary size (50257 -> 50304 rows: the model, its FLOPs and MFU are the config's; only 256
               ids occur, so the loss falls fast from ln 50304 = 10.8). Batches of 8 x 4096 as the config's, 2
               micro-steps per iteration instead of 16 (65,536 tokens), warmup 15 iterations then cosine. Reports
               the loss every 5 iterations, the evals (every 50), tokens/s and MFU over iterations 50-150 (after
               compilation; evals and checkpoints excluded: log.jsonl's time_s and flops) and the first
               iteration's time (compilation included).

  duel         (not in the default stages: its own run, `--stages=duel`) SUBLLM at 55M parameters against the
               LLaMA with the same training FLOPs (config/duel_subllm_50m.py, config/duel_llama_50m.py: 11 blocks,
               0.985x), on the same stdlib bytes (vocab 256), tokens, seed and schedule, one after the other in
               half the budget each: both val losses at the last eval both reached, their FLOPs and tokens/s.
               Estimated ~2 min each on an H200 (1500 iterations of 32 x 1024 tokens, compiled; not measured).
  fsdp         (not in the default stages either: `--stages=fsdp`, or add it to the list) train.py --fsdp=True on one
               GPU under torchrun (a world of one: NCCL, the bf16 MixedPrecisionPolicy, each block compiled before it
               is sharded), a small SUBLLM for 20 iterations with sharded checkpoints (ckpt.dcp/), then resumed from
               them for 5 more, eager: the losses, the evals, the per-rank state line. Estimated ~1.5 min (mostly
               compilation; not measured). docs/distributed.md.

    python gpu_check.py                      # on a GPU: about 7-8 minutes (the estimate below)
    python gpu_check.py --stages=duel --out=duel.json   # the quality duel alone, within the same budget
    python gpu_check.py --out=h200.json      # the report elsewhere (and h200.<stage>.log)
    python gpu_check.py --size=cpu           # the same three stages at toy size on the CPU, < 1 min (the test)
    python gpu_check.py --stages=bench --bench_compile=True --budget_s=1800

Time on one H200, an estimate from the sizes (not measured yet; the JSON holds each stage's real seconds):
  equivalence ~20 s: pytest and CUDA start, 22 tiny tests.
  bench ~4 min: building the two 1.35B models on the CPU ~30 s (random init runs on one core), three times;
               train steps of 51 TFLOP (flops.py), ~0.15 s each at 40% MFU of 989 TFLOP/s, 8 per model: ~5 s;
               prefill a third of that; decode 9 x 64 steps per batch and model at 5-10 ms each (eager: bound by
               kernel launches and weight reads), 16 steps at batch 64: ~30 s; the compiled step at 4k: compiling
               forward and backward of 24 blocks ~1 min per model; compiled decoding: graphs of 5 to 14 blocks,
               5 at batch 1 and ~10 at batch 8 and 64 for SUBLLM (one per segment and bucket size), ~1.5 min.
  train ~3 min: stdlib bytes ~5 s; the first iteration ~1.5 min (torch.compile of the 24 blocks, forward and
               backward); 150 iterations of 84 TFLOP at 25-35% MFU, 0.25-0.35 s each: ~45 s; 4 evals and 3
               checkpoints (3 GB each) ~15 s.
The stages stop at budget_s (460 s) in all: each gets the time left, less a minimum kept for the ones after it.
Exit status 0 when every stage passed, 1 otherwise.
"""
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import numpy as np
import torch

from configurator import configure
from flops import gpu_peak_flops

# -----------------------------------------------------------------------------
size = 'auto'                  # 'gpu' (the run above), 'cpu' (toy sizes on the CPU: the test), auto: gpu with CUDA
out = 'gpu_check.json'         # the results; each stage's whole output goes to <out without .json>.<stage>.log
stages = 'equivalence,bench,train'  # which stages, comma separated, run in this order (or 'duel': see above)
budget_s = 460                 # seconds for all the stages together: a stage still running then is stopped
equiv_dtype = 'bfloat16'       # equivalence: autocast dtype (also on the CPU, so the low-precision path is checked)
train_iters = 150              # train: iterations of config/gpu_subllm_250m.py (10 at size cpu)
train_accumulation = 2         # train: micro-steps of 8 x 4096 tokens per iteration (the config's 16 is 8x longer)
bench_seq_lens = ''            # bench: '' = 2048 (gpu), 32,64 (cpu); the compiled train step is at 4096
bench_compile = False          # bench: compile the sweep's train and prefill too (a minute per length, mode and model)
bench_iters = 6                # bench: timed iterations per measurement (after 2 warmup ones; cpu: 1, no warmup)
work_dir = ''                  # data and checkpoints; '' = a temporary directory, removed at the end
dry_run = False                # print each stage's commands as JSON and exit (no GPU needed for --size=gpu)
configure(globals())  # --key=value (configurator.py)
# -----------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
STAGES = ('equivalence', 'bench', 'train', 'duel', 'fsdp')
# seconds kept back for a later stage (cpu: a tenth)
MIN_S = {'equivalence': 30, 'bench': 120, 'train': 150, 'duel': 240, 'fsdp': 90}
CONFIG = 'config/gpu_subllm_250m.py'
GPT2_VOCAB = 50257

if size == 'auto':
    size = 'gpu' if torch.cuda.is_available() else 'cpu'
if size not in ('gpu', 'cpu'):
    sys.exit(f"gpu_check.py: --size must be auto, gpu or cpu, got {size!r}")
if size == 'gpu' and not torch.cuda.is_available() and not dry_run:
    sys.exit("gpu_check.py: --size=gpu, but this torch sees no CUDA GPU (--size=cpu runs the toy-sized check)")
gpu = size == 'gpu'
device = 'cuda' if gpu else 'cpu'
chosen = [s.strip() for s in stages.split(',') if s.strip()]
if not chosen or any(s not in STAGES for s in chosen):
    sys.exit(f"gpu_check.py: --stages takes some of {', '.join(STAGES)}, comma separated; got {stages!r}")
min_s = {k: v if gpu else v / 10 for k, v in MIN_S.items()}
out_stem = out[:-5] if out.endswith('.json') else out
t_start = time.time()
deadline = t_start + budget_s


def log_path(stage):
    return f"{out_stem}.{stage}.log"


def child_env(**extra):
    env = dict(os.environ, **extra)
    if not gpu:
        env.setdefault('OMP_NUM_THREADS', '1')  # toy models: one thread is as fast, and kind to a busy machine
    return env


def run(cmd, stage, timeout, env=None):
    """Run cmd in the repository with its output appended to the stage's log. Returns (returncode or None when
    it ran out of time, seconds). Its own process group, so that a timeout stops its workers too (compilation)."""
    t0 = time.time()
    with open(log_path(stage), 'a') as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        if timeout < 1:
            log.write("not run: no time left in --budget_s\n")
            return None, 0.0
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT, env=env or child_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            rc = None
            log.write(f"\nstopped by gpu_check.py after {timeout:.0f} s (the time left in --budget_s)\n")
        except BaseException:  # Ctrl-C, or SIGTERM (main makes it a SystemExit): the stage must not outlive us
            stop(proc)
            raise
    return rc, time.time() - t0


def stop(proc):
    """Kill a stage's process and what it started (its process group: compile workers, data loaders)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(stage, lines=15):
    """The last lines of a stage's log: why it failed."""
    with open(log_path(stage), errors='replace') as f:
        text = [line.rstrip() for line in f if line.strip()]
    return '\n'.join(line[-300:] for line in text[-lines:])


def failure(stage, rc):
    return 'ran out of time (--budget_s)' if rc is None else f"exit status {rc}: {tail(stage, 3)}"


# -----------------------------------------------------------------------------
# stage 1: the KV-cache tests of test_model.py on the device, in equiv_dtype


EQUIV_ENV = dict(SUBLLM_TEST_DEVICE=device, SUBLLM_TEST_DTYPE=equiv_dtype)  # test_model.py reads them


def equivalence_cmd(work):
    return [PY, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'test_model.py', '-k', 'cache',
            f"--junitxml={os.path.join(work, 'equivalence.xml')}", '-o', 'junit_family=xunit1']


def equivalence(timeout, work):
    xml = os.path.join(work, 'equivalence.xml')
    cmd = equivalence_cmd(work)
    rc, seconds = run(cmd, 'equivalence', timeout, child_env(**EQUIV_ENV))
    tests = []
    if os.path.exists(xml):
        for case in ET.parse(xml).getroot().iter('testcase'):
            outcome = next((c.tag for c in case if c.tag in ('failure', 'error', 'skipped')), 'passed')
            props = {p.get('name'): float(p.get('value')) for p in case.iter('property')}
            tests.append(dict(name=case.get('name'), outcome=outcome, seconds=float(case.get('time') or 0), **props))
    count = {k: sum(t['outcome'] == k for t in tests) for k in ('passed', 'failure', 'error', 'skipped')}

    def most(key, fn=max):
        values = [t[key] for t in tests if key in t]
        return fn(values) if values else None
    result = dict(ok=rc == 0 and count['passed'] > 0 and count['failure'] + count['error'] == 0,
                  seconds=seconds, command=shlex.join(cmd), device=device, dtype=equiv_dtype,
                  passed=count['passed'], failed=count['failure'] + count['error'], skipped=count['skipped'],
                  max_logit_diff=most('max_logit_diff'), max_greedy_gap=most('greedy_gap'),
                  min_tokens_equal=most('tokens_equal', min), pinned_near_ties=most('pinned_near_ties', sum),
                  tolerance=1e-4 if equiv_dtype == 'float32' else 0.25, tests=tests)
    if not result['ok']:
        result['error'] = failure('equivalence', rc) if rc != 0 else 'no test passed'
    return result


# -----------------------------------------------------------------------------
# stage 2: training the 250m config (or a toy model) on the stdlib's bytes


def prepare_cmd(root):
    return [PY, 'prepare.py', '--tokenizer=byte', f'--out_root={root}', '--name=stdlib'] + (
        [] if gpu else ['--max_files=40'])


def train_cmd(work):
    iters = train_iters if gpu else min(train_iters, 10)
    cmd = [PY, 'train.py', CONFIG, f"--data_dir={os.path.join(work, 'data')}", '--dataset=stdlib',
           f"--out_dir={os.path.join(work, 'train')}", f'--max_iters={iters}', f'--eval_interval={max(1, iters // 3)}',
           f'--warmup_iters={max(1, iters // 10)}', f'--lr_decay_iters={iters}']
    if gpu:
        return cmd + ['--eval_iters=5', '--log_interval=5', f'--gradient_accumulation_steps={train_accumulation}']
    return cmd + ['--eval_iters=2', '--log_interval=1', '--device=cpu', '--compile=False', '--n_embd=32',
                  '--n_head=2', '--structure=TT(T(T)T)T', '--block_size=64', '--batch_size=4',
                  '--gradient_accumulation_steps=1', '--learning_rate=3e-3', '--min_lr=3e-4']  # the config, toy-sized


def make_data(root, timeout, stage='train'):
    """data/stdlib of the stdlib's bytes (prepare.py), for the train stage in the 250m config's vocabulary on a
    GPU; random tokens if prepare.py fails. Returns a line saying what the data is."""
    rc, _ = run(prepare_cmd(root), stage, timeout)
    meta_path = os.path.join(root, 'stdlib', 'meta.json')
    if rc == 0 and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        what = f"the Python stdlib's bytes ({meta['train_tokens']:,} train tokens)"
    else:  # no stdlib source on this machine, or too little of it: random tokens still measure speed
        os.makedirs(os.path.dirname(meta_path), exist_ok=True)
        rng = np.random.default_rng(0)
        n = 4_000_000 if gpu else 40_000
        for split, count in (('train', n), ('val', n // 20)):
            rng.integers(0, 256, count, dtype=np.uint16).tofile(os.path.join(root, 'stdlib', f'{split}.bin'))
        meta = dict(tokenizer='byte', vocab_size=256, dtype='uint16', train_tokens=n, val_tokens=n // 20)
        what = f"random bytes ({n:,} train tokens; prepare.py failed, see the log)"
    if gpu and stage == 'train':  # the config's GPT-2 vocabulary: its embedding, head, FLOPs and MFU (256 ids used)
        meta.update(vocab_size=GPT2_VOCAB, note='gpu_check.py: byte tokens in the GPT-2 vocabulary size')
        what += f", vocab {GPT2_VOCAB} as the config's (only 256 ids occur)"
    with open(meta_path, 'w') as f:
        json.dump(meta, f)
    return what


ITER = re.compile(r"^iter (\d+): loss (\S+), lr (\S+), (\d+)ms, ([\d,]+) tok/s(?:, mfu ([\d.]+)%)?")


def train(timeout, work):
    t0 = time.time()
    data_root, out_dir = os.path.join(work, 'data'), os.path.join(work, 'train')
    data = make_data(data_root, min(timeout, 120))
    iters = train_iters if gpu else min(train_iters, 10)
    cmd = train_cmd(work)
    rc, _ = run(cmd, 'train', timeout - (time.time() - t0))
    text = open(log_path('train'), errors='replace').read()
    curve, first_iter_ms, printed_mfu = [], None, None
    for line in text.splitlines():
        m = ITER.match(line)
        if m:
            curve.append([int(m.group(1)), float(m.group(2))])
            if m.group(1) == '0':
                first_iter_ms = int(m.group(4))
            printed_mfu = float(m.group(6)) / 100 if m.group(6) else printed_mfu
    params = re.search(r"^([\d.]+)M parameters, vocab (\d+)", text, re.M)
    per_iter = re.search(r"^tokens per iteration: ([\d,]+)", text, re.M)
    evals = []
    if os.path.exists(os.path.join(out_dir, 'log.jsonl')):
        evals = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl')) if line.strip()]
    # steady state: from the second eval (the first iterations, compilation among them, come before it) to the last
    tokens_per_s = mfu = None
    steady = [e for e in evals if e['iter'] > 0]
    if len(steady) >= 2 and steady[-1]['time_s'] > steady[0]['time_s']:
        dt = steady[-1]['time_s'] - steady[0]['time_s']
        tokens_per_s = (steady[-1]['tokens'] - steady[0]['tokens']) / dt
        peak = gpu_peak_flops() if gpu else None
        mfu = peak and (steady[-1]['flops'] - steady[0]['flops']) / dt / peak
    finite = bool(curve) and all(math.isfinite(loss) for _, loss in curve)
    result = dict(ok=rc == 0 and finite and len(curve) == len(range(0, iters, 5 if gpu else 1)) and len(evals) >= 2,
                  seconds=time.time() - t0, command=shlex.join(cmd), data=data, config=CONFIG, iters=iters,
                  params_m=params and float(params.group(1)), vocab_size=params and int(params.group(2)),
                  tokens_per_iter=per_iter and int(per_iter.group(1).replace(',', '')),
                  first_iter_s=first_iter_ms and first_iter_ms / 1000, steady_iters=steady and
                  [steady[0]['iter'], steady[-1]['iter']], tokens_per_s=tokens_per_s, mfu=mfu,
                  train_py_mfu=printed_mfu, loss_curve=curve, finite=finite,
                  evals=[{k: e.get(k) for k in ('iter', 'train_loss', 'val_loss', 'val_loss_train_selection', 'kept',
                                                 'time_s')} for e in evals],
                  loss_decreased=len(evals) >= 2 and evals[-1]['val_loss'] < evals[0]['val_loss'])
    if not result['ok']:
        result['error'] = failure('train', rc) if rc != 0 else 'non-finite loss or missing iterations/evals'
    return result


# -----------------------------------------------------------------------------
# the duel: SUBLLM against the LLaMA with the same training FLOPs, for quality (docs/quality.md asks it at scale)
DUEL = {'subllm': 'config/duel_subllm_50m.py', 'llama': 'config/duel_llama_50m.py'}


def duel_cmd(work, arm):
    cmd = [PY, 'train.py', DUEL[arm], f"--data_dir={os.path.join(work, 'duel-data')}", '--dataset=stdlib',
           f"--out_dir={os.path.join(work, 'duel-' + arm)}"]
    if gpu:
        return cmd
    return cmd + ['--device=cpu', '--compile=False', '--n_embd=32', '--n_head=2', '--block_size=64', '--batch_size=4',
                  '--max_iters=10', '--eval_interval=5', '--eval_iters=2', '--log_interval=5', '--warmup_iters=2',
                  '--learning_rate=3e-3', '--min_lr=3e-4']  # the pair's configs, toy-sized (the CPU test)


def duel(timeout, work):
    """Train both arms, one after the other, each in half the time left; compare them at the last eval both reached
    (a run cut short by the budget still counts, at equal iterations, tokens and so about equal FLOPs)."""
    t0 = time.time()
    data = make_data(os.path.join(work, 'duel-data'), min(timeout, 120), 'duel')
    arms, rcs = {}, {}
    for i, arm in enumerate(DUEL):
        left = timeout - (time.time() - t0)
        rcs[arm], _ = run(duel_cmd(work, arm), 'duel', left / (2 - i))
        log = os.path.join(work, 'duel-' + arm, 'log.jsonl')
        arms[arm] = [json.loads(line) for line in open(log) if line.strip()] if os.path.exists(log) else []
    common = sorted(set(e['iter'] for e in arms['subllm']) & set(e['iter'] for e in arms['llama']))
    at = common[-1] if common else None
    last = {arm: next((e for e in evals if e['iter'] == at), None) for arm, evals in arms.items()}
    result = dict(ok=all(rc == 0 for rc in rcs.values()) and bool(at), seconds=time.time() - t0, data=data,
                  command=' ; '.join(shlex.join(duel_cmd(work, arm)) for arm in DUEL), configs=DUEL, iter=at)
    for arm, record in last.items():
        steady = [e for e in arms[arm] if e['iter'] > 0]
        result[arm] = record and dict(val_loss=record['val_loss'], flops=record['flops'], tokens=record['tokens'],
                                      kept=record.get('kept'), evals=[[e['iter'], e['val_loss']] for e in arms[arm]],
                                      tokens_per_s=len(steady) > 1 and (steady[-1]['tokens'] - steady[0]['tokens'])
                                      / max(1e-9, steady[-1]['time_s'] - steady[0]['time_s']) or None)
    if at:
        result['gap'] = last['subllm']['val_loss'] - last['llama']['val_loss']  # > 0: SUBLLM behind
        result['flop_ratio'] = last['subllm']['flops'] / last['llama']['flops']
    if not result['ok']:
        failed = [arm for arm, rc in rcs.items() if rc != 0]
        result['error'] = failure('duel', rcs[failed[0]]) if failed else 'no eval that both arms reached'
    return result


# -----------------------------------------------------------------------------
# FSDP on one GPU: train.py --fsdp=True under torchrun (NCCL, mixed precision by policy, compiled blocks), its sharded
# checkpoints and a resume from them


FSDP_EVALS = [0, 10, 20, 25] if gpu else [0, 2, 4, 6]  # trained to the third eval, resumed to the fourth


def fsdp_cmds(work):
    """torchrun with one process on the GPU; at CPU size train.py alone, which makes its own world of one."""
    cmd = [PY, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1'] if gpu else [PY]
    cmd += ['train.py', '--fsdp=True', f"--data_dir={os.path.join(work, 'fsdp-data')}", '--dataset=stdlib',
            f"--out_dir={os.path.join(work, 'fsdp')}", '--structure=TT(TT(TT)TT)TT', f'--eval_interval={FSDP_EVALS[1]}',
            '--eval_iters=2', '--log_interval=5', '--warmup_iters=2', '--gradient_accumulation_steps=2']
    size = ['--n_embd=256', '--n_head=4', '--block_size=1024', '--batch_size=8'] if gpu else [
        '--n_embd=32', '--n_head=2', '--block_size=64', '--batch_size=4', '--device=cpu']
    return [cmd + size + [f'--max_iters={FSDP_EVALS[2]}', f'--compile={gpu}'],
            cmd + size + [f'--max_iters={FSDP_EVALS[3]}', '--compile=False', '--init_from=resume']]


def fsdp(timeout, work):
    t0 = time.time()
    data = make_data(os.path.join(work, 'fsdp-data'), min(timeout, 120), 'fsdp')
    rcs = []
    for cmd in fsdp_cmds(work):
        rc, _ = run(cmd, 'fsdp', timeout - (time.time() - t0))
        rcs.append(rc)
        if rc != 0:
            break
    text = open(log_path('fsdp'), errors='replace').read()
    state = re.search(r"^per-rank model \+ optimizer state: ([\d.]+) MB", text, re.M)
    log = os.path.join(work, 'fsdp', 'log.jsonl')
    evals = [json.loads(line) for line in open(log) if line.strip()] if os.path.exists(log) else []
    finite = bool(evals) and all(math.isfinite(e['val_loss']) for e in evals)
    result = dict(ok=rcs == [0, 0] and finite and [e['iter'] for e in evals] == FSDP_EVALS
                  and os.path.exists(os.path.join(work, 'fsdp', 'ckpt.dcp', 'run.pt')),
                  seconds=time.time() - t0, command=' ; '.join(shlex.join(cmd) for cmd in fsdp_cmds(work)), data=data,
                  state_mb=state and float(state.group(1)), evals=[[e['iter'], e['val_loss']] for e in evals])
    if not result['ok']:
        failed = [rc for rc in rcs if rc != 0]
        result['error'] = failure('fsdp', failed[0]) if failed else 'missing or non-finite evals, or no ckpt.dcp/'
    return result


# -----------------------------------------------------------------------------
# stage 3: bench.py, SUBLLM against its LLaMA twin


def bench_cmds(work):
    """The sweep; on a GPU then the compiled training step of both 1300m models at 4k (the paper's headline point:
    train.py compiles; one graph per step, model.py), whose compilation bench.py keeps out of the timing."""
    if not gpu:  # the tiny preset made tinier (test_bench.py's sizes)
        return [[PY, 'bench.py', '--preset=tiny', '--device=cpu', f'--seq_lens={bench_seq_lens or "32,64"}',
                 '--n_embd=32', '--n_head=2', '--ffn_hidden=64', '--vocab_size=256', '--structure=TT(T(T)T)T',
                 '--tokens_per_batch=512', '--decode_batch=2', '--decode_tokens=4', '--warmup=0', '--iters=1',
                 f"--json={os.path.join(work, 'bench.json')}"]]
    return [[PY, 'bench.py', '--preset=1300m', f'--seq_lens={bench_seq_lens or "2048"}', '--decode_batch=8',
             '--decode_batch_large=64', f'--compile={bench_compile}', '--warmup=2', f'--iters={bench_iters}',
             f"--json={os.path.join(work, 'bench.json')}"],
            [PY, 'bench.py', '--preset=1300m', '--seq_lens=4096', '--modes=train', '--compile=True', '--warmup=2',
             f'--iters={bench_iters}', f"--json={os.path.join(work, 'bench_compiled.json')}"],
            [PY, 'bench.py', '--preset=1300m', '--seq_lens=2048', '--modes=decode', '--decode_batch=8',
             '--decode_batch_large=64', '--compile=True', '--warmup=2', f'--iters={bench_iters}',
             f"--json={os.path.join(work, 'bench_decode_compiled.json')}"]]


def bench(timeout, work):
    deadline_here, rows, records, runs, rc = time.time() + timeout, [], [], [], 0
    for cmd in bench_cmds(work):
        path = cmd[-1].removeprefix('--json=')
        rc, seconds = run(cmd, 'bench', deadline_here - time.time())
        data = json.load(open(path)) if rc == 0 and os.path.exists(path) else {}
        runs.append(dict(command=shlex.join(cmd), seconds=seconds, preset=data.get('preset'),
                         dtype=data.get('dtype'), compile=data.get('compile'), n_params=data.get('n_params')))
        records += data.get('records', [])
        for llama, sub in zip(data.get('records', [])[::2], data.get('records', [])[1::2]):  # LLaMA, then SUBLLM
            rows.append(dict(mode=sub['mode'], seq_len=sub['seq_len'], batch=sub['batch_size'],
                             compile=data['compile'], llama_tokens_per_s=llama['tokens_per_s'],
                             subllm_tokens_per_s=sub['tokens_per_s'], speedup=sub['ratio'],
                             flop_ratio=sub['flop_ratio'], blocks_ratio=sub['blocks_ratio'],
                             llama_mem_bytes=llama['peak_mem_bytes'], subllm_mem_bytes=sub['peak_mem_bytes'],
                             mem_ratio=sub['mem_ratio'], llama_mfu=llama['mfu'], subllm_mfu=sub['mfu'],
                             keep=sub['keep_fractions'], oom=llama['oom'] or sub['oom'],
                             # decoding: an eager step's aten ops and host reads, and the KV caches' bytes
                             **{f"{name}_{key}": r.get(key) for name, r in (('llama', llama), ('subllm', sub))
                                for key in ('ops_per_step', 'reads_per_step', 'cache_bytes')},
                             # graphs compiled in the warmup (more than one: a recompile) and graph breaks
                             graphs=[r.get('graphs') for r in (llama, sub)],
                             graph_breaks=[r.get('graph_breaks') for r in (llama, sub)]))
        if rc != 0:
            break
    first = runs[0]
    result = dict(ok=rc == 0 and bool(rows) and not any(r['oom'] for r in rows),
                  seconds=sum(r['seconds'] for r in runs), command=first['command'], preset=first['preset'],
                  dtype=first['dtype'], compile=first['compile'], n_params=first['n_params'], runs=runs, rows=rows,
                  records=records)
    if not result['ok']:
        result['error'] = failure('bench', rc) if rc != 0 else 'out of memory at ' + ', '.join(
            f"{r['mode']} T={r['seq_len']} B={r['batch']}" for r in rows if r['oom'])
    return result


# -----------------------------------------------------------------------------
# the run, the summary, the JSON

RUNS = {'equivalence': equivalence, 'bench': bench, 'train': train, 'duel': duel, 'fsdp': fsdp}


def fmt(value, spec, missing='-'):
    return missing if value is None else format(value, spec)


def summary(report):
    print(f"\ngpu_check.py ({report['size']}): {report['device_name']}, torch {report['torch']}, "
          f"{report['seconds']:.0f} s of {budget_s} s, {'all passed' if report['ok'] else 'FAILED'}")
    s = report['stages']
    for name, r in s.items():
        line = f"  {name:<12} {'ok    ' if r['ok'] else 'FAILED'} {r['seconds']:5.0f} s  "
        if 'command' not in r:  # gpu_check.py itself failed in this stage: only the error
            pass
        elif name == 'equivalence':
            line += (f"{r['passed']} passed, {r['failed']} failed on {r['device']} {r['dtype']}; max |logit diff| "
                     f"{fmt(r['max_logit_diff'], '.3g')} (tolerance {r['tolerance']:g}), greedy gap "
                     f"{fmt(r['max_greedy_gap'], '.3g')}, {fmt(r['pinned_near_ties'], '.0f')} near-tie scores pinned")
        elif name == 'train':
            line += (f"{r['iters']} iters, {fmt(r['params_m'], '.1f')}M params, {fmt(r['tokens_per_iter'], ',')} "
                     f"tokens/iter; ")
            if r['evals']:
                line += f"val loss {r['evals'][0]['val_loss']:.3f} -> {r['evals'][-1]['val_loss']:.3f}; "
            line += (f"{fmt(r['tokens_per_s'], ',.0f')} tok/s, MFU {fmt(r['mfu'], '.1%')} (iters "
                     f"{'-'.join(map(str, r['steady_iters'] or ['-']))}); first iter {fmt(r['first_iter_s'], '.1f')} s")
        elif name == 'duel':
            line += ' ; '.join(f"{arm} val loss {r[arm]['val_loss']:.4f} ({r[arm]['flops'] / 1e12:.3g} TFLOPs, "
                               f"{fmt(r[arm]['tokens_per_s'], ',.0f')} tok/s)" for arm in DUEL if r.get(arm))
            line += f"; at iter {r['iter']}, gap {fmt(r.get('gap'), '+.4f')} (SUBLLM - LLaMA)"
        elif name == 'fsdp':
            line += ("val loss (iter) " + ' -> '.join(f"{loss:.3f} ({i})" for i, loss in r['evals'])
                     + f", resumed from ckpt.dcp/ at {FSDP_EVALS[2]}; {fmt(r['state_mb'], '.1f')} MB of state per "
                     f"rank")
        else:
            line += (f"{r['preset']}, {r['dtype']}, compile {r['compile']}: {len(r['rows'])} measurements")
        print(line)
        if not r['ok']:
            print('    ' + r.get('error', '').replace('\n', '\n    '))
    if s.get('train', {}).get('loss_curve'):
        curve = s['train']['loss_curve']
        step = max(1, len(curve) // 10)
        print("\ntrain loss (iter: loss): " + ', '.join(f"{i}: {loss:.3f}" for i, loss in curve[::step] + (
            [curve[-1]] if (len(curve) - 1) % step else [])))
    if s.get('bench', {}).get('rows'):
        unit, scale = ('GiB', 2 ** 30) if gpu else ('MiB', 2 ** 20)
        print(f"\n| mode | seq_len | batch | LLaMA tok/s | SUBLLM tok/s | speedup | FLOP ratio | blocks ratio | "
              f"mem {unit} LLaMA / SUBLLM | MFU LLaMA / SUBLLM |")
        print('|' + '---|' * 10)
        for r in s['bench']['rows']:
            mem = ' / '.join(fmt(b and b / scale, '.2f', 'OOM' if r['oom'] else '-')
                             for b in (r['llama_mem_bytes'], r['subllm_mem_bytes']))
            mode = r['mode'] + (f" (compiled: graphs {r['graphs'][0]} / {r['graphs'][1]}, breaks "
                                f"{r['graph_breaks'][0]} / {r['graph_breaks'][1]})" if r['compile'] else '')
            print(f"| {mode} | {r['seq_len']} | {r['batch']} | {fmt(r['llama_tokens_per_s'], ',.0f')} | "
                  f"{fmt(r['subllm_tokens_per_s'], ',.0f')} | {fmt(r['speedup'], '.2f')}x | "
                  f"{fmt(r['flop_ratio'], '.2f')}x | {fmt(r['blocks_ratio'], '.2f', '')} | {mem} | "
                  f"{fmt(r['llama_mfu'], '.1%')} / {fmt(r['subllm_mfu'], '.1%')} |")
        decodes = [r for r in s['bench']['rows'] if r['mode'] == 'decode' and r['subllm_ops_per_step']]
        if decodes:
            print(f"\n| decode | seq_len | batch | aten ops/step LLaMA / SUBLLM | host reads/step | KV cache {unit} "
                  f"LLaMA / SUBLLM |")
            print('|' + '---|' * 6)
        for r in decodes:
            print(f"| {'compiled' if r['compile'] else 'eager'} | {r['seq_len']} | {r['batch']} | "
                  f"{r['llama_ops_per_step']:.0f} / {r['subllm_ops_per_step']:.0f} | "
                  f"{r['llama_reads_per_step']:.2f} / {r['subllm_reads_per_step']:.2f} | "
                  f"{r['llama_cache_bytes'] / scale:.2f} / {r['subllm_cache_bytes'] / scale:.2f} |")


def git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=HERE, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main():
    if dry_run:  # what each stage would run (test_gpu_check.py checks that the scripts accept the GPU's flags)
        work = os.path.abspath(work_dir) if work_dir else '<work_dir>'
        commands = dict(equivalence=[equivalence_cmd(work)], train=[prepare_cmd(os.path.join(work, 'data')),
                                                                    train_cmd(work)], bench=bench_cmds(work),
                        duel=[prepare_cmd(os.path.join(work, 'duel-data'))] + [duel_cmd(work, arm) for arm in DUEL],
                        fsdp=[prepare_cmd(os.path.join(work, 'fsdp-data'))] + fsdp_cmds(work))
        print(json.dumps(dict(env=dict(equivalence=EQUIV_ENV),
                              commands={k: v for k, v in commands.items() if k in chosen}), indent=1))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for stage in chosen:
        if os.path.exists(log_path(stage)):
            os.remove(log_path(stage))
    work = os.path.abspath(work_dir) if work_dir else tempfile.mkdtemp(prefix='gpu_check_')
    os.makedirs(work, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the stage, write the JSON
    report = dict(tool='gpu_check.py', command=shlex.join([os.path.basename(PY), *sys.argv]),
                  date=datetime.now(timezone.utc).isoformat(timespec='seconds'), size=size, device=device,
                  device_name=torch.cuda.get_device_name() if gpu else platform.processor() or 'CPU',
                  peak_flops=gpu_peak_flops() if gpu else None, torch=torch.__version__, cuda=torch.version.cuda,
                  python=platform.python_version(), commit=git_commit(), budget_s=budget_s, stages={})
    print(f"gpu_check.py ({size}): {report['device_name']}, torch {torch.__version__}; stages {', '.join(chosen)}; "
          f"logs {out_stem}.<stage>.log", flush=True)
    try:
        for i, stage in enumerate(chosen):
            later = sum(min_s[s] for s in chosen[i + 1:])
            timeout = deadline - time.time() - later
            print(f"{stage}: running (at most {max(0, timeout):.0f} s)", flush=True)
            try:
                result = RUNS[stage](timeout, work)
            except Exception as e:  # a bug here, or output it cannot read: the stage fails, the next one runs
                result = dict(ok=False, seconds=0.0, error=f"gpu_check.py: {type(e).__name__}: {e}")
            report['stages'][stage] = result
            print(f"{stage}: {'ok' if result['ok'] else 'FAILED'} in {result['seconds']:.0f} s", flush=True)
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
        report.update(seconds=time.time() - t_start,
                      ok=len(report['stages']) == len(chosen) and all(r['ok'] for r in report['stages'].values()))
        with open(out, 'w') as f:
            json.dump(report, f, indent=1)
    summary(report)
    print(f"\nwrote {out}")
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())

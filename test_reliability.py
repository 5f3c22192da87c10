"""
Issue #19: every bad input gets one clear line, and nothing is ever lost.

test_bad_input is a table, one row per bad input: the issue's cases (T1-T7, S1, P1-P2, B1-B4) each run as the
command a user types, in a subprocess in its own directory (these rows run in parallel, in one fixture: most of each
is importing torch); their siblings (other settings out of range, other damaged files, the lock, --overwrite) run in
this process with runpy, which shows the same thing faster. A row asserts the exit status (1, or 0 where the input
is handled: a fallback, a skipped line, --help), no traceback, the one line on stderr and what it says, and that no
file changed (the hashes of every file in the row's directory before and after), or, for a run that goes on, what
it kept. The data-loss cases have tests of their own too: T8 (a second run while the first is alive), the refusal
under DDP, and S2 (one prefill per sample, the decode timed by itself).
"""
import hashlib
import json
import os
import re
import resource
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
BASE = None  # the shared data and trained run (the base fixture makes them)
TINY_CPU = str(HERE / 'config' / 'tiny_cpu.py')
# a tiny model on the rows' own token files (data/tiny: random bytes, vocab 256)
TINY = ['--n_embd=32', '--n_head=2', '--block_size=32', '--batch_size=2', '--eval_iters=1', '--device=cpu',
        '--compile=False', '--gradient_accumulation_steps=1', '--data_dir=data', '--dataset=tiny',
        '--structure=T(T)T', '--log_interval=1', '--warmup_iters=0']


def env1():
    return dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(HERE))


def hashes(root, but=()):
    """{relative path: sha256} of every file under root, the data symlink and the names in `but` aside."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and name not in but:
                out[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def log_iters(path):
    return [json.loads(line)['iter'] for line in open(path)]


def ckpt_iter(path):
    return torch.load(path, map_location='cpu')['iter_num']


def dead_pid():
    p = subprocess.Popen([sys.executable, '-c', ''])
    p.wait()
    return p.pid  # reused by another process within the test: very unlikely


# -----------------------------------------------------------------------------
# the rows' setups: each gets the row's directory (the cwd of its command), which holds data -> the shared tiny data

def trained(d):
    """out/: a tiny run of 4 iters, an eval at each: ckpt.pt (iter 4), ckpt_prev.pt (iter 3), log.jsonl (0-4)."""
    shutil.copytree(BASE / 'trained', d / 'out')


def damaged(how, prev=False):
    """trained(), then ckpt.pt cut to half, garbage, empty or foreign (a torch file of something else); without
    ckpt_prev.pt unless prev."""
    def setup(d):
        trained(d)
        ckpt = d / 'out' / 'ckpt.pt'
        if how == 'foreign':
            torch.save({'weights': torch.zeros(3)}, ckpt)
        else:
            data = ckpt.read_bytes()
            ckpt.write_bytes({'half': data[:len(data) // 2], 'garbage': b'garbage\n' * 600, 'empty': b''}[how])
        if not prev:
            (d / 'out' / 'ckpt_prev.pt').unlink()
    return setup


def bad_log_line(d):
    trained(d)
    log = d / 'out' / 'log.jsonl'
    lines = log.read_text().splitlines(keepends=True)
    lines[2] = '{"iter": 7\n'  # line 3: cut short, as a crash while writing leaves it
    log.write_text(''.join(lines))


def lock(pid_of):
    def setup(d):
        trained(d)
        (d / 'out' / 'train.lock').write_text(f"{pid_of()} {socket.gethostname()}\n")
    return setup


def with_files(**contents):
    def setup(d):
        for name, content in contents.items():
            path = d / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def bad_meta(d):
    (d / 'bad' / 'tiny').mkdir(parents=True)
    for f in ('train.bin', 'val.bin'):
        os.symlink(BASE / 'data' / 'tiny' / f, d / 'bad' / 'tiny' / f)
    (d / 'bad' / 'tiny' / 'meta.json').write_text('{"tokenizer": "byte", "vocab')


HIGH_BYTES = bytes(range(0x80, 0x100)) * 200  # 51 kB of bytes 0x80-0xFF: not UTF-8


def prepared(d):
    """d/data_out/bad/: what `prepare.py --input=bad.txt --tokenizer=byte --out_root=data_out` wrote."""
    (d / 'bad.txt').write_bytes(b'old text\n' * 2000)
    subprocess.run([sys.executable, str(HERE / 'prepare.py'), '--input=bad.txt', '--tokenizer=byte',
                    '--out_root=data_out'], cwd=d, env=env1(), capture_output=True, check=True)
    (d / 'bad.txt').write_bytes(b'new text\n' * 20000)  # larger than the file size limit of the row


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # as a full disk: writes past it fail (EFBIG)


# -----------------------------------------------------------------------------
# checks of what a row that goes on (exit 0) kept

def fell_back(d, r):
    out = d / 'out'
    assert '(iter 3)' in r.stdout  # the line that says so
    assert log_iters(out / 'log.jsonl') == [0, 1, 2, 3, 4, 5]  # the evals after iter 3 redone, once each
    assert ckpt_iter(out / 'ckpt.pt') == 5 and ckpt_iter(out / 'ckpt_prev.pt') == 4


def kept_valid_lines(d, r):
    before = (BASE / 'trained' / 'log.jsonl').read_text().splitlines(keepends=True)
    after = (d / 'out' / 'log.jsonl').read_text().splitlines(keepends=True)
    assert after[:4] == before[:2] + before[3:5]  # every valid line up to the checkpoint (iter 4), unchanged
    assert [json.loads(line)['iter'] for line in after] == [0, 1, 3, 4, 5]


def resumed_past_stale_lock(d, r):
    assert log_iters(d / 'out' / 'log.jsonl') == [0, 1, 2, 3, 4, 5]
    assert not (d / 'out' / 'train.lock').exists()  # released at the end


def overwritten(d, r):
    out = d / 'out'
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'log.jsonl']  # the old run's ckpt_prev.pt went too
    assert log_iters(out / 'log.jsonl') == [0, 2] and ckpt_iter(out / 'ckpt.pt') == 2


def exact_bytes(d, r):
    out = d / 'prepared' / 'bad'
    meta = json.loads((out / 'meta.json').read_text())
    tokens = np.concatenate([np.fromfile(out / f'{s}.bin', dtype=meta['dtype']) for s in ('train', 'val')])
    assert bytes(tokens[:-1].astype(np.uint8)) == HIGH_BYTES and tokens[-1] == 0  # the bytes, then the eot byte


def sampled_from_prev(d, r):
    assert 'using out/ckpt_prev.pt instead' in r.stdout and r.stdout.count('---------------') == 1


def lists(names):
    """A --help check: each of these settings is listed with its default and a description."""
    def check(d, r):
        for name in names:
            assert re.search(rf"^  --{name}=\S+ +\w", r.stdout, re.M), name
    return check


def lists_every_prepare_setting(d, r):
    import inspect
    import prepare
    for key, p in inspect.signature(prepare.prepare).parameters.items():
        assert re.search(rf"^  --{key}={re.escape(repr(p.default))} +\w", r.stdout, re.M), key


def table_printed(d, r):
    assert '| out |' in r.stdout


# -----------------------------------------------------------------------------
# the table


@dataclass
class Case:
    id: str
    argv: list             # the script (train, sample, bench, prepare, plot), then its arguments
    expect: str            # a regex that the message (stderr; with rc 0, stdout + stderr) must match
    rc: int = 1
    setup: Callable = None
    check: Callable = None  # rc 0: what the run kept; None: every file stays as it was
    preexec: Callable = None
    skip: str = ''
    files_same: bool = field(default=None)
    own_process: bool = True  # False: run in this process with runpy (fast: torch is imported already)

    def __post_init__(self):
        if self.files_same is None:
            self.files_same = self.check is None


def Sibling(*args, **kwargs):
    """A row that runs in this process. What it checks is the same: a SystemExit with a message is what Python
    prints on stderr, as one line, and exits 1 with; any other exception fails the row."""
    return Case(*args, own_process=False, **kwargs)


CUDA = torch.cuda.is_available()
CASES = [
    # --- the cases ---
    Case('T1', ['train', TINY_CPU, '--data_dir=data', '--eval_interval=0'],
         r"^--eval_interval must be at least 1 \(iterations between evals\), got 0$"),
    Case('T2', ['train', TINY_CPU, '--data_dir=data', '--batch_size=0'], r"^--batch_size must be at least 1, got 0$"),
    Case('T3', ['train', TINY_CPU, '--data_dir=data', '--block_size=0'], r"^--block_size must be at least 1, got 0$"),
    Case('T4', ['train', TINY_CPU, '--data_dir=data', '--device=cuda'],
         r"^--device=cuda, but this torch \(.*\) sees no CUDA GPU: use --device=cpu", skip='a GPU is here' * CUDA),
    Case('T5', ['train', TINY_CPU, '--data_dir=data', '--max_iters=-3'], r"^--max_iters must be at least 0, got -3$"),
    Case('T6-half', ['train', *TINY, '--init_from=resume', '--out_dir=out', '--max_iters=5'],
         r"^out/ckpt.pt cannot be read \(RuntimeError: PytorchStreamReader failed.*\), and there is no ckpt_prev.pt "
         r"beside it: damaged \(a crash or a full disk while it was written or copied\?\)$", setup=damaged('half')),
    Case('T6-garbage', ['train', *TINY, '--init_from=resume', '--out_dir=out', '--max_iters=5'],
         r"^out/ckpt.pt cannot be read \(UnpicklingError: .*\), and there is no ckpt_prev.pt", setup=damaged('garbage')),
    Case('T6-empty', ['train', *TINY, '--init_from=resume', '--out_dir=out', '--max_iters=5'],
         r"^out/ckpt.pt cannot be read \(an empty file\), and there is no ckpt_prev.pt", setup=damaged('empty')),
    Case('T6-fallback', ['train', *TINY, '--init_from=resume', '--out_dir=out', '--max_iters=5', '--eval_interval=1'],
         r"out/ckpt.pt cannot be read \(RuntimeError: .*\): using out/ckpt_prev.pt instead, the checkpoint before it",
         rc=0, setup=damaged('half', prev=True), check=fell_back),
    Case('T7', ['train', *TINY, '--init_from=resume', '--out_dir=out', '--max_iters=5', '--eval_interval=1'],
         r"out/log.jsonl: skipped 1 line\(s\) that are not JSON records \(line 3\); kept the 4 record\(s\) up to "
         r"iter 4", rc=0, setup=bad_log_line, check=kept_valid_lines),
    Case('S1', ['sample', '--out_dir=out', '--device=cpu', '--start=' + 'x' * 200, '--max_new_tokens=10'],
         r"^the prompt \(200 tokens\) \+ --max_new_tokens=10 = 210 tokens is longer than the model's block_size=32: "
         r"shorten the prompt or lower --max_new_tokens$", setup=trained),
    Case('P1', ['prepare', '--input=bad.txt', '--tokenizer=byte', '--out_root=prepared'],
         r"wrote prepared/bad/ .*tokenizer byte", rc=0,
         setup=with_files(**{'bad.txt': HIGH_BYTES}), check=exact_bytes),
    Case('P2-not-a-folder', ['prepare', '--input=bad.txt', '--tokenizer=byte', '--out_root=a_file/data'],
         r"^cannot write to a_file/data/bad/ \(Not a directory\): give a writable --out_root$",
         setup=with_files(**{'bad.txt': 'text\n' * 100, 'a_file': ''})),
    Case('P2-full-disk', ['prepare', '--input=bad.txt', '--tokenizer=byte', '--out_root=data_out'],
         r"^cannot write to data_out/bad/ \(File too large\): free some disk space, or give another --out_root, and "
         r"run the same command again$", setup=prepared, preexec=limit_file_size),
    Case('B1', ['bench', '--help'], r"settings \(--key=default", rc=0,
         check=lists(['iters', 'seq_lens', 'init_from', 'json'])),
    Case('B2-zero', ['bench', '--device=cpu', '--iters=0'], r"^bench.py: --iters must be at least 1, got 0$"),
    Sibling('B2-negative', ['bench', '--device=cpu', '--iters=-1'], r"^bench.py: --iters must be at least 1, got -1$"),
    Case('B3', ['bench', '--device=cpu', '--seq_lens=abc'],
         r"^bench.py: --seq_lens must be context lengths of at least 2, separated by commas \(e.g. 256,512\), "
         r"got 'abc'$"),
    Case('B4', ['bench', '--device=cpu', '--init_from=out-nope'],
         r"^bench.py: --init_from=out-nope: no checkpoint at out-nope/ckpt.pt \(give a train.py out_dir\)$"),
    # --- siblings (in this process, but T-lock-live: the lock's pid must be another live process) ---
    # train.py settings
    Sibling('T-seed', ['train', *TINY, '--seed=-1'], r"^--seed must be between 0 and 2147483647, got -1$"),
    Sibling('T-beta2', ['train', *TINY, '--beta2=1.0'], r"^--beta2 must be in \[0, 1\), got 1.0$"),
    Sibling('T-n_head', ['train', *TINY, '--n_head=0'], r"^--n_head must be at least 1, got 0$"),
    Sibling('T-device', ['train', *TINY, '--device=gpu'], r"^--device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'$"),
    Sibling('T-init_from', ['train', *TINY, '--init_from=restart'],
         r"^--init_from must be one of scratch, resume, grow, hf, got 'restart'$"),
    Sibling('T-out_dir-empty', ['train', *TINY, '--out_dir='], r"^--out_dir is empty"),
    # --- siblings: files train.py reads and writes ---
    Sibling('T-config-missing', ['train', 'config/nope.py'], r"^config file 'config/nope.py' not found"),
    Sibling('T-config-broken', ['train', 'broken.py'], r"^config file 'broken.py' fails: SyntaxError",
         setup=with_files(**{'broken.py': 'batch_size = (\n'})),
    Sibling('T-meta', ['train', *TINY, '--data_dir=bad'],
         r"^bad/tiny/meta.json cannot be read \(.*\): run prepare.py again", setup=bad_meta),
    Sibling('T-resume-nothing', ['train', *TINY, '--init_from=resume', '--out_dir=nothing'],
         r"^init_from=resume, but there is no checkpoint at nothing/ckpt.pt$"),
    Sibling('T-resume-foreign', ['train', *TINY, '--init_from=resume', '--out_dir=out'],
         r"^out/ckpt.pt is not a checkpoint of train.py \(it has no model, optimizer, .*\), and there is no "
         r"ckpt_prev.pt beside it$",
         setup=damaged('foreign')),
    Sibling('T-grow-damaged', ['train', *TINY, '--init_from=grow', '--grow_from=out', '--out_dir=grown'],
         r"^out/ckpt.pt cannot be read \(UnpicklingError", setup=damaged('garbage')),
    Sibling('T-out_dir-file', ['train', *TINY, '--out_dir=a_file', '--max_iters=1'],
         r"^cannot write to a_file/ \(File exists\): give a writable --out_dir$", setup=with_files(a_file='')),
    # --- siblings: nothing lost ---
    Sibling('T-scratch-on-a-checkpoint', ['train', *TINY, '--out_dir=out', '--max_iters=2'],
         r"^out/ holds ckpt.pt, ckpt_prev.pt and log.jsonl of an earlier run: --init_from=resume continues it, "
         r"--overwrite=True deletes them and starts afresh, or give another --out_dir$", setup=trained),
    Sibling('T-overwrite', ['train', *TINY, '--out_dir=out', '--max_iters=2', '--eval_interval=2', '--overwrite=True'],
         r"saving checkpoint to out/ckpt.pt", rc=0, setup=trained, check=overwritten),
    Case('T-lock-live', ['train', *TINY, '--init_from=resume', '--out_dir=out', '--max_iters=5'],
         rf"^out/ is in use by another training run \(pid {os.getpid()}, lock file out/train.lock\): wait for it",
         setup=lock(os.getpid)),  # pytest's own pid: a live process
    Sibling('T-lock-stale', ['train', *TINY, '--init_from=resume', '--out_dir=out', '--max_iters=5', '--eval_interval=1'],
         r"saving checkpoint", rc=0, setup=lock(dead_pid), check=resumed_past_stale_lock),
    # --- siblings: sample.py ---
    Sibling('S-top_k', ['sample', '--out_dir=out', '--top_k=-1'],
         r"^--top_k must be at least 0 \(0: sample among all tokens\), got -1$"),
    Sibling('S-device', ['sample', '--out_dir=out', '--device=gpu'], r"^--device must be auto, cpu, cuda, cuda:N or mps"),
    Sibling('S-damaged', ['sample', '--out_dir=out', '--device=cpu'],
         r"^out/ckpt.pt cannot be read \(UnpicklingError.*\), and there is no ckpt_prev.pt", setup=damaged('garbage')),
    Sibling('S-fallback', ['sample', '--out_dir=out', '--device=cpu', '--num_samples=1', '--max_new_tokens=4'],
         r"out/ckpt.pt cannot be read \(an empty file\): using out/ckpt_prev.pt instead", rc=0,
         setup=damaged('empty', prev=True), check=sampled_from_prev, files_same=True),
    # --- siblings: bench.py ---
    Sibling('B-n_head', ['bench', '--device=cpu', '--n_head=3'],
         r"^bench.py: bad model settings: n_embd=128 must be divisible by n_head=3$"),
    Sibling('B-json', ['bench', '--device=cpu', '--json=nowhere/b.json'], r"^bench.py: --json=nowhere/b.json: there is no "
                                                                      r"directory .*nowhere to write it in$"),
    Sibling('B-init-damaged', ['bench', '--device=cpu', '--init_from=out'],
         r"^out/ckpt.pt cannot be read \(an empty file\), and there is no ckpt_prev.pt", setup=damaged('empty')),
    # --- siblings: prepare.py ---
    Sibling('P-help', ['prepare', '--help'], r"settings \(--key=default", rc=0,
         check=lists_every_prepare_setting),
    Sibling('P-max_files', ['prepare', '--max_files=-1'], r"^--max_files must be at least 0 \(0: all\), got -1$"),
    Sibling('P-bad-argument', ['prepare', 'input=notes.txt'], r"^bad argument 'input=notes.txt': use --key=value"),
    Sibling('P-meta', ['prepare', '--input=docs.jsonl', '--tokenizer=byte', '--out_root=d', '--val_tokens=10'],
         r"^d/docs/meta.json cannot be read \(.*\): delete it to start over$",
         setup=with_files(**{'docs.jsonl': '{"text": "a document"}\n' * 50, 'd/docs/meta.json': '{"train_shards'})),
    # --- siblings: plot.py ---
    Sibling('L-missing', ['plot', 'nope'], r"^error: nope/log.jsonl not found"),
    Sibling('L-empty', ['plot', 'out'], r"^error: out/log.jsonl has no records", setup=with_files(**{'out/log.jsonl': '\n'})),
    Sibling('L-malformed', ['plot', 'out'], r"out/log.jsonl: skipped 1 line\(s\) that are not records of train.py "
                                         r"\(line 3\)", rc=0, setup=bad_log_line, check=table_printed,
         files_same=True),
    Sibling('L-png', ['plot', 'out', '--png'], r"^usage: python plot.py", setup=trained),
    Sibling('L-gap', ['plot', '--gap=trend.csv'],
            r"\| a \| 2\.7 \| 2\.05 \| 2 \| \+0\.020 ± 0\.014 \| \+0\.030, \+0\.010 \|\n"
            r"\| a \| 8\.7 \| 2\.05 \| 1 \| -0\.050 \| -0\.050 \|\n"
            r"\| b \| 2\.7 \| 2\.05 \| 1 \| \+0\.100 \|",
            rc=0, setup=with_files(**{'trend.csv': 'recipe,params_m,tokens_m,seed,subllm,llama\n'
                                                   'a,2.7,2.05,1,1.53,1.50\na,8.7,2.05,1,1.40,1.45\n'
                                                   'a,2.7,2.05,2,1.51,1.50\nb,2.7,2.05,1,1.6,1.5\n'})),
    Sibling('L-gap-bad', ['plot', '--gap=trend.csv'], r"^error: trend.csv: every row needs numbers in params_m",
         setup=with_files(**{'trend.csv': 'params_m,tokens_m,seed\n2.7,2.05,1\n'})),
]


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    """The rows' shared data (data/tiny) and a trained tiny run (trained/), made once."""
    global BASE
    BASE = tmp_path_factory.mktemp('base')
    rng = np.random.default_rng(0)
    d = BASE / 'data' / 'tiny'
    d.mkdir(parents=True)
    rng.integers(0, 256, 4000).astype(np.uint16).tofile(d / 'train.bin')
    rng.integers(0, 256, 600).astype(np.uint16).tofile(d / 'val.bin')
    (d / 'meta.json').write_text(json.dumps(dict(tokenizer='byte', vocab_size=256, dtype='uint16')))
    r = subprocess.run([sys.executable, str(HERE / 'train.py'), *TINY, '--out_dir=trained', '--max_iters=4',
                        '--eval_interval=1'], cwd=BASE, env=env1(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return BASE


def prepare_case(case, root):
    d = root / case.id
    d.mkdir()
    os.symlink(BASE / 'data', d / 'data')
    if case.setup:
        case.setup(d)
    return d, hashes(d)


def run_case(case, root):
    d, before = prepare_case(case, root)
    script = str(HERE / f'{case.argv[0]}.py')
    r = subprocess.run([sys.executable, script, *case.argv[1:]], cwd=d, env=env1(), capture_output=True, text=True,
                       timeout=180, preexec_fn=case.preexec)
    return d, before, r


def run_in_process(case, root, monkeypatch, capsys):
    d, before = prepare_case(case, root)
    monkeypatch.chdir(d)
    monkeypatch.setattr(sys, 'argv', [f'{case.argv[0]}.py', *case.argv[1:]])
    capsys.readouterr()
    rc, message = 0, ''
    try:
        runpy.run_path(str(HERE / f'{case.argv[0]}.py'), run_name='__main__')
    except SystemExit as e:  # what the interpreter does with it: a message goes to stderr, with exit status 1
        rc, message = (1, e.code + '\n') if isinstance(e.code, str) else (e.code or 0, '')
    out = capsys.readouterr()
    return d, before, subprocess.CompletedProcess(sys.argv, rc, out.out, out.err + message)


@pytest.fixture(scope='module')
def results(base, tmp_path_factory, request):
    """Every selected row, run in parallel: {id: (its directory, file hashes before, CompletedProcess)}."""
    wanted = {item.callspec.params['case'].id for item in request.session.items
              if getattr(item, 'originalname', '') == 'test_bad_input'}
    root = tmp_path_factory.mktemp('rows')
    todo = [c for c in CASES if c.id in wanted and not c.skip and c.own_process]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        done = pool.map(lambda c: run_case(c, root), todo)
        return {c.id: result for c, result in zip(todo, done)}


def message_lines(stderr):
    """stderr's lines, without tqdm's progress bars."""
    return [s for s in re.split(r'[\r\n]', stderr) if s.strip() and not re.search(r'\d+%\|', s)]


@pytest.mark.parametrize('case', CASES, ids=[c.id for c in CASES])
def test_bad_input(case, results, tmp_path, monkeypatch, capsys):
    if case.skip:
        pytest.skip(case.skip)
    d, before, r = results[case.id] if case.own_process else run_in_process(case, tmp_path, monkeypatch, capsys)
    lines = message_lines(r.stderr)
    assert r.returncode == case.rc, (r.stdout[-2000:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr + r.stdout, r.stderr[-3000:]
    assert len(lines) <= (1 if case.rc else 2), lines  # the one line (rc 0: at most a warning or two)
    text = lines[-1] if case.rc else r.stdout + r.stderr
    assert re.search(case.expect, text, re.M), (case.expect, text[-2000:])
    if case.files_same:
        assert hashes(d) == before  # nothing lost, nothing changed, no temp file left
    if case.check:
        case.check(d, r)


# -----------------------------------------------------------------------------
# T8: a second run on a live run's out_dir


def as_from_a_terminal():
    """In a child before it starts: Ctrl-C as a terminal delivers it, whatever this pytest process (or a library
    in it) ignores or blocks; a child inherits both, and then never sees the SIGINT that a test sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_T8_a_second_run_is_refused_while_the_first_is_alive_and_the_first_loses_nothing(base, tmp_path):
    out = tmp_path / 'out-g'
    os.symlink(BASE / 'data', tmp_path / 'data')
    # the first run evals (and logs) at iter 0 only, then trains on: its files stay as they are while it runs
    first = subprocess.Popen([sys.executable, str(HERE / 'train.py'), *TINY, f'--out_dir={out}', '--seed=1',
                              '--max_iters=1000000', '--eval_interval=1000000'], cwd=tmp_path, env=env1(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=as_from_a_terminal)
    try:
        deadline = time.time() + 120
        while not ((out / 'train.lock').exists() and (out / 'log.jsonl').exists()
                   and (out / 'log.jsonl').read_text().endswith('\n')):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else 'slow'
            time.sleep(0.2)
        assert (out / 'train.lock').read_text().split()[0] == str(first.pid)
        snapshot = hashes(out, but=['train.lock'])
        for extra in ([], ['--overwrite=True']):  # the command with --seed=2; with overwrite (T-lock-live: a resume)
            second = subprocess.run([sys.executable, str(HERE / 'train.py'), *TINY, f'--out_dir={out}', '--seed=2',
                                     '--max_iters=20', *extra], cwd=tmp_path, env=env1(), capture_output=True,
                                    text=True, timeout=120)
            assert second.returncode == 1 and 'Traceback' not in second.stderr
            assert message_lines(second.stderr) == [second.stderr.strip()]
            assert f"is in use by another training run (pid {first.pid}," in second.stderr
            assert hashes(out, but=['train.lock']) == snapshot and first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C
        first.wait(timeout=60)
    assert not (out / 'train.lock').exists()  # released on Ctrl-C too
    assert log_iters(out / 'log.jsonl') == [0] and hashes(out) == snapshot  # the first run's log, intact


def test_ddp_every_rank_leaves_on_a_refusal(base, tmp_path):
    """Rank 0 alone takes the lock; when it is refused, every rank exits 1 and the line is printed once."""
    os.symlink(BASE / 'data', tmp_path / 'data')
    lock(os.getpid)(tmp_path)
    snapshot = hashes(tmp_path / 'out')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(HERE / 'train.py'), *TINY, '--out_dir=out', '--init_from=resume', '--max_iters=6',
           '--gradient_accumulation_steps=2']
    p = subprocess.run(cmd, cwd=tmp_path, env=env1(), capture_output=True, text=True, timeout=180)
    assert p.returncode != 0
    assert p.stderr.count(f"out/ is in use by another training run (pid {os.getpid()},") == 1, p.stderr[-3000:]
    ranks = p.stderr.split('torch/distributed/elastic')[0]  # the ranks' own output: torchrun's report follows
    assert 'Traceback' not in ranks and 'terminate called' not in p.stderr
    assert hashes(tmp_path / 'out') == snapshot


# -----------------------------------------------------------------------------
# S2: one prefill per sample, and the decode timed by itself


def test_S2_one_prefill_per_sample_and_the_decode_time_does_not_include_it(base, monkeypatch, capsys):
    from generate import Decoder
    original, prefills, clock = Decoder.__call__, [], [1000.0]

    def timed_chunk(self, idx, targets=None):  # on the test's clock, a prefill takes 5 s and a decode step 0.25 s
        if idx.size(1) > 1:
            prefills.append(idx.size(1))
        clock[0] += 5.0 if idx.size(1) > 1 else 0.25
        return original(self, idx, targets)
    monkeypatch.setattr(Decoder, '__call__', timed_chunk)
    monkeypatch.setattr(time, 'perf_counter', lambda: clock[0])  # sample.py's clock: the wall does not matter
    monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={BASE / "trained"}', '--device=cpu', '--start=abc',
                                      '--num_samples=2', '--max_new_tokens=10'])
    runpy.run_path(str(HERE / 'sample.py'), run_name='__main__')
    out = capsys.readouterr().out
    assert prefills == [3, 3]  # once per sample (each was run twice before, once alone to time it)
    # 2 samples x 9 decode steps (the 10th token is sampled, never fed back) x 0.25 s; the prefills' 2 x 5 s apart
    assert "decode: 18 tokens in 4.500 s, 4.0 tokens/s (with the KV cache; the prefill of the 3-token prompt and " \
           "the first new token took 10.000 s in all, not counted)" in out, out


def test_S3_compiled_decode_steps_that_compile_a_graph_are_not_counted_as_decoding(base, monkeypatch, capsys):
    """sample.py --compile=True: a step that compiles a graph takes seconds (minutes with inductor on a CPU); the
    decode speed leaves those steps out and says how many there were and how long they took."""
    import generate
    from generate import Decoder
    original, clock, steps = Decoder.__call__, [1000.0], [0]
    counters = torch._dynamo.utils.counters['stats']

    def timed_chunk(self, idx, targets=None):  # the first sample's first 2 steps compile a graph: 30 s each
        if idx.size(1) == 1:
            steps[0] += 1
            counters['unique_graphs'] += steps[0] <= 2
        clock[0] += 5.0 if idx.size(1) > 1 else 30.0 if steps[0] <= 2 else 0.25
        return original(self, idx, targets)
    monkeypatch.setattr(Decoder, '__call__', timed_chunk)
    monkeypatch.setattr(generate, 'compiled_segment', lambda device_type, backend='inductor': generate.segment)
    monkeypatch.setattr(time, 'perf_counter', lambda: clock[0])
    monkeypatch.setattr(sys, 'argv', ['sample.py', f'--out_dir={BASE / "trained"}', '--device=cpu', '--start=abc',
                                      '--num_samples=2', '--max_new_tokens=10', '--compile=True'])
    runpy.run_path(str(HERE / 'sample.py'), run_name='__main__')
    assert "decode: 16 tokens in 4.000 s, 4.0 tokens/s (with the KV cache, compiled; the prefill of the 3-token " \
           "prompt and the first new token took 10.000 s in all, not counted; the 2 steps that compiled graphs took " \
           "60.000 s, not counted)" in capsys.readouterr().out

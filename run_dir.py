"""
A training run's out_dir: what train.py keeps there, and how it keeps it safe.

    out_dir/train.lock    the pid and host of the run that uses it: one run per out_dir
    out_dir/ckpt.pt       everything to resume or to sample; written to a temp file, then renamed (never half a file)
    out_dir/ckpt_prev.pt  the checkpoint before it: a resume from a damaged ckpt.pt falls back to it
    out_dir/ckpt.dcp/     instead of ckpt.pt with --fsdp=True: a sharded checkpoint (torch.distributed.checkpoint),
                          a file of shards per rank and run.pt (the rest); written to a temp directory, then renamed;
                          any number of processes resumes it (resharded), and load_checkpoint() consolidates it
    out_dir/ckpt_prev.dcp/
    out_dir/log.jsonl     one JSON record per eval

train.py calls it in the order a run happens (the torchtitan way: the training loop never sees a file):

    run = RunDir(out_dir)
    refusal = run.claim(resume, overwrite)  # the lock; a new run in another run's out_dir is refused
    checkpoint, path = run.load(keys, config)  # --init_from=resume: ckpt.pt, or ckpt_prev.pt when ckpt.pt is damaged
    problem = run.start_log(iter_num)      # a resumed run keeps its log up to its checkpoint; a new run starts afresh
                                           # (and with wandb_init, the wandb run starts)
    run.catch_preemption()                 # SIGTERM, SIGUSR1: run.preempted, and the loop saves and leaves
    problem = run.log(record)              # at each eval, and then
    problem = run.save(state, model, optimizer, master)   # every rank
    run.release()                          # the lock (atexit does it too: on an error or Ctrl-C)

A problem is one line (or None): train.py passes it to every DDP rank, and they stop together. sample.py, bench.py and
eval.py read checkpoints with load_checkpoint() and model_from(), plot.py reads logs with read_log().

A record of log.jsonl: iter, tokens (seen by all processes), time_s (seconds of training since the run began, evals
and checkpoint saving excluded, continued across resumes), flops (the training FLOPs spent so far: 3x the forward
FLOPs of each step, each block counted with the tokens it sees, as flops.forward_flops does), lr, train_loss and
val_loss (eval mode: a level keeps the tokens whose score is > 0, as in inference), and for SUBLLM, per level where
it is a list: val_loss_train_selection (the same val batches with the training-time selection: top-k, or
threshold in its fixed capacity), kept (the fraction of its parent's tokens a level kept on those val batches in eval
mode; kept_train: the same on the train batches of the eval, a larger and more varied sample than a small val
split), agree (the fraction of tokens on which the training-time selection picks as `score > 0` does, on those val
batches) and dropped (in the training steps since the last eval, the fraction of a level's tokens with a positive
score that the training selection skipped: below the top-k cut, or past the capacity). With --est=True also stage
and flops_dense (what dense training spends).
"""
import atexit
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import time
import warnings

import numpy as np
import torch

from configurator import first_line
from model import SubLLM, SubLLMConfig
from tokenizer import get_tokenizer


CHECKPOINTS = ('ckpt.pt', 'ckpt_prev.pt', 'ckpt.dcp', 'ckpt_prev.dcp')  # what a run keeps in out_dir


def remove(path):
    """Delete a file, or a directory (a sharded checkpoint), if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def replace(src, dst):
    """os.replace for a checkpoint file or directory: a rename cannot replace a directory that holds files, so a
    directory dst is deleted first (meanwhile the other checkpoint, ckpt or ckpt_prev, is there to resume from)."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(src, dst)


def shown(numbers, limit=5):
    """'3, 7, 9' or, past limit, the first ones and '...': a list in a one-line message."""
    return ', '.join(map(str, numbers[:limit])) + (' ...' if len(numbers) > limit else '')


# -----------------------------------------------------------------------------
# reading checkpoints and logs (train.py, sample.py, bench.py, eval.py, plot.py)

def load_checkpoint(out_dir, keys=('model', 'model_args'), missing=None, say=print, weights=True):
    """out_dir/ckpt.pt, loaded on the CPU (loading onto the GPU can run out of memory), as a dict that has these
    keys. train.py keeps the checkpoint before it as ckpt_prev.pt: when ckpt.pt is missing or damaged (a crash or a
    full disk while it was copied, an empty or foreign file), load_checkpoint says so in one line (through say) and
    loads ckpt_prev.pt. A run with --fsdp=True saves ckpt.dcp/ and ckpt_prev.dcp/ instead: read_sharded() makes the
    same dict of them, its model weights consolidated (weights=False: None, for train.py to load into its shards).
    Returns (checkpoint, path); when none loads, a one-line SystemExit: `missing` when there is no checkpoint at all
    (default: "no checkpoint at out_dir/ckpt.pt")."""
    problems = []
    for name in ('ckpt.pt', 'ckpt.dcp', 'ckpt_prev.pt', 'ckpt_prev.dcp'):
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):
            continue
        try:
            checkpoint = read_sharded(path, weights) if name.endswith('.dcp') else torch.load(path, map_location='cpu')
        except Exception as e:
            why = 'an empty file' if os.path.isfile(path) and os.path.getsize(path) == 0 else \
                f"{type(e).__name__}: {first_line(e).split('. ')[0][:120]}"
            problems.append(f"{path} cannot be read ({why})")
            continue
        lacks = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
        if lacks:
            problems.append(f"{path} is not a checkpoint of train.py (it has no {', '.join(lacks)})")
            continue
        if '_prev' in name:
            first = problems[0] if problems else f"no {os.path.join(out_dir, name.replace('_prev', ''))}"
            say(f"{first}: using {path} instead, the checkpoint before it (iter {checkpoint.get('iter_num')})")
        return checkpoint, path
    if not problems:
        raise SystemExit(missing or f"no checkpoint at {os.path.join(out_dir, 'ckpt.pt')}")
    latest = 'ckpt.dcp' if any('.dcp' in p for p in problems) else 'ckpt.pt'
    if not any(os.path.exists(os.path.join(out_dir, n)) for n in ('ckpt.pt', 'ckpt.dcp')):
        problems.insert(0, f"no {os.path.join(out_dir, latest)}")
    damaged = any('cannot be read' in p for p in problems)
    raise SystemExit('; '.join(problems) + (f", and there is no {latest.replace('ckpt', 'ckpt_prev')} beside it"
                                            if len(problems) == 1 else '')
                     + (': damaged (a crash or a full disk while it was written or copied?)' if damaged else ''))


def model_from(checkpoint, path):
    """The SubLLM of a checkpoint (its model_args and weights), on the CPU; one line when it does not fit this
    model.py. Checkpoints of a compiled model (older ones) carry an '_orig_mod.' prefix: it goes. Weights None (a
    sharded checkpoint read with weights=False): the model as built, for restore() to load into its shards."""
    try:
        model = SubLLM(SubLLMConfig(**checkpoint['model_args']))
        if checkpoint['model'] is not None:
            model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in checkpoint['model'].items()})
    except (TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise SystemExit(f"{path} does not fit this model.py: {' '.join(str(e).split())[:300]}") from None
    return model


def read_sharded(path, weights=True):
    """A sharded checkpoint (ckpt.dcp/ of a run with --fsdp=True) as the dict that ckpt.pt holds: run.pt, the model
    weights consolidated from every rank's file in this process (no process group, no GPU: sample.py, eval.py,
    bench.py, diagnose.py, grow.py read it as ckpt.pt) or None (weights=False), and 'optimizer' None (load_sharded
    reads it into a sharded optimizer). An exception when a file is missing or shorter than .metadata says."""
    import torch.distributed.checkpoint as dcp
    metadata = dcp.FileSystemReader(path).read_metadata()
    for info in metadata.storage_data.values():  # every rank's file, whole: not cut short by a crash or a full disk
        if os.path.getsize(os.path.join(path, info.relative_path)) < info.offset + info.length:
            raise ValueError(f"{info.relative_path} is cut short")
    checkpoint = dict(torch.load(os.path.join(path, 'run.pt'), map_location='cpu'), model=None, optimizer=None)
    if weights:  # each tensor in full, as .metadata describes it, filled from the shards of every rank
        model = {k.removeprefix('model.'): torch.empty(m.size, dtype=m.properties.dtype)
                 for k, m in metadata.state_dict_metadata.items() if k.startswith('model.')}
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": as meant, one process reads all
            warnings.simplefilter('ignore')
            dcp.load({'model': model}, checkpoint_id=path, no_dist=True)
        checkpoint['model'] = model
    return checkpoint


def failure(e):
    """DCP's CheckpointException (a BaseException, which holds every rank's exception) as a RuntimeError that says
    the first rank's reason in one line."""
    exception = next(iter(e.failures.values()))[0] if e.failures else e
    return RuntimeError(f"{type(exception).__name__}: {first_line(exception)}")


def save_sharded(path, model, optimizer):
    """Every rank writes its shards of the model and of AdamW's state into the directory path (a collective). The
    unsharded buffers (score_offset) are rank 0's, as ckpt.pt holds them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.save({'model': model_state, 'optimizer': optimizer_state}, checkpoint_id=path,
                 planner=dcp.DefaultSavePlanner(dedup_save_to_lowest_rank=True))
    except dcp.CheckpointException as e:  # a full disk on some rank: every rank learns it
        raise failure(e) from None


def load_sharded(path, model, optimizer):
    """The weights and AdamW's state of a sharded checkpoint into this run's shards (a collective): each rank
    reads the rows it holds now, at any number of processes (resharded)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {'model': model_state, 'optimizer': optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except dcp.CheckpointException as e:  # a checkpoint of another model
        raise failure(e) from None
    set_state_dict(model, optimizer, model_state_dict=state['model'], optim_state_dict=state['optimizer'])


def load_trained(out_dir):
    """A trained model to use (sample.py, eval.py): (model, tokenizer, checkpoint, path) from out_dir/ckpt.pt (or
    ckpt_prev.pt), the model on the CPU, the tokenizer of its data (the checkpoint's meta.json); one line when either
    is missing or does not fit."""
    checkpoint, path = load_checkpoint(out_dir, ('model', 'model_args', 'meta'), missing=(
        f"no checkpoint at {os.path.join(out_dir, 'ckpt.pt')}: train a model first (python train.py config/tiny_cpu.py "
        f"writes out-tiny/ckpt.pt) or pass --out_dir=DIR of a run that saved one"))
    model = model_from(checkpoint, path)
    meta = checkpoint['meta'] if isinstance(checkpoint['meta'], dict) else {}
    tok = get_tokenizer(meta.get('tokenizer'))  # one line if gpt2 (or a Hugging Face tokenizer.json) cannot load
    if tok.meta.get('tokenizer_sha256') != meta.get('tokenizer_sha256'):
        raise SystemExit(f"{tok.name[3:]}/tokenizer.json is not the tokenizer this model's data was prepared with "
                         f"(its sha256 differs from the one in meta.json): put that file back")
    if tok.vocab_size > model.config.vocab_size:
        raise SystemExit(f"tokenizer {tok.name} has {tok.vocab_size} tokens, the model only {model.config.vocab_size}")
    return model, tok, checkpoint, path


def read_log(path, fields=(('iter', int),)):
    """The records of a log.jsonl: (records, lines, bad). A record is a line that holds a JSON object whose fields
    have these types; lines are the records' lines as written; bad holds the numbers of the other lines (cut short
    by a crash, a bad edit), for the caller to say."""
    records, lines, bad = [], [], []
    with open(path, encoding='utf-8', errors='replace') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and all(isinstance(record.get(k), t) for k, t in fields)
            except ValueError:
                ok = False
            if ok:
                records.append(record)
                lines.append(line.rstrip('\n') + '\n')
            else:
                bad.append(number)
    return records, lines, bad


# -----------------------------------------------------------------------------
# each process's own state in a checkpoint (its 'rng'): restoring it makes a resumed run repeat the uninterrupted one
# exactly, under DDP too

def eval_line(it, losses, levels, selection):
    """An eval's line: both losses, and for SUBLLM the val loss with training's selection and, per level, the
    fractions kept, agreeing and dropped, and kept on train text (train.py's estimate_loss)."""
    line = f"step {it}: train loss {losses['train_loss']:.4f}, val loss {losses['val_loss']:.4f}"
    if levels:
        line += f", val loss with {selection} selection {losses['val_loss_train_selection']:.4f}"
        for name in ('kept', 'agree', 'dropped', 'kept_train'):
            line += f", {name} " + ' '.join(f"d{level.depth} {v:.3f}" for level, v in zip(levels, losses[name]))
    return line


def rng_state(batches, cuda, levels=()):
    """This process's random states: torch's, CUDA's (if cuda), numpy's, Python's, and batches (the generator that
    picks its training crops); and its levels' score offsets: a running statistic that each DDP rank keeps for
    itself (the model's state_dict holds rank 0's)."""
    np_state = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if cuda else None,
            'numpy': (np_state[0], np_state[1].tolist(), *np_state[2:]),  # plain lists: loadable with weights_only
            'python': random.getstate(), 'batches': batches.get_state(),
            'score_offsets': [level.score_offset.cpu() for level in levels]}


def set_rng_state(state, batches, cuda, levels=()):
    for level, offset in zip(levels, state.get('score_offsets', [])):  # older checkpoints have none
        level.score_offset.copy_(offset)
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and cuda:
        torch.cuda.set_rng_state(state['cuda'])
    np.random.set_state((state['numpy'][0], np.array(state['numpy'][1], dtype=np.uint32), *state['numpy'][2:]))
    random.setstate(state['python'])
    batches.set_state(state['batches'])


def restore(checkpoint, path, model, optimizer, scaler, rank, world_size, batches, cuda, levels, seed, say=print):
    """Put the run back where the checkpoint (read from path) left it: the optimizer and the loss scaler (a sharded
    checkpoint: the weights too, into model's shards, at any number of processes), this process's random states and
    score offsets (saved by another number of processes: new seeds, away from those of any fresh start, and rank 0's
    score offsets: not an exact continuation), and after a preemption the levels' selection counts since the last
    eval. Returns the iter whose eval the checkpoint holds (None after a preemption: it is still to run)."""
    try:
        if checkpoint['optimizer'] is None:  # sharded (ckpt.dcp/)
            load_sharded(path, model, optimizer)
        else:
            optimizer.load_state_dict(checkpoint['optimizer'])
        scaler.load_state_dict(checkpoint['scaler'])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        what = 'optimizer state' if checkpoint['optimizer'] is not None else 'optimizer state or weights'
        raise SystemExit(f"the {what} in {path} does not fit this model ({first_line(e)}): was it saved by another "
                         f"version of train.py?") from None
    if len(checkpoint['rng']) == world_size:
        set_rng_state(checkpoint['rng'][rank], batches, cuda, levels)
    else:
        batches.manual_seed(seed + rank + checkpoint['iter_num'] * world_size)
        torch.manual_seed(seed + rank + checkpoint['iter_num'] * world_size)
        say(f"the checkpoint has random states for {len(checkpoint['rng'])} processes, this run has {world_size}: the "
            f"weights and optimizer state are the checkpoint's; every rank starts from rank 0's running cuts and draws "
            f"new batches and dropout (reseeded): not an exact continuation")
    for level, stats in zip(levels, checkpoint.get('level_stats', [])):
        level.stats.copy_(stats)
    return None if 'preempted' in checkpoint else checkpoint['iter_num']


# -----------------------------------------------------------------------------
# the run's own out_dir: lock, checkpoints, log

class RunDir:
    """The out_dir of a training run. Only rank 0 of a DDP run claims it, saves and logs; every rank loads (and under
    FSDP every rank saves its shards)."""

    def __init__(self, out_dir, wandb_init=None, sharded=False):
        """wandb_init: wandb.init's arguments, to send log()'s records to Weights & Biases too (None: not). sharded:
        the checkpoints are ckpt.dcp/ (--fsdp=True), not ckpt.pt."""
        if not out_dir:
            raise SystemExit("--out_dir is empty: give the directory for the checkpoint and log, e.g. --out_dir=out")
        if wandb_init and importlib.util.find_spec('wandb') is None:  # optional: checked now, imported when it starts
            raise SystemExit("--wandb_log=True needs wandb, which is not installed: pip install wandb (or "
                             "--wandb_log=False)")
        self.wandb_init, self.wandb = wandb_init, None  # and the wandb run, once start_log has started it
        self.out_dir = out_dir
        self.sharded, ext = sharded, '.dcp' if sharded else '.pt'
        self.ckpt_path, self.prev_path = os.path.join(out_dir, 'ckpt' + ext), os.path.join(out_dir, 'ckpt_prev' + ext)
        self.log_path, self.lock_path = os.path.join(out_dir, 'log.jsonl'), os.path.join(out_dir, 'train.lock')
        self.lock_text = f"{os.getpid()} {socket.gethostname()}\n"
        self.keep_prev = True  # the next save moves ckpt.pt to ckpt_prev.pt; not when ckpt.pt is the damaged file
        self.preempted = None  # the name of the signal that asked the run to stop (catch_preemption), and when
        self.preempted_at = 0.0
        self.handlers = {}     # the signal handlers that catch_preemption replaced: release() puts them back

    # one run at a time: the lock holds the pid and host of the run from claim() until it exits. A second run on the
    # same out_dir is refused, naming the first; so is a new run (scratch, grow) in an out_dir that holds another
    # run's checkpoint or log, unless overwrite.

    def lock_holder(self):
        """The text of the lock file ('pid host'), and whether that process is alive: True when it cannot be told
        (another host; Windows, where os.kill(pid, 0) would end the process; a lock written a moment ago)."""
        try:
            with open(self.lock_path) as f:
                text = f.read()
            age = time.time() - os.path.getmtime(self.lock_path)
        except FileNotFoundError:
            return None, False
        pid, _, host = text.strip().partition(' ')
        if not pid.isdigit():
            return text, age < 10  # being written (the pid follows the creation at once), or garbage
        if host != socket.gethostname() or os.name == 'nt':
            return text, True
        if int(pid) == os.getpid():  # an earlier run in this same process (tests run train.py in-process), now over
            return text, False
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            return text, False
        except OSError:  # PermissionError: it exists, as another user's process
            pass
        return text, True

    def take_lock(self):
        """Create the lock file, or take a stale one over. Returns None, or why not (one line)."""
        for _ in range(5):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                text, alive = self.lock_holder()
                if alive:
                    pid, _, host = (text or '').strip().partition(' ')
                    return (f"{self.out_dir}/ is in use by another training run (pid {pid or '?'}"
                            f"{'' if host == socket.gethostname() else ' on ' + host}, lock file {self.lock_path}): "
                            f"wait for it to end or stop it, or give another --out_dir (if no such run exists, "
                            f"delete {self.lock_path})")
                aside = f"{self.lock_path}.{os.getpid()}"  # a stale lock: take it away atomically, then check it is
                try:                                      # the one just read (another run may have replaced it)
                    os.replace(self.lock_path, aside)
                except FileNotFoundError:
                    continue
                with open(aside) as f:
                    if f.read() == text:
                        os.remove(aside)
                    else:
                        os.replace(aside, self.lock_path)
                continue
            with os.fdopen(fd, 'w') as f:
                f.write(self.lock_text)
            atexit.register(self.release)  # also on SystemExit, an exception or Ctrl-C
            return None
        return f"cannot take the lock {self.lock_path}: another run keeps taking it; try again"

    def claim(self, resume, overwrite):
        """Make out_dir and take its lock. Returns None, or the one-line reason why this run must not use out_dir."""
        try:
            os.makedirs(self.out_dir, exist_ok=True)
            refusal = self.take_lock()
        except OSError as e:
            return f"cannot write to {self.out_dir}/ ({e.strerror or first_line(e)}): give a writable --out_dir"
        if refusal:
            return refusal
        remove(self.ckpt_path + '.tmp')  # what a crash left of a save (before any rank of this run writes there)
        if resume:
            return None
        found = [f for f in (*CHECKPOINTS, 'log.jsonl')
                 if os.path.exists(os.path.join(self.out_dir, f)) and os.path.getsize(os.path.join(self.out_dir, f))]
        if found and not overwrite:
            self.release()
            found = ', '.join(found[:-1]) + ' and ' * (len(found) > 1) + found[-1]
            return (f"{self.out_dir}/ holds {found} of an earlier run: --init_from=resume continues it, "
                    f"--overwrite=True deletes them and starts afresh, or give another --out_dir")
        return None

    def release(self):
        """Free the lock, if it is this run's, put back the signal handlers that catch_preemption replaced, and
        finish the wandb run."""
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        for signum, handler in self.handlers.items():
            signal.signal(signum, handler)
        self.handlers = {}
        try:
            with open(self.lock_path) as f:
                if f.read() == self.lock_text:
                    os.remove(self.lock_path)
        except OSError:
            pass

    def catch_preemption(self):
        """From now on SIGTERM (a scheduler's preemption or time limit, Kubernetes, torchrun passing its own on) and
        SIGUSR1 (SLURM's warning ahead of time: sbatch --signal=USR1@120) set self.preempted: train.py finishes the
        iteration, saves a checkpoint and exits 0. More signals within 2 seconds are the same preemption (SLURM
        signals every process of a job, and torchrun passes its SIGTERM on to the ranks); a later one ends the run
        at once, as the signal would without this handler."""
        def handler(signum, frame):
            if self.preempted is None:
                self.preempted, self.preempted_at = signal.Signals(signum).name, time.monotonic()
            elif time.monotonic() - self.preempted_at > 2:
                self.release()  # the lock, and the handlers before these: the default one ends the process
                os.kill(os.getpid(), signum)
        for signum in (signal.SIGTERM, getattr(signal, 'SIGUSR1', None)):  # Windows has no SIGUSR1
            if signum is not None:
                self.handlers[signum] = signal.signal(signum, handler)

    # checkpoints

    def load(self, keys, config, say=print):
        """ckpt.pt to resume from (ckpt_prev.pt when ckpt.pt is damaged): (checkpoint, path); sharded, ckpt.dcp/
        without its weights (restore loads them into the shards). The settings of this run (config) that differ from
        the checkpoint's are said."""
        checkpoint, path = load_checkpoint(self.out_dir, keys, say=say, weights=not self.sharded,
                                           missing=f"init_from=resume, but there is no checkpoint at {self.ckpt_path}")
        if path.endswith('.dcp') != self.sharded:
            raise SystemExit(f"{path} is a sharded checkpoint (--fsdp=True): resume it with --fsdp=True, at any number "
                             f"of processes" if not self.sharded else f"{path} was saved without --fsdp: resume "
                             f"it without --fsdp=True (or start a new run with it)")
        self.keep_prev = path == self.ckpt_path  # resumed past a damaged ckpt: the next save replaces it
        changed = [f"{k}={config[k]!r} (was {v!r})" for k, v in checkpoint['config'].items()
                   if k not in ('init_from', 'overwrite') and config.get(k) != v]
        was = checkpoint['config'].get('seed')
        if config.get('est') and config.get('seed') != was:  # est.subnetwork_at draws each step's sub-network from it
            raise SystemExit(f"--seed={config.get('seed')} differs from the checkpoint's ({was}): an EST run draws its "
                             f"sub-networks from the seed, so a resume keeps it; drop --seed or give --seed={was}")
        if changed:
            say(f"resuming with settings that differ from the checkpoint's: {', '.join(changed)}")
        return checkpoint, path

    def save(self, state, model, optimizer, master=True):
        """Save the model, the optimizer and state (the rest: iter_num, config, every rank's random states, ...)
        atomically, a crash never leaves half a checkpoint where a resume reads: ckpt.pt, which rank 0 writes to a
        temp file and renames; or sharded, ckpt.dcp/, into whose temp directory every rank writes its shards and
        rank 0 adds run.pt (state), then renames it. The checkpoint before it becomes ckpt_prev. Every rank calls it.
        Returns None, or why the run must stop (a full disk)."""
        if master:
            print(f"saving checkpoint to {self.ckpt_path}")
        tmp = self.ckpt_path + '.tmp'
        try:
            if self.sharded:
                save_sharded(tmp, model, optimizer)
                if master:
                    torch.save(state, os.path.join(tmp, 'run.pt'))
            elif master:
                torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(), **state}, tmp)
            if master:
                if self.keep_prev and os.path.exists(self.ckpt_path):
                    replace(self.ckpt_path, self.prev_path)
                replace(tmp, self.ckpt_path)
                self.keep_prev = True
        except (OSError, RuntimeError) as e:  # a full disk: torch.save raises either
            if master:
                remove(tmp)
            return (f"cannot save {self.ckpt_path} at iter {state['iter_num']} ({first_line(e)}): stopping; the "
                    f"checkpoints before it are kept; free some disk space and continue with --init_from=resume")
        return None

    # the log: a resumed run keeps the records up to its checkpoint's iter (it redoes the evals after it); a line
    # that is not a record is skipped, and said. The kept lines go to a temp file that is then renamed over the log:
    # a crash meanwhile loses nothing.

    def start_log(self, resume_iter=None, say=print):
        """A resumed run (resume_iter: its checkpoint's iter) keeps the log's records up to it; a new run (claim let
        it in on an empty out_dir, or with overwrite) deletes the old checkpoints and starts an empty log.
        Returns None, or why the run cannot go on."""
        try:
            kept = []
            if resume_iter is not None and os.path.exists(self.log_path):
                records, lines, bad = read_log(self.log_path)
                kept = [line for record, line in zip(records, lines) if record['iter'] <= resume_iter]
                if bad:
                    say(f"{self.log_path}: skipped {len(bad)} line(s) that are not JSON records (line {shown(bad)}); "
                        f"kept the {len(kept)} record(s) up to iter {resume_iter}")
            elif resume_iter is None:
                for old in CHECKPOINTS:
                    remove(os.path.join(self.out_dir, old))
            with open(self.log_path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(self.log_path + '.tmp', self.log_path)
        except OSError as e:
            return f"cannot write {self.log_path} ({e.strerror or first_line(e)}): give a writable --out_dir"
        if self.wandb_init:
            try:
                import wandb
                self.wandb = wandb.init(**self.wandb_init)
            except Exception as e:  # wandb's own errors: not logged in, no network
                return (f"wandb.init failed ({type(e).__name__}: {first_line(e)}): run `wandb login`, set "
                        f"WANDB_MODE=offline, or give --wandb_log=False")
        return None

    def log(self, record):
        """Append one record to log.jsonl, and send it to wandb (a per-level list as name/0, name/1, ...: wandb
        plots numbers). Returns None, or why the run must stop (a full disk)."""
        try:
            with open(self.log_path, 'a') as f:
                f.write(json.dumps(record) + '\n')
            if self.wandb is not None:
                self.wandb.log({f'{k}/{i}' if isinstance(v, list) else k: x for k, v in record.items()
                                for i, x in enumerate(v if isinstance(v, list) else [v])}, step=record['iter'])
        except OSError as e:  # a full disk: stop, keeping what is there
            return (f"cannot write {self.log_path} at iter {record['iter']} ({e.strerror or first_line(e)}): "
                    f"stopping; free some disk space and continue with --init_from=resume")
        return None

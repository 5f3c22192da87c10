"""
train.py's processes under torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE; without torchrun a run is rank 0 of 1):
which one this is, the process group, how the model is spread over the ranks (DDP, or FSDP with --fsdp=True), and
how the ranks agree. Only rank 0 logs and decides; every rank evaluates (under FSDP every forward needs them all).
When the run must stop (a refused out_dir, a loss that is not finite, a full disk, a preemption signal), every rank
learns it at the same point, and they leave together: no rank tears the process group down while another can still
use it (gloo aborts a rank that does: "terminate called without an active exception").

DDP keeps a whole copy of the weights, gradients and AdamW moments on every rank: 16 bytes a parameter. FSDP2
(torch.distributed.fsdp.fully_shard, the torchtitan way) gives each rank 1/N of them: each block is one unit, whose
weights are gathered for its forward and backward and freed after, and whose gradients are reduce-scattered, so
that a rank holds its own shard of everything (docs/distributed.md has the memory per GPU).
"""
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


class Ranks:
    """This process among torchrun's: rank, local_rank, world_size, master (rank 0), and its device."""

    def __init__(self, device, device_type, fsdp=False, dtype='float32'):
        self.ddp = int(os.environ.get('RANK', -1)) != -1  # under torchrun (DDP, or FSDP with fsdp)
        names = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')
        self.rank, self.local_rank, self.world_size = (int(os.environ[k]) for k in names) if self.ddp else (0, 0, 1)
        self.master = self.rank == 0
        self.device, self.device_type, self.fsdp = device, device_type, fsdp
        self.group = False  # whether this process made the process group (wrap)
        self.flags = None  # the process group of any(): gloo, on the CPU (the default one on CPUs)
        self.mp_policy = None  # FSDP's mixed precision (in place of autocast)
        if fsdp:
            try:
                from torch.distributed.fsdp import MixedPrecisionPolicy  # FSDP2: torch 2.6 and newer
            except ImportError:
                raise SystemExit(f"--fsdp=True needs torch 2.6 or newer (torch.distributed.fsdp.fully_shard), this "
                                 f"is {torch.__version__}: upgrade torch, or train without --fsdp") from None
            if device_type not in ('cuda', 'cpu'):
                raise SystemExit(f"--fsdp=True runs on CUDA GPUs or on the CPU, not on {device_type}")
            if dtype == 'float16':
                raise SystemExit("--fsdp=True computes in bfloat16 or float32 (float16 would need a sharded loss "
                                 "scaler): give --dtype=bfloat16 (or float32), or train without --fsdp")
            # bf16 weights for compute, fp32 gradient reduction, fp32 master weights (the shards AdamW updates)
            self.mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if \
                dtype == 'bfloat16' else MixedPrecisionPolicy()
        if self.ddp and device_type == 'cuda':
            if self.local_rank >= torch.cuda.device_count():
                raise SystemExit(f"local rank {self.local_rank} has no GPU: this machine has "
                                 f"{torch.cuda.device_count()}; start at most that many processes per node "
                                 f"(--nproc_per_node)")
            self.device = f'cuda:{self.local_rank}'
            torch.cuda.set_device(self.device)

    def share(self, gradient_accumulation_steps):
        """The micro-steps of an iteration, counted over all processes, that each process runs."""
        if gradient_accumulation_steps % self.world_size != 0:
            raise SystemExit(f"gradient_accumulation_steps={gradient_accumulation_steps} counts micro-steps over all "
                             f"processes, so it must be divisible by the number of processes ({self.world_size})")
        return gradient_accumulation_steps // self.world_size

    def wrap(self, model, compile=False, est=False):
        """The model to train: on this rank's device, compiled if compile, and spread over the ranks: DDP under
        torchrun, or sharded by FSDP (shard(); also in a single process, a world of one). Compiled whole, or each
        block on its own: with EST (its skipped blocks stay Python between the graphs, no recompile per step) and
        under FSDP (it gathers each block's weights around the block's graph, as torchtitan does). The process
        group is made this late on purpose: an error in the settings, data or checkpoint before it ends every rank
        on its own, as in a single process. Under DDP, EST's skipped blocks get no gradient in a step:
        find_unused_parameters lets the reduction finish without them (a walk over the autograd graph each step)."""
        if not self.fsdp:  # FSDP moves each block to the device as it shards it, never the whole model at once
            model.to(self.device)
        if compile:
            if est and not hasattr(torch.compiler, 'set_stance'):
                raise SystemExit("--est=True with torch.compile needs torch 2.6 or newer: upgrade torch, or run with "
                                 "--compile=False")
            try:
                if est or self.fsdp:
                    for block in model.blocks():
                        block.compile()
                else:
                    model = torch.compile(model)
            except RuntimeError as e:  # e.g. a Python version that this torch's compiler does not support yet
                raise SystemExit(f"torch.compile failed ({str(e).strip().splitlines()[0]}): run with "
                                 f"--compile=False") from None
        if not (self.ddp or self.fsdp):
            return model
        backend = 'nccl' if self.device_type == 'cuda' else 'gloo'
        if self.ddp:
            dist.init_process_group(backend=backend)
        else:  # --fsdp=True without torchrun: a group of one, through an in-memory store (no port)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        self.group = True
        self.flags = dist.new_group(backend='gloo') if self.device_type == 'cuda' else None  # any(): no GPU sync
        if self.fsdp:
            return self.shard(model)
        # torch 2.13 deprecates broadcast_buffers but asks to keep it where buffers are rank-local (score_offset is)
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
        return DDP(model, device_ids=[self.local_rank] if self.device_type == 'cuda' else None,
                   broadcast_buffers=False, find_unused_parameters=est)

    def shard(self, model):
        """FSDP2 over this run's ranks: every block (inside levels and recurrent blocks too) a unit of its own, then
        the root, which holds the rest (embeddings, head, norms, scorers, bypasses). The model is changed in place:
        its parameters become DTensors, this rank's rows of each. Buffers are not sharded or broadcast: the RoPE
        tables are the same on every rank, and score_offset stays each rank's own running statistic, as under DDP.
        Every rank builds the same initial weights (train.py seeds them alike), so the shards are of one model."""
        from torch.distributed.fsdp import fully_shard
        for block in model.blocks():
            fully_shard(block, mp_policy=self.mp_policy)
        return fully_shard(model, mp_policy=self.mp_policy)

    def sync_gradients(self, model, sync):
        """Whether the next backward reduces the gradients over the ranks: only the last micro-step of an iteration
        does, the others accumulate locally (FSDP: unsharded, in fp32). Set before the forward, where DDP prepares
        the reduction."""
        if self.fsdp:
            model.set_requires_gradient_sync(sync)
        elif self.ddp:
            model.require_backward_grad_sync = sync

    def state_line(self, model):
        """The bytes of training state on this rank, in one line: fp32 weights, gradients and AdamW's two moments,
        4x this rank's parameters (its shards under FSDP). Activations and FSDP's gathered blocks come on top."""
        local = [p.to_local() if hasattr(p, 'to_local') else p for p in model.parameters()]  # DTensor: its shard
        mb = sum(t.numel() * t.element_size() for t in local) / 1e6
        return (f"per-rank model + optimizer state: {4 * mb:.2f} MB (weights, gradients and AdamW's two moments: 4 x "
                f"the {mb:.2f} MB of this rank's parameters{', 1/%d of them' % self.world_size if self.fsdp else ''})")

    def from_master(self, obj):
        """Rank 0's obj, on every rank (every rank calls it)."""
        if self.ddp:
            box = [obj]
            dist.broadcast_object_list(box, src=0)
            obj = box[0]
        return obj

    def gather(self, obj):
        """[rank 0's obj, rank 1's, ...] on every rank (every rank calls it)."""
        if not self.ddp:
            return [obj]
        objs = [None] * self.world_size
        dist.all_gather_object(objs, obj)
        return objs

    def mean(self, x):
        """The mean of a float over the ranks (every rank calls it)."""
        if not self.ddp:
            return x
        total = torch.tensor(x, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def any(self, flag):
        """Whether flag is true on any rank (every rank calls it, so they agree, at the same point)."""
        if not self.ddp:
            return bool(flag)
        flags = torch.tensor([int(bool(flag))])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.flags)
        return bool(flags.item())

    def leave(self, message=None):
        """End the run on every rank at once (all call it at the same point, after dropping the DDP wrapper). With a
        message, every rank exits 1 and rank 0 prints it (one line)."""
        if self.group:
            dist.barrier()
            dist.destroy_process_group()
            self.group = False
        if message:
            raise SystemExit(message if self.master else 1)

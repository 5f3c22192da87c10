"""
train.py's processes under torchrun (it sets RANK, LOCAL_RANK and WORLD_SIZE; without torchrun a run is rank 0 of 1):
which one this is, the process group, and how the ranks agree. Only rank 0 logs, evaluates and saves. When the run
must stop (a refused out_dir, a loss that is not finite, a full disk, a preemption signal), every rank learns it at
the same point, and they leave together: no rank tears the process group down while another can still use it (gloo
aborts a rank that does: "terminate called without an active exception").
"""
import os
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


class Ranks:
    """This process among torchrun's: rank, local_rank, world_size, master (rank 0), and its device."""

    def __init__(self, device, device_type):
        self.ddp = int(os.environ.get('RANK', -1)) != -1
        names = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE')
        self.rank, self.local_rank, self.world_size = (int(os.environ[k]) for k in names) if self.ddp else (0, 0, 1)
        self.master = self.rank == 0
        self.device, self.device_type = device, device_type
        self.flags = None  # the process group of any(): gloo, on the CPU (the default one on CPUs)
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

    def wrap(self, model, find_unused_parameters=False):
        """Make the process group and wrap the model in DDP (without torchrun: the model as it is). The group is made
        this late on purpose: an error in the settings, data or checkpoint before it ends every rank on its own, as
        in a single process. The buffers (RoPE tables, schedule values) are the same on every rank, and score_offset
        is a rank's own running statistic: none is broadcast. find_unused_parameters lets DDP finish the reduction
        without parameters that get no gradient in a step (EST's skipped blocks; it costs a walk over the autograd
        graph each step)."""
        if not self.ddp:
            return model
        dist.init_process_group(backend='nccl' if self.device_type == 'cuda' else 'gloo')
        self.flags = dist.new_group(backend='gloo') if self.device_type == 'cuda' else None  # any(): no GPU sync
        # torch 2.13 deprecates broadcast_buffers but asks to keep it where buffers are rank-local (score_offset is)
        warnings.filterwarnings('ignore', message='`broadcast_buffers` is deprecated')
        return DDP(model, device_ids=[self.local_rank] if self.device_type == 'cuda' else None,
                   broadcast_buffers=False, find_unused_parameters=find_unused_parameters)

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
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()
        if message:
            raise SystemExit(message if self.master else 1)

"""
Tests of Evolving Subnetwork Training (EST): est.set_subnetwork, sample_subnetwork, the FLOP counter, and
train.py --est=True (in this process with runpy, like test_train.py).
"""
import copy
import functools
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from est import est_kept, sample_subnetwork, set_subnetwork
from flops import forward_flops
from model import SubLLM, SubLLMConfig
from test_train import TINY, env1, interrupt_and_resume, make_data, read_log, train, TRAIN

TINY_EST = [*TINY, '--est=True', '--est_stage1_end=0.5', '--est_stage2_end=0.75']


def tiny_model(structure, n_kv_head=2, seed=0):
    torch.manual_seed(seed)
    return SubLLM(SubLLMConfig(vocab_size=64, block_size=32, n_embd=32, n_head=4, n_kv_head=n_kv_head,
                               ffn_hidden=48, structure=structure, keep_ratio=0.5))


def everything(model):
    """The sub-network with every KV group and every unit of every block."""
    cfg = model.config
    return [(torch.arange(cfg.n_kv_head), torch.arange(cfg.ffn_hidden)) for _ in model.blocks()]


@pytest.mark.parametrize('structure, n_kv_head', [('TTTT', None), ('TTTT', 2), ('TT(TT(T)T)T', 2)])
def test_the_full_subnetwork_is_exactly_the_dense_model(structure, n_kv_head):
    dense = tiny_model(structure, n_kv_head)
    sub = copy.deepcopy(dense)  # a copy: a SUBLLM training forward moves the level's running score offset
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    # the control: one SwiGLU unit fewer per block is a sub-network that runs, and so changes FLOPs and logits
    set_subnetwork(sub, [(groups, units[:-1]) for groups, units in everything(sub)])
    assert forward_flops(sub, 32) < forward_flops(dense, 32)
    assert not torch.allclose(sub.eval()(x, x)[0], dense.eval()(x, x)[0], atol=1e-4)  # eval: no offset moves
    set_subnetwork(sub, everything(sub))
    assert forward_flops(sub, 32) == forward_flops(dense, 32)
    for train_mode in (True, False):
        dense.train(train_mode), sub.train(train_mode)
        logits_dense, loss_dense = dense(x, x)
        logits_sub, loss_sub = sub(x, x)
        assert torch.equal(logits_dense, logits_sub) and torch.equal(loss_dense, loss_sub)
    set_subnetwork(sub, None)
    assert all(b.est_q_rows is None and not b.est_skip for b in sub.blocks())


def test_flop_counter_by_hand_and_against_the_matmuls_that_ran():
    model = tiny_model('TT(TT)T')  # C 32, 4 heads of D 8 in 2 KV groups, 48 units, vocab 64, keep 0.5
    set_subnetwork(model, [(torch.tensor([1]), torch.arange(12)),      # half the heads, a quarter of the units
                          None,                                       # skipped
                          (torch.tensor([0, 1]), torch.arange(48)),   # inside the level: dense, on 8 of 16 tokens
                          None,
                          (torch.tensor([0]), torch.arange(0, 48, 2))])  # half the heads, half the units
    T, C = 16, 32
    attn, mlp = 2 * C * C + 2 * C * 16, 3 * C * 48  # q, o: C x C; k, v: C x (2 groups x 8); gate, up, down
    scores = 2 * T * T * C  # causal attention of a dense block over T tokens
    expected = [2 * T * (attn / 2 + mlp / 4) + scores / 2,
                2 * T * C,                                      # the level's scorer
                2 * 8 * (attn + mlp) + 2 * 8 * 8 * C,           # dense block on ceil(0.5 * 16) = 8 tokens
                2 * T * (attn / 2 + mlp / 2) + scores / 2,
                2 * T * C * 64]                                 # lm_head
    assert forward_flops(model, T) == sum(expected) == 418816

    # the matmuls that really run (sliced weights, not masked): every FLOP counted but attention's scores
    llama = tiny_model('TTTT')
    subnet = sample_subnetwork(llama, 0.5, 0.25, 0.5, torch.Generator().manual_seed(0))
    set_subnetwork(llama, subnet)
    with FlopCounterMode(display=False) as counter:
        llama(torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.long))
    n_running = sum(s is not None for s in subnet)
    assert n_running == 2 and all(len(s[0]) == 1 and len(s[1]) == 12 for s in subnet if s is not None)
    assert counter.get_total_flops() == forward_flops(llama, T) - n_running * scores / 2
    assert forward_flops(llama, T) < 0.3 * forward_flops(tiny_model('TTTT'), T)


def test_a_subnetwork_step_gives_gradients_only_to_what_it_ran():
    model = tiny_model('TT(TT(TT)T)T')
    subnet = sample_subnetwork(model, 0.5, 0.5, 0.5, torch.Generator().manual_seed(3))
    assert sum(s is None for s in subnet) == 4  # 8 blocks, 4 run
    set_subnetwork(model, subnet)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    model(x, x)[1].backward()

    def nonzero_rows(grad):
        return grad.abs().sum(1).nonzero().flatten().tolist()
    for block, entry in zip(model.blocks(), subnet):
        if entry is None:
            assert all(p.grad is None for p in block.parameters())  # a skipped block: AdamW leaves it alone
            continue
        q_rows, kv_rows, units = block.est_q_rows.tolist(), block.est_kv_rows.tolist(), block.est_units.tolist()
        assert len(q_rows) == 16 and len(kv_rows) == 8 and len(units) == 24  # 1 of 2 groups (2 heads x 8), 24 of 48
        assert nonzero_rows(block.attn.wq.weight.grad) == q_rows
        assert nonzero_rows(block.attn.wo.weight.grad.T) == q_rows
        assert nonzero_rows(block.attn.wk.weight.grad) == kv_rows == nonzero_rows(block.attn.wv.weight.grad)
        assert nonzero_rows(block.mlp.gate.weight.grad) == units == nonzero_rows(block.mlp.up.weight.grad)
        assert nonzero_rows(block.mlp.down.weight.grad.T) == units
    for level in model.levels():  # SUBLLM's own modules always run
        assert level.scorer.weight.grad.abs().sum() > 0 and level.bypass.c.grad.abs().sum() > 0


def test_sampler_is_a_function_of_the_generator_and_keeps_the_required_blocks():
    model = tiny_model('TT(TTT(TT)T)TTT', n_kv_head=4)  # 11 blocks; level 1 holds blocks 2-4 and 7, level 2 5-6
    blocks = model.blocks()

    def draw(seed, *rates):
        return sample_subnetwork(model, *rates, generator=torch.Generator().manual_seed(seed))

    def same(a, b):
        return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x[0], y[0])
                                                 and torch.equal(x[1], y[1])) for x, y in zip(a, b))
    assert same(draw(7, 0.5, 0.5, 0.5), draw(7, 0.5, 0.5, 0.5))  # DDP ranks and a resumed run draw the same
    assert not same(draw(7, 0.5, 0.5, 0.5), draw(8, 0.5, 0.5, 0.5))
    level_blocks = [[blocks.index(b) for b in lv.inner.layers if b in blocks] for lv in model.levels()]
    assert level_blocks == [[2, 3, 4, 7], [5, 6]]
    for seed in range(30):
        for p_layers, n_running in ((0.01, 4), (0.5, 6), (1.0, 11)):  # 0.01: only the blocks the rules require
            subnet = draw(seed, 0.5, 0.3, p_layers)
            running = [i for i, s in enumerate(subnet) if s is not None]
            assert len(running) == n_running and running[0] == 0 and running[-1] == 10
            assert all(set(running) & set(inside) for inside in level_blocks)
            for groups, units in (s for s in subnet if s is not None):
                assert len(groups) == 2 and len(units) == est_kept(0.3, 48) == 14
                assert groups.unique().numel() == 2 and units.unique().numel() == 14


def test_bad_subnetworks_are_clear_errors():
    model = tiny_model('TTT')
    with pytest.raises(ValueError, match='2 entries but the model has 3 blocks'):
        set_subnetwork(model, [None, None])
    with pytest.raises(ValueError, match=r'KV groups \[0, 0\]: give distinct indices in \[0, 2\)'):
        set_subnetwork(model, [(torch.tensor([0, 0]), torch.arange(4))] * 3)
    with pytest.raises(ValueError, match=r'units \[48\]: give distinct indices in \[0, 48\)'):
        set_subnetwork(model, [(torch.tensor([0]), torch.tensor([48]))] * 3)


@pytest.fixture
def data(tmp_path):
    g = torch.Generator().manual_seed(0)
    return make_data(tmp_path / 'data', torch.randint(0, 64, (4000,), generator=g).numpy(),
                     torch.randint(0, 64, (600,), generator=g).numpy())


def test_est_run_logs_stages_and_flops_and_resumes_mid_stage_exactly(monkeypatch, tmp_path, data, capsys):
    # stage 1 is iters 0-5, stage 2 6-8, stage 3 9-11; the run is interrupted at iter 6 and resumes from iter 4
    flags = [*TINY_EST, *data, '--max_iters=12', '--eval_interval=4', '--learning_rate=3e-3', '--warmup_iters=3']
    train(monkeypatch, *flags, f'--out_dir={tmp_path / "a"}')
    printed = capsys.readouterr().out
    assert 'EST: stage 1 iters [0, 6)' in printed and 'iter 7: loss' in printed and 'EST stage 2' in printed

    interrupt_and_resume(monkeypatch, flags, tmp_path / 'b', at_iter=6, checkpoint_iter=4)  # mid-stage 2

    log_a, log_b = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    for r in log_a + log_b:
        r.pop('time_s')
    assert log_a == log_b  # the same sub-networks, losses and FLOP counts, exactly
    with pytest.raises(SystemExit, match=r"--seed=7 differs from the checkpoint's \(1337\): an EST run draws"):
        train(monkeypatch, *flags, f'--out_dir={tmp_path / "b"}', '--init_from=resume', '--seed=7', '--max_iters=14')
    assert [r['stage'] for r in log_a] == [1, 1, 2, 3]
    assert log_a[-1]['train_loss'] < log_a[0]['train_loss']
    dense_per_iter = log_a[1]['flops_dense'] / 4
    model = SubLLM(SubLLMConfig(**torch.load(tmp_path / 'a' / 'ckpt.pt')['model_args']))
    assert dense_per_iter == 3 * forward_flops(model, 32) * 4  # forward + backward, 4 sequences per iter
    assert [r['flops_dense'] for r in log_a] == [0, 4 * dense_per_iter, 8 * dense_per_iter, 12 * dense_per_iter]
    flops = [r['flops'] for r in log_a]
    assert flops[0] == 0 and flops[1] < 0.5 * 4 * dense_per_iter  # stage 1: fewer blocks, half the heads/units
    assert 3 * dense_per_iter < flops[3] - flops[2] < 4 * dense_per_iter  # iter 8 in stage 2, 9-11 dense


@pytest.mark.parametrize('args, message', [
    (['--est_stage1_end=0.8', '--est_stage2_end=0.5'], r"EST stages need 0 <= est_stage1_end <= est_stage2_end"),
    (['--est_p_heads=0'], r"est_p_heads, est_p_units and est_p_layers must be in \(0, 1\]"),
])
def test_bad_est_settings_are_one_line_messages(monkeypatch, tmp_path, data, args, message):
    with pytest.raises(SystemExit, match=message):
        train(monkeypatch, *TINY_EST, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=1', *args)


def test_ddp_ranks_run_the_same_subnetworks(tmp_path, data):
    # each rank records the sub-network of every step it trained; skipped blocks need find_unused_parameters
    wrapper = tmp_path / 'train_and_dump.py'
    wrapper.write_text(f"import os, runpy, torch\n"
                       f"import est\n"
                       f"seen, original = [], est.set_subnetwork\n"
                       f"def recording(model, subnet):\n"
                       f"    if subnet is not None:\n"
                       f"        seen.append([None if s is None else [t.tolist() for t in s] for s in subnet])\n"
                       f"    original(model, subnet)\n"
                       f"est.set_subnetwork = recording\n"
                       f"runpy.run_path({TRAIN!r}, run_name='__main__')\n"
                       f"torch.save(seen, os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'] + '.pt'))\n")
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(wrapper),
           *TINY_EST, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=4', '--eval_interval=4',
           '--gradient_accumulation_steps=2']
    p = subprocess.run(cmd, capture_output=True, text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / 'rank0.pt'), torch.load(tmp_path / 'rank1.pt')
    assert len(rank0) == 3 and rank0 == rank1  # iters 0-2 in stages 1 and 2 (iter 3 is stage 3: the full model)
    assert None in rank0[0]  # stage 1 skipped blocks, and DDP got through it
    assert [r['stage'] for r in read_log(tmp_path / 'out')] == [1, 3]


def test_compiled_est_run_compiles_per_kind_of_step_not_per_step(monkeypatch, tmp_path, data):
    # with EST, train.py compiles each block on its own: skipped blocks are Python between the graphs, sub-network
    # sizes change only between stages. Dynamo's graph capture with the 'eager' backend: seconds, not minutes
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch, 'compile', functools.partial(torch.compile, backend='eager'))
    try:
        train(monkeypatch, *TINY_EST, *data, f'--out_dir={tmp_path / "out"}', '--max_iters=12',
              '--eval_interval=4', '--compile=True')
        # 12 steps with 9 different sub-networks and 3 evals: a graph for the sub-network blocks and one for the
        # dense blocks, each once at the full length and once for the shorter lengths inside the levels
        assert counters['stats']['unique_graphs'] == 4
    finally:
        torch._dynamo.reset()


def test_recurrent_blocks_refuse_a_subnetwork():
    model = SubLLM(SubLLMConfig(vocab_size=64, block_size=32, n_embd=32, n_head=2, structure='TRT'))
    set_subnetwork(model, None)  # the dense model is fine
    with pytest.raises(ValueError, match="recurrent"):
        set_subnetwork(model, sample_subnetwork(model, 0.5, 0.5, 1.0, torch.Generator().manual_seed(0)))

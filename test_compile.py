"""Tests of model.py under torch.compile (issue #25): a SUBLLM training step is one graph with no host sync and gives
eager's loss and gradients, the training schedules do not recompile it, and the eval forward (prefill) serves
prompts whose kept counts all differ with one compilation. Backend 'aot_eager' (inductor takes minutes on a CPU):
it traces what inductor would get, forward and backward, without generating code."""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

from model import SubLLM, SubLLMConfig

V = 64


def tiny(**kw):
    torch.manual_seed(0)
    return SubLLM(SubLLMConfig(**{'vocab_size': V, 'block_size': 32, 'n_embd': 32, 'n_head': 4,
                                  'structure': 'T(T(T)T)T', 'keep_ratio': 0.5, **kw}))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kw", [dict(), dict(selection='threshold'), dict(balancer='spec'), dict(balancer='strong')],
                         ids=['topk', 'threshold', 'spec', 'strong'])
def test_training_step_is_one_graph_with_eager_loss_and_gradients(kw):
    eager = tiny(**kw).train()
    compiled_model = copy.deepcopy(eager)
    counter = CompileCounterWithBackend('aot_eager')
    # fullgraph: a graph break is an error; no captured scalars: a host sync (.item(), .tolist()) would break it
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)
    x, y = torch.randint(0, V, (2, 32)), torch.randint(0, V, (2, 32))
    # the step at 0: the Balancer acts on every step (prob 1), and the bypass gates (0.5) are below c_min (0.9),
    # where LimitParamValue flips gradients at random: the same seed draws the same flips
    losses = []
    for model, forward in [(eager, eager), (compiled_model, compiled)]:
        model.set_step(0, 100)
        torch.manual_seed(1)
        with torch._dynamo.config.patch(capture_scalar_outputs=False):
            _, loss = forward(x, y)
        loss.backward()
        losses.append(loss.detach())
    assert counter.frame_count == 1
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name
    scorer_grads = [level.scorer.weight.grad for level in eager.levels()]
    assert all(g.abs().sum() > 0 for g in scorer_grads)  # the Balancer and the soft weights reach the scorers
    for a, b in zip(eager.levels(), compiled_model.levels()):  # the running cut and the counters moved alike
        assert torch.equal(a.score_offset, b.score_offset) and torch.equal(a.stats, b.stats)
    assert all(level.score_offset != 0 for level in eager.levels())


def test_training_schedules_do_not_recompile():
    model = tiny().train()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x, y = torch.randint(0, V, (2, 32)), torch.randint(0, V, (2, 32))
    seen = set()
    for step in range(0, 101, 4):  # max_steps 100: the bypass schedule ends at step 20, the Balancer's at 8
        model.set_step(step, 100)
        level = model.levels()[0]
        seen.add((round(level.bypass.c_min.item(), 4), round(level.balancer_prob.item(), 4)))
        _, loss = compiled(x, y)
        loss.backward()
    assert (0.9, 1.0) in seen and (0.2, 0.25) in seen and len(seen) >= 6  # the whole schedule was walked
    assert counter.frame_count == 1


def test_compiled_prefill_serves_every_kept_count_with_one_compilation():
    """20 prompts of one length, each keeping different numbers of tokens at the two levels: the short lengths are
    unbacked sizes inside one graph (subsample_eval), not a recompile per count."""
    model = tiny().eval()
    prompts, counts = [], set()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        while len(prompts) < 20:
            idx = torch.randint(0, V, (2, 32), generator=g)
            model.reset_level_stats()
            model(idx)
            stats = tuple(model.level_stats())
            if stats not in counts:
                counts.add(stats)
                prompts.append(idx)
        kept = {stats[0][2] for stats in counts}
        assert len(kept) >= 5  # level 1's kept count itself varies a lot, not only level 2's
        counter = CompileCounterWithBackend('aot_eager')
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for idx in prompts:
            model.reset_level_stats()
            logits, _ = compiled(idx)
            compiled_stats = model.level_stats()
            model.reset_level_stats()
            expected, _ = model(idx)
            assert compiled_stats == model.level_stats()
            assert torch.allclose(logits, expected, atol=1e-5)
    assert counter.frame_count == 1


def test_eval_level_that_no_token_enters_leaves_the_stream_unchanged():
    """subsample_eval runs one padding token of weight 0 where no token enters (a fixed graph cannot skip the
    blocks): the level's output is then its input, exactly, compiled or not."""
    model = tiny().eval()
    for level in model.levels():
        level.score_offset.fill_(100.0)  # every score < 0
    idx = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        logits = model(idx)[0]
        compiled = torch.compile(model, backend='aot_eager', fullgraph=True)(idx)[0]
        outer = model.levels()[0]
        outer.forward = lambda x, *args: x  # the level taken out: the blocks around it only
        expected = model(idx)[0]
    assert torch.equal(logits, expected) and torch.equal(compiled, expected)
    assert [(depth, kept) for depth, _, kept in model.level_stats()] == [(1, 0), (2, 0)]


def test_compiled_decoding_compiles_each_segment_once_and_equals_eager():
    """Decoding compiled (generate.Decoder(compiled=...)): each segment between host reads is one graph (fullgraph:
    a host read inside would fail to compile), a step runs one graph more than it reads, and after a warmup of 64
    steps of random entry patterns (per level and step: no row enters, some, or every row) 64 more compile
    nothing (error_on_recompile), at a bounded number of graphs: per segment start and bucket size of each level
    open there (at batch 4: 2 rows, or all 4). The logits are eager's."""
    from torch._dynamo.backends.debugging import aot_eager
    from generate import Decoder
    model = tiny(structure='(T(T))', block_size=140).eval()  # two nested levels, one block each: small graphs
    shift = {1: torch.zeros(()), 2: torch.zeros(())}  # tensors: a new value is an input, not a recompile
    for level in model.levels():
        level.scorer.register_forward_hook(lambda m, args, out, d=level.depth: out + shift[d])
    graph_calls = []

    def backend(gm, example_inputs):  # aot_eager, counting the calls of each graph it makes
        compiled = aot_eager(gm, example_inputs)
        return lambda *args: graph_calls.append(1) or compiled(*args)
    B, steps = 4, 128
    idx = torch.randint(V, (B, 8 + steps), generator=torch.Generator().manual_seed(0))
    patterns = torch.tensor([-50.0, 0.0, 50.0])[torch.randint(3, (steps, 2), generator=torch.Generator().manual_seed(1))]
    counter = CompileCounterWithBackend(backend)
    logits = {}
    with torch.no_grad():
        for name, compiled in (('eager', False), ('compiled', counter)):
            reads = []
            decoder = Decoder(model, B, 8 + steps, compiled=compiled)
            route = decoder.route
            decoder.route = lambda *args: reads.append(1) or route(*args)
            shift[1].zero_(), shift[2].zero_()
            out = [decoder(idx[:, :8])[0]]  # the prompt: eager
            for t in range(steps):
                if compiled and t == 64:
                    warm = counter.frame_count
                shift[1].fill_(patterns[t, 0]), shift[2].fill_(patterns[t, 1])
                graph_calls.clear(), reads.clear()
                with torch._dynamo.config.patch(error_on_recompile=bool(compiled) and t >= 64):
                    out.append(decoder(idx[:, 8 + t:9 + t])[0])
                if compiled:  # the step's graphs: one per segment, a segment after each read
                    assert len(graph_calls) == len(reads) + 1 and len(reads) <= 2
            decoder.close()
            logits[name] = torch.cat(out, dim=1)
    # starts: the model's (2: a step that gives out pages, one that does not), into level 1 (2 sizes), into level 2
    # (3: 2 of 4 rows, 2 of 2, 4 of 4), after a skip of level 2 (2), of level 1 (1)
    assert counter.frame_count == warm == 10
    assert torch.allclose(logits['compiled'], logits['eager'], atol=1e-5)

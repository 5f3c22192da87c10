"""Tests of model.py: tiny configs on CPU. Run with `python -m pytest -q`.

The KV-cache tests (those with 'cache' in their name) also run on another device and precision, as gpu_check.py
runs them on a GPU:

    SUBLLM_TEST_DEVICE=cuda SUBLLM_TEST_DTYPE=bfloat16 python -m pytest -q test_model.py -k cache

A DTYPE other than float32 runs the models under autocast to it, as sample.py does on a GPU (the cache then holds
keys and values in it). There the cached and the full forward round differently, so logits agree to LOGIT_TOL,
not 1e-4, and a level score within PIN_MARGIN of the cut may fall on the other side of it in one of the two: such
a token is a coin toss, not a bug, and ScoreControl's pin makes both computations keep the same tokens (see
pin_near_ties). Greedy decoding is checked as "each generated token is the full forward's argmax, up to
LOGIT_TOL", since a near tie may pick the other token. The defaults (cpu, float32) run the exact tests.
"""
import math
import os
from contextlib import nullcontext

import pytest
import torch

from flops import forward_flops
from model import (SubLLM, SubLLMConfig, llama_twin, parse_structure, subsample_topk,
                   subsample_threshold, upsample)

V = 64  # vocabulary of the tiny models
DEVICE = os.environ.get('SUBLLM_TEST_DEVICE', 'cpu')      # the KV-cache tests' device
DTYPE = os.environ.get('SUBLLM_TEST_DTYPE', 'float32')    # and precision: float32, or autocast to bfloat16/float16
if DTYPE not in ('float32', 'bfloat16', 'float16'):
    raise ValueError(f"SUBLLM_TEST_DTYPE must be float32, bfloat16 or float16, got {DTYPE!r}")
EXACT = DTYPE == 'float32'
BF16_TOL = 0.25  # |logit| < 6 here, where bf16's spacing is 1/32: 8 of its steps (the CPU's bf16 run differs by 3)
LOGIT_TOL = 1e-4 if EXACT else BF16_TOL  # cached vs full logits; a real bug (a wrong position, slot or token) is ~1
PIN_MARGIN = 0.0 if EXACT else 0.1   # low precision: |score| below this is a near tie that may flip (see above)


def precision():
    """Autocast to DTYPE on DEVICE, or nothing for float32."""
    if EXACT:
        return nullcontext()
    return torch.autocast(torch.device(DEVICE).type, dtype=getattr(torch, DTYPE))


def tiny(structure="T(T(T)T)T", keep_ratio=0.5, **kw):
    kw = {'vocab_size': V, 'block_size': 64, 'n_embd': 32, 'n_head': 4, **kw}
    return SubLLMConfig(structure=structure, keep_ratio=keep_ratio, **kw)


def build(config, seed=0, weight_scale=None):
    """A random model. weight_scale re-draws every matrix with std weight_scale / sqrt(fan_in): larger weights
    than the training init, so that attention is far from uniform and position bugs show in the logits."""
    torch.manual_seed(seed)
    model = SubLLM(config)
    if weight_scale is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, weight_scale / math.sqrt(p.size(1)))
    return model


class ScoreControl:
    """Forward hooks that decide, per level depth and original position, whether a token enters a level:
    force_in / force_out map depth -> set of positions whose score becomes +50 / -50; others keep their own score
    (plus `shift[depth]`). Works the same in the full forward and in cached decoding, because it keys on the
    original positions that each level passes to RoPE. pin > 0: pin_near_ties (low precision only)."""

    def __init__(self, model, force_in=None, force_out=None, shift=None, pin=0.0):
        self.force_in, self.force_out, self.shift = force_in or {}, force_out or {}, shift or {}
        self.scores = {}  # depth -> list of (positions, scores) seen, for the tests to inspect
        self.pin, self.reference, self.pinned = pin, {}, 0  # depth -> (B, block_size) first score seen; count
        for level in model.levels():
            level.register_forward_pre_hook(self.remember_positions)
            level.scorer.register_forward_hook(self.adjust(level))

    def remember_positions(self, level, args):
        level._positions = args[1]  # (1 or B, T) original positions of the tokens this level sees
        level._valid = args[3] if len(args) > 3 else None  # (B, T) real tokens, None: all (padding is not)

    def pin_near_ties(self, level, pos, out):
        """The first score seen of each (depth, row, position) is its reference. A later score of it (the other
        computation: cached or full) on the other side of the cut, where the reference is within `pin` of the cut,
        takes the reference's value, so that both computations keep the same tokens. A flip with a reference
        farther from the cut than that is left alone: the logits then differ, and the test fails."""
        s = out.squeeze(-1).float() - level.score_offset  # what Level compares with 0
        real = torch.ones_like(s, dtype=torch.bool) if level._valid is None else level._valid
        ref = self.reference.setdefault(level.depth, torch.full((s.size(0), level.config.block_size), math.nan,
                                                                device=s.device))
        rows = torch.arange(s.size(0), device=s.device)[:, None].expand_as(s)
        old = ref[rows, pos]  # (B, T)
        first = torch.isnan(old) & real
        ref[rows[first], pos[first]] = s[first]
        flip = ~torch.isnan(old) & real & ((s > 0) != (old > 0)) & (old.abs() < self.pin)
        self.pinned += int(flip.sum())
        return torch.where(flip[..., None], (old + level.score_offset)[..., None].to(out.dtype), out)

    def adjust(self, level):
        def hook(scorer, inputs, out):
            pos = level._positions.expand(out.shape[:2])  # (B, T)
            out = out + self.shift.get(level.depth, 0.0)
            for p in self.force_in.get(level.depth, ()):
                out = torch.where((pos == p)[..., None], torch.full_like(out, 50.0), out)
            for p in self.force_out.get(level.depth, ()):
                out = torch.where((pos == p)[..., None], torch.full_like(out, -50.0), out)
            if self.pin:
                out = self.pin_near_ties(level, pos, out)
            self.scores.setdefault(level.depth, []).append((pos.detach().clone(), out.detach().squeeze(-1)))
            return out
        return hook


# -----------------------------------------------------------------------------
# config, structure, shapes


def test_shapes_and_initial_loss():
    model = build(tiny())
    idx = torch.randint(0, V, (3, 20))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 20, V)
    assert abs(loss.item() - math.log(V)) < 0.3  # near uniform at init
    logits, loss = model(idx)
    assert logits.shape == (3, 1, V) and loss is None
    model.eval()
    assert model(idx, idx)[0].shape == (3, 20, V)


def test_parse_structure():
    assert parse_structure("TT") == ['T', 'T']
    assert parse_structure("T(T(T)T)T") == ['T', ['T', ['T'], 'T'], 'T']
    assert parse_structure("(T)") == [['T']]
    for bad, message in [("T(T", "never closed"), ("T)T", "closes no level"), ("T()T", "no 'T'"),
                         ("T(x)T", "unknown character"), ("", "empty"), ("T((T))", "no 'T'")]:
        with pytest.raises(ValueError, match=message):
            parse_structure(bad)


def test_config_errors():
    for kw, message in [({'keep_ratio': 0.0}, r"\(0, 1\]"), ({'keep_ratio': 1.5}, r"\(0, 1\]"),
                        ({'keep_ratio': (0.5,)}, "one per level"), ({'n_head': 5}, "divisible by n_head"),
                        ({'n_kv_head': 3}, "divisible by n_kv_head"), ({'structure': "T(T"}, "never closed")]:
        with pytest.raises(ValueError, match=message):
            tiny(**kw)
    model = build(tiny())
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than block_size"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=5)


def llama_param_count(c):
    """The LLaMA parameter count written out: embeddings, head, per block 4 projections + SwiGLU + 2 norms."""
    head_dim = c.n_embd // c.n_head
    attention = 2 * c.n_embd * c.n_embd + 2 * c.n_embd * c.n_kv_head * head_dim
    block = attention + 3 * c.n_embd * c.ffn_hidden + 2 * c.n_embd
    embeddings = c.vocab_size * c.n_embd * (1 if c.tie_embeddings else 2)
    return embeddings + c.structure.count('T') * block + c.n_embd


@pytest.mark.parametrize("kw", [{}, {'n_kv_head': 2}, {'tie_embeddings': True}, {'ffn_hidden': 80}])
def test_llama_baseline_parameter_count(kw):
    config = tiny(**kw)
    twin = llama_twin(config)
    assert twin.structure == "TTTTT" and SubLLM(twin).levels() == []
    assert SubLLM(twin).get_num_params() == llama_param_count(twin)
    # SUBLLM adds a scorer and a bypass (n_embd each) per level, nothing else
    assert SubLLM(config).get_num_params() == llama_param_count(twin) + 2 * 2 * config.n_embd
    assert tiny().ffn_hidden == 256  # LLaMA's rule: 8/3 * 32 rounded up to a multiple of 256


# -----------------------------------------------------------------------------
# the level: selection, positions, upsample, bypass


def test_eval_mode_is_causal():
    model = build(tiny(), weight_scale=1.0).eval()
    control = ScoreControl(model)
    idx = torch.randint(0, V, (2, 40))
    base = model(idx, idx)[0]
    for t in [0, 7, 20, 39]:
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        logits = model(changed, changed)[0]
        assert torch.allclose(logits[:, :t], base[:, :t], atol=1e-5)  # not bit-equal: padded lengths change
        if t < 39:
            assert not torch.allclose(logits[:, t:], base[:, t:])
    kept = [(s > 0).float().mean().item() for _, s in control.scores[1]]
    assert 0.1 < min(kept) and max(kept) < 0.9  # the check above ran with both kept and skipped tokens


def test_subsample_topk_keeps_ceil_k_in_order():
    torch.manual_seed(0)
    for T, keep in [(10, 0.5), (11, 0.64), (7, 1.0), (5, 0.1)]:
        scores = torch.randn(3, T) * 2
        idx, weights = subsample_topk(scores, keep)
        k = math.ceil(keep * T)
        assert idx.shape == weights.shape == (3, k)
        assert torch.all(idx[:, 1:] > idx[:, :-1])  # ascending, no repeats: the short sequence stays causal
        assert torch.equal(idx, scores.topk(k, dim=1).indices.sort(dim=1).values)
        ranked = scores.sort(dim=1, descending=True).values.clamp(0, 1)  # w = clamp(s_(i)) - clamp(s_(i+k))
        below = torch.cat([ranked[:, k:], torch.zeros(3, k)], dim=1)[:, :k]
        assert torch.allclose(weights.sort(dim=1, descending=True).values,
                              (ranked[:, :k] - below).sort(dim=1, descending=True).values)


def test_subsample_threshold_right_pads():
    scores = torch.tensor([[1.0, -1.0, 2.0, 0.5], [-1.0, -2.0, 0.3, -0.1]])
    idx, weights, kept, counts, selected = subsample_threshold(scores, None)
    assert counts == [3, 1]
    assert idx[0].tolist() == [0, 2, 3] and idx[1, 0].item() == 2
    assert kept.tolist() == [[True, True, True], [True, False, False]]
    assert torch.allclose(weights, torch.tensor([[1.0, 1.0, 0.5], [0.3, 0.0, 0.0]]))
    assert selected.tolist() == [[True, False, True, True], [False, False, True, False]]


def test_threshold_capacity_drops_the_latest_positive_tokens():
    """With a capacity (threshold selection in training) the short length is fixed, and a row with more positive
    scores than room keeps its first ones: the overflow rule looks only at earlier tokens, so it is causal."""
    scores = torch.tensor([[1.0, 2.0, -1.0, 3.0, 0.4], [-1.0, 0.5, -2.0, -3.0, -1.0]])
    valid = torch.tensor([[True] * 5, [True, True, True, True, False]])
    idx, weights, kept, counts, selected = subsample_threshold(scores, valid, capacity=2)
    assert counts is None and idx.shape == (2, 2)  # static shape, no host sync
    assert selected.tolist() == [[True, True, False, False, False], [False, True, False, False, False]]
    assert idx.tolist() == [[0, 1], [1, 0]]  # row 1: its one kept token, then a skipped one as padding
    assert kept.tolist() == [[True, True], [True, False]]
    assert torch.allclose(weights, torch.tensor([[1.0, 1.0], [0.5, 0.0]]))


def test_train_mode_levels_see_ceil_keep_tokens_at_original_positions():
    model = build(tiny(keep_ratio=(0.75, 0.4)))
    control = ScoreControl(model)
    seen = {}
    for level in model.levels():
        level.inner.register_forward_pre_hook(
            lambda stack, args, depth=level.depth: seen.__setitem__(depth, (args[0].shape, args[1].clone())))
    idx = torch.randint(0, V, (2, 30))
    model(idx, idx)
    k1, k2 = math.ceil(0.75 * 30), math.ceil(0.4 * math.ceil(0.75 * 30))
    assert seen[1][0] == (2, k1, 32) and seen[2][0] == (2, k2, 32)
    # level 1 sees the positions of its top-k scores, in order; level 2 the top-k of those (RoPE gets these)
    scores1 = control.scores[1][0][1]
    expected1 = scores1.topk(k1, dim=1).indices.sort(dim=1).values
    assert torch.equal(seen[1][1], expected1)
    scores2 = control.scores[2][0][1]
    expected2 = expected1.gather(1, scores2.topk(k2, dim=1).indices.sort(dim=1).values)
    assert torch.equal(seen[2][1], expected2)


def test_rope_uses_the_positions_it_is_given():
    """A level's inner blocks must see the original positions: shifting them all by a constant leaves attention
    unchanged (RoPE is relative), but moving one token's position changes the result."""
    config = tiny(structure="TT")
    stack = build(config, weight_scale=1.0).stack
    model = SubLLM(config)
    rope = (model.rope_cos, model.rope_sin)
    x = torch.randn(1, 6, 32)
    pos = torch.tensor([[1, 4, 5, 9, 12, 20]])
    y = stack(x, pos, rope)
    assert torch.allclose(stack(x, pos + 7, rope), y, atol=1e-5)
    assert not torch.allclose(stack(x, torch.tensor([[1, 4, 5, 9, 13, 20]]), rope), y, atol=1e-3)


def test_upsample_leaves_skipped_positions_equal_to_skip_path():
    torch.manual_seed(0)
    x, y = torch.randn(2, 8, 4), torch.randn(2, 3, 4)
    idx = torch.tensor([[1, 4, 6], [0, 2, 7]])
    weights = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, 0.7]])
    out = upsample(x, y, idx, weights)
    for b in range(2):
        for t in range(8):
            if t in idx[b]:
                j = idx[b].tolist().index(t)
                assert torch.allclose(out[b, t], weights[b, j] * y[b, j] + (1 - weights[b, j]) * x[b, t])
            else:
                assert torch.equal(out[b, t], x[b, t])


def test_level_output_is_input_where_a_token_skips():
    """In eval mode a skipped token takes the skip path: the level's output equals its input there."""
    model = build(tiny(), weight_scale=1.0).eval()
    control = ScoreControl(model, force_out={1: {3, 4, 10}})
    level = model.levels()[0]
    io = {}
    level.register_forward_hook(lambda m, args, out: io.update(x=args[0], out=out))
    idx = torch.randint(0, V, (1, 16))
    model(idx, idx)
    skipped = (control.scores[1][0][1][0] <= 0).nonzero().flatten().tolist()
    assert {3, 4, 10} <= set(skipped) and len(skipped) < 16
    kept = [t for t in range(16) if t not in skipped]
    assert torch.equal(io['out'][0, skipped], io['x'][0, skipped])
    assert not torch.allclose(io['out'][0, kept], io['x'][0, kept])


@pytest.mark.parametrize("training", [True, False])
def test_keep_one_all_positive_is_inner_blocks_plus_bypass(training):
    model = build(tiny(structure="T(TT)T", keep_ratio=1.0), weight_scale=1.0).train(training)
    ScoreControl(model, shift={1: 100.0})  # every score >= 1: soft weights are exactly 1, every token enters
    level = model.levels()[0]
    x = torch.randn(2, 12, 32)
    pos = torch.arange(12)[None]
    rope = (model.rope_cos, model.rope_sin)
    out = level(x, pos, rope)
    inner = level.inner(x, pos.expand(2, -1), rope)
    c = level.bypass.c
    assert torch.allclose(out, x + (inner - x) * c, atol=1e-5)


def test_running_offset_tracks_the_top_k_cut():
    model = build(tiny(keep_ratio=0.6))
    level = model.levels()[0]
    scores = torch.randn(1, 10)
    level.track_cut(scores, momentum=1.0)  # one full step: the offset lands between the 6th and 7th largest score
    assert ((scores - level.score_offset) > 0).sum().item() == 6
    assert 'stack.layers.1.score_offset' in model.state_dict()  # saved with the weights: inference needs it
    model.eval()
    before = level.score_offset.clone()
    model(torch.randint(0, V, (2, 10)))
    assert torch.equal(level.score_offset, before)  # only training moves it


@pytest.mark.parametrize("running_cut, offset, positive", [("batch", 7.5, 12), ("rows", 53.5, 10)])
def test_batch_cut_keeps_keep_ratio_of_rows_at_different_score_levels(running_cut, offset, positive):
    """Row 0 scores 100..109, row 1 scores 0..9, keep 0.6. Each row's own cut (103.5, 3.5) averages to 53.5, a
    threshold that keeps 10 of the 20 tokens (0.5); the batch's cut sits between its 12th and 13th largest (8, 7),
    at 7.5, and keeps 12 (0.6), as eval's one threshold must. Padding is neither counted nor ranked."""
    level = build(tiny(keep_ratio=0.6, running_cut=running_cut)).levels()[0]
    scores = torch.stack([torch.arange(10.0) + 100, torch.arange(10.0)])
    level.track_cut(scores, momentum=1.0)
    assert level.score_offset.item() == offset
    assert ((scores - level.score_offset) > 0).sum().item() == positive
    level.score_offset.zero_()
    level.track_cut(scores, momentum=0.05)  # like a running mean: a step moves it by momentum * the cut
    assert level.score_offset.item() == pytest.approx(0.05 * offset)
    if running_cut == 'batch':  # row 1's last 5 tokens are padding, with scores that would rank first
        level.score_offset.zero_()
        padded = torch.cat([scores[:, :5], torch.tensor([[105.0] * 5, [1000.0] * 5])], dim=1)
        valid = torch.tensor([[True] * 10, [True] * 5 + [False] * 5])
        level.track_cut(padded, valid, momentum=1.0)  # 15 real tokens: between the 9th and 10th largest, 101, 100
        assert level.score_offset.item() == 100.5


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_every_parameter_gets_a_finite_gradient(selection):
    model = build(tiny(n_kv_head=2, selection=selection))
    idx = torch.randint(0, V, (4, 32))
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # the scorers too: through the soft weights


def test_set_step_schedules():
    model = build(tiny(bypass_schedule_steps=100, balancer_schedule_steps=40))
    level = model.levels()[0]
    assert level.bypass.c_min.item() == pytest.approx(0.9) and level.balancer_prob.item() == 1.0
    model.set_step(20)
    assert level.bypass.c_min.item() == pytest.approx(0.9 - 0.7 * 0.2)
    assert level.balancer_prob.item() == pytest.approx(1.0 - 0.75 * 0.5)
    model.set_step(1000)
    assert level.bypass.c_min.item() == pytest.approx(0.2) and level.balancer_prob.item() == pytest.approx(0.25)
    model.set_step(10, max_steps=10_000)  # a 10k-step run does the schedules 10x faster
    assert level.bypass.c_min.item() == pytest.approx(0.2) and level.balancer_prob.item() == pytest.approx(0.25)


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_positive_score_fraction_follows_keep_ratio(selection):
    """Train a toy SUBLLM on a learnable sequence task; at the end the fraction of positive scores in eval mode
    (which is what decides inference) is within 0.05 of each level's keep ratio (Balancer + running offset)."""
    torch.manual_seed(0)
    model = SubLLM(tiny(keep_ratio=(0.75, 0.4), selection=selection))
    successor = torch.randperm(V)

    def batch(b):  # next token = successor[token], or successor + 1 with probability 0.2
        x = [torch.randint(0, V, (b,))]
        for _ in range(64):
            x.append((successor[x[-1]] + (torch.rand(b) < 0.2).long()) % V)
        x = torch.stack(x, 1)
        return x[:, :-1], x[:, 1:]

    steps, lr = 300, 1e-2
    optimizer = model.configure_optimizers(0.0, lr, (0.9, 0.95), 'cpu')
    for step in range(steps):
        for group in optimizer.param_groups:
            group['lr'] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        model.set_step(step, steps)
        loss = model(*batch(8))[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.0  # it learned the task (ln 64 = 4.16 at the start)
    model.eval()
    model.reset_level_stats()
    with torch.no_grad():
        model(*batch(64))
    for depth, tokens_in, tokens_kept in model.level_stats():
        assert abs(tokens_kept / tokens_in - (0.75, 0.4)[depth - 1]) < 0.05, (depth, tokens_kept / tokens_in)


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_compiled_forward_matches_eager(selection):
    model = build(tiny(structure="T(T)T", selection=selection))
    idx = torch.randint(0, V, (2, 16))
    compiled = torch.compile(model)
    for training in [True, False]:
        model.train(training)
        offset = model.levels()[0].score_offset.clone()
        eager_logits, eager_loss = model(idx, idx)
        model.levels()[0].score_offset.copy_(offset)  # a training forward moves it: start both from the same one
        compiled_logits, compiled_loss = compiled(idx, idx)
        assert not training or not torch.equal(model.levels()[0].score_offset, offset)  # compiled, it moves too
        assert torch.allclose(compiled_logits, eager_logits, atol=1e-4)
        assert torch.allclose(compiled_loss, eager_loss, atol=1e-5)


# -----------------------------------------------------------------------------
# selection='threshold': training keeps `score > 0` like inference, in a fixed capacity


def train_logits(model, idx):
    """Train-mode logits, leaving the running offsets where they were (a training forward moves them after use)."""
    offsets = [level.score_offset.clone() for level in model.levels()]
    logits = model(idx, idx)[0]
    for level, offset in zip(model.levels(), offsets):
        level.score_offset.copy_(offset)
    return logits


@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_training_forward_is_causal_only_with_threshold_selection(selection):
    """With threshold selection a training forward is causal (changing token t changes no logit before t), also
    when rows overflow the capacity (slack 0 here). Top-k is not: a later token's score moves the cut."""
    model = build(tiny(selection=selection, capacity_slack=0.0), weight_scale=1.0)
    idx = torch.randint(0, V, (4, 40))
    with torch.no_grad():
        base = train_logits(model, idx)
        leaks = 0
        for t in [0, 7, 20, 33, 39]:
            for shift in range(1, 4):
                changed = idx.clone()
                changed[:, t] = (changed[:, t] + shift) % V
                logits = train_logits(model, changed)
                leaks += not torch.allclose(logits[:, :t], base[:, :t], atol=1e-5)
    (depth1, offered, agree, dropped), _ = model.selection_stats()
    if selection == 'threshold':
        assert leaks == 0
        assert dropped > 0 and agree == offered - dropped  # rows overflowed; that is the only disagreement
    else:
        assert leaks > 0


def test_threshold_training_computes_what_inference_computes():
    """Without overflow (a capacity of the whole row) a training forward with threshold selection gives the eval
    forward's logits: same tokens in, same weights. Top-k's differ."""
    idx = torch.randint(0, V, (3, 40))
    for selection, same in [('threshold', True), ('topk', False)]:
        model = build(tiny(selection=selection, capacity_slack=1.0), weight_scale=1.0)
        with torch.no_grad():
            eval_logits = model.eval()(idx, idx)[0]
            training_logits = train_logits(model.train(), idx)
        assert torch.allclose(training_logits, eval_logits, atol=1e-5) == same
    (_, offered, agree, dropped), (_, offered2, agree2, dropped2) = model.selection_stats()  # the top-k model's
    assert agree < offered and agree2 < offered2


def test_threshold_levels_run_on_their_fixed_capacity():
    """Level 1 gets ceil(keep * T * (1 + slack)) slots, level 2 ceil(keep * that): the slack is added once. The
    FLOP count counts those slots, padding included."""
    model = build(tiny(selection='threshold', keep_ratio=(0.75, 0.4), capacity_slack=0.2))
    seen = {}
    for level in model.levels():
        level.inner.register_forward_pre_hook(
            lambda stack, args, depth=level.depth: seen.__setitem__(depth, args[0].shape))
    model(torch.randint(0, V, (2, 30)), torch.randint(0, V, (2, 30)))
    c1 = math.ceil(0.75 * 30 * 1.2)
    c2 = math.ceil(0.4 * c1)
    assert seen == {1: (2, c1, 32), 2: (2, c2, 32)}
    assert forward_flops(model, 30) == pytest.approx(forward_flops(model, 30, keep=[c1 / 30, c2 / c1]))


# -----------------------------------------------------------------------------
# FLOP count (SUBLLM.md §9)


@pytest.mark.parametrize("keep,ratios", [(0.5, (1.49, 1.51, 1.55)), (0.64, (1.33, 1.34, 1.37)),
                                         (0.8, (1.17, 1.18, 1.19))])
def test_forward_flops_match_the_spec_table(keep, ratios):
    config = SubLLMConfig(vocab_size=32000, block_size=8192, n_embd=2048, n_head=16, ffn_hidden=5504,
                          structure="TTTTT(TTTTT(TTTT)TTTTT)TTTTT", keep_ratio=keep)
    with torch.device('meta'):
        subllm, llama = SubLLM(config), SubLLM(llama_twin(config))
    for T, ratio in zip((2048, 4096, 8192), ratios):
        assert forward_flops(llama, T) / forward_flops(subllm, T, keep=[keep, keep]) == pytest.approx(ratio, abs=0.006)
    C, F, V_ = 2048, 5504, 32000  # the baseline's count is the spec's per-block formula plus the head
    assert forward_flops(llama, 2048) == 24 * (2 * 2048 * (4 * C * C + 3 * C * F) + 2 * 2048 ** 2 * C) + 2 * 2048 * C * V_


# -----------------------------------------------------------------------------
# KV-cache decoding: every step must give the logits of the full eval-mode forward
# (on DEVICE in DTYPE: see the module's docstring; record_property notes what a low-precision run saw)


def cached_logits(model, idx, chunks):
    """Feed idx (B, T) through the cache in chunks of the given sizes; the logits of every position."""
    model.setup_cache(idx.size(0), idx.size(1))
    out, start = [], 0
    try:
        for size in chunks:
            piece = idx[:, start:start + size]
            out.append(model(piece, piece)[0])  # targets only to get logits at every position of the chunk
            start += size
    finally:
        model.setup_cache(None, None)
    assert start == idx.size(1)
    return torch.cat(out, dim=1)


def greedy_gap(model, seq, prompt_len):
    """How far each generated token of seq (B, T) is from the full eval forward's argmax: the largest difference,
    over the generated positions, between the top logit and the generated token's logit (0: exactly greedy)."""
    was_training = model.training
    model.eval()
    with torch.no_grad(), precision():
        logits = model(seq[:, :-1], seq[:, :-1])[0].float()[:, prompt_len - 1:]  # predicts seq[:, prompt_len:]
    model.train(was_training)
    chosen = logits.gather(-1, seq[:, prompt_len:, None]).squeeze(-1)
    return (logits.max(-1).values - chosen).max().item()


CACHE_CASES = {  # name: (force_in, force_out) per depth, with a prompt of 8 tokens then decoding
    'natural scores': ({}, {}),
    'level 1 keeps none of the prompt': ({1: {9, 12}}, {1: set(range(8))}),
    'level 1 keeps one prompt token': ({1: {5, 10}}, {1: set(range(8)) - {5}}),
    'levels keep all of the prompt': ({1: set(range(8)), 2: set(range(8))}, {}),
    'level 2 keeps none of the prompt': ({1: {0, 3, 4}, 2: {11}}, {2: set(range(8))}),
    'level 2 keeps one prompt token': ({1: {2, 6}, 2: {6, 13}}, {2: set(range(8)) - {6}}),
}


@pytest.mark.parametrize("case", CACHE_CASES)
@pytest.mark.parametrize("B,chunks", [(1, [8] + [1] * 12), (3, [8] + [1] * 12), (2, [8, 3, 1, 4, 1, 2, 1])])
def test_cached_decoding_equals_full_forward(case, B, chunks, record_property):
    force_in, force_out = CACHE_CASES[case]
    model = build(tiny(structure="T(T(TT)T)T", n_kv_head=2), seed=B, weight_scale=1.5).to(DEVICE).eval()
    control = ScoreControl(model, force_in, force_out, pin=PIN_MARGIN)
    idx = torch.randint(0, V, (B, 20), generator=torch.Generator().manual_seed(B)).to(DEVICE)
    with torch.no_grad(), precision():
        full = model(idx, idx)[0].float()
        control.scores.clear()
        cached = cached_logits(model, idx, chunks).float()
    diff = (cached - full).abs().max().item()
    record_property('max_logit_diff', diff)
    record_property('pinned_near_ties', control.pinned)
    assert diff < LOGIT_TOL
    for depth in (1, 2):  # decode steps both entered and skipped each level
        decode = [s for pos, s in control.scores[depth] if pos.min() >= 8]
        entered = torch.cat([s.flatten() for s in decode]) > 0
        assert entered.any() and not entered.all(), (depth, entered)


def test_batched_decoding_runs_a_level_only_for_the_rows_that_enter():
    """At batch 4 the rows' new tokens enter different levels at every step. A level runs its inner blocks for
    exactly the rows whose token enters it (and not at all when none does), the caches of the rows that skip stay
    untouched, and every row's logits are those of the full forward."""
    model = build(tiny(structure="T(T(TT)T)T", n_kv_head=2), seed=4, weight_scale=1.5).eval()
    control = ScoreControl(model)
    inner_rows = {}  # depth -> rows that each run of the level's inner blocks got
    for level in model.levels():
        level.inner.register_forward_pre_hook(
            lambda stack, args, depth=level.depth: inner_rows.setdefault(depth, []).append(args[0].size(0)))
    caches = {lv.depth: lv.inner.layers[0].attn for lv in model.levels()}  # the first block inside each level
    idx = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx, idx)[0]
        model.setup_cache(4, 24)
        logits = [model(idx[:, :8], idx[:, :8])[0]]  # the prefill
        control.scores.clear()
        inner_rows.clear()
        for t in range(8, 24):
            before = {d: attn.kv_cache.k.clone() for d, attn in caches.items()}
            lens = {lv.depth: list(lv.inner.cache_lens) for lv in model.levels()}
            logits.append(model(idx[:, t:t + 1], idx[:, t:t + 1])[0])
            for lv in model.levels():  # a row whose token skipped the level: its cache is as it was
                for r in range(4):
                    if lv.inner.cache_lens[r] == lens[lv.depth][r]:
                        assert torch.equal(caches[lv.depth].kv_cache.k[r], before[lv.depth][r])
        model.setup_cache(None, None)
    assert (torch.cat(logits, dim=1) - full).abs().max() < 1e-4
    for depth in (1, 2):
        entering = [int((s > 0).sum()) for _, s in control.scores[depth]]  # per step, of the rows that reached it
        assert inner_rows[depth] == [n for n in entering if n > 0]
        reached = [s.size(0) for _, s in control.scores[depth]]
        assert any(0 < n < b for n, b in zip(entering, reached)), entering  # some rows in, some out
    assert 0 in [int((s > 0).sum()) for _, s in control.scores[2]]  # and steps where no row enters level 2


def test_cached_decoding_baseline(record_property):
    model = build(tiny(structure="TTT", n_kv_head=2), weight_scale=1.5).to(DEVICE).eval()
    idx = torch.randint(0, V, (2, 20)).to(DEVICE)
    with torch.no_grad(), precision():
        diff = (cached_logits(model, idx, [5, 1, 1, 6, 1, 1, 5]).float() - model(idx, idx)[0].float()).abs().max()
    record_property('max_logit_diff', diff.item())
    assert diff < LOGIT_TOL


@pytest.mark.parametrize("structure", ["T(T(TT)T)T", "TTT"])
def test_greedy_generation_same_with_and_without_cache(structure, record_property):
    model = build(tiny(structure=structure), weight_scale=1.5).to(DEVICE)
    prompt = torch.randint(0, V, (2, 6)).to(DEVICE)
    control = None if EXACT else ScoreControl(model, pin=PIN_MARGIN)
    with precision():
        with_cache = model.generate(prompt, 30, top_k=1, use_cache=True)
    if not EXACT:
        gap = greedy_gap(model, with_cache, 6)  # pinned to the level decisions of the cached run
        control.reference.clear()
    with precision():
        without = model.generate(prompt, 30, top_k=1, use_cache=False)
    assert with_cache.shape == (2, 36)
    if EXACT:
        assert torch.equal(with_cache, without)
    else:  # a near tie of two logits may pick either token (and the sequences part there): greedy up to LOGIT_TOL
        record_property('greedy_gap', gap)
        record_property('tokens_equal', (with_cache == without).float().mean().item())
        record_property('pinned_near_ties', control.pinned)
        assert gap < LOGIT_TOL and greedy_gap(model, without, 6) < LOGIT_TOL
    assert model.training  # generate restores the mode it found


def test_cached_decoding_under_autocast(record_property):
    """On a GPU, sampling runs under bf16 autocast: the cache then holds bf16 keys and values."""
    model = build(tiny(structure="T(T)T"), weight_scale=1.5).to(DEVICE).eval()
    control = None if DEVICE == 'cpu' else ScoreControl(model, pin=0.1)  # another device: pin near ties
    idx = torch.randint(0, V, (1, 12)).to(DEVICE)
    with torch.no_grad(), torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        full = model(idx, idx)[0].float()
        model.setup_cache(1, 12)
        assert model.blocks()[0].attn.kv_cache.k.dtype == torch.bfloat16
        model.setup_cache(None, None)
        cached = cached_logits(model, idx, [6, 1, 1, 1, 1, 1, 1]).float()
        if control:
            control.reference.clear()
        assert model.generate(idx[:, :4], 8, top_k=1).shape == (1, 12)
    record_property('max_logit_diff', (cached - full).abs().max().item())
    assert (cached - full).abs().max() < (0.1 if DEVICE == 'cpu' else BF16_TOL)  # equal up to bf16 rounding


def test_decode_entry_fraction_matches_positive_scores():
    """The number of tokens that enter each level while decoding equals the number of positive scores that the
    full eval forward over the same sequence gives, level by level."""
    model = build(tiny(), weight_scale=1.5).eval()
    prompt = torch.randint(0, V, (1, 10))
    model.reset_level_stats()
    out = model.generate(prompt, 40, use_cache=True)
    decoded = model.level_stats()
    control = ScoreControl(model)
    model.reset_level_stats()
    with torch.no_grad():
        model(out[:, :-1])  # the last sampled token was never fed back
    assert decoded == model.level_stats()
    positive = (control.scores[1][0][1] > 0).sum().item()
    assert decoded[0][2] == positive and 0 < positive < 49

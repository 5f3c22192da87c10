"""
Tests of eval.py (lm-evaluation-harness on a train.py checkpoint), offline: tiny models trained here by train.py on
byte tokens, and two lm-eval tasks defined here (YAML files reading JSONL data files written by the test): a
multiple-choice task and a generation task. Skipped when lm-eval is not installed (pip install -r
requirements-eval.txt; .ci/run installs it).
"""
import json
import os
import runpy
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # the tasks' data are local files: never ask the hub
os.environ.setdefault('HF_HUB_OFFLINE', '1')
lm_eval = pytest.importorskip('lm_eval', reason='lm-eval is optional: pip install -r requirements-eval.txt')
from lm_eval.tasks import TaskManager  # noqa: E402

from eval import HarnessLM, load_model, score_windows  # noqa: E402  (importing eval.py reads no settings)
from generate import generate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = 64
TEXT = ("The cat sat on the mat. The dog ran to the park. Two plus two is four. The sky is blue. "
        "Q: What color is the sky?\nA: blue\nQ: What sat on the mat?\nA: the cat\n") * 40
QUESTIONS = [('The cat sat on the', [' mat', ' park', ' sky'], 0), ('The dog ran to the', [' mat', ' park'], 1),
             ('Two plus two is', [' blue', ' four', ' cat'], 1), ('The sky is', [' blue', ' four'], 0),
             ('', [' The cat', ' four'], 0),  # no context
             ('The dog ran to the ', ['park', 'mat'], 0),  # a trailing space
             ('The cat sat on the mat.\n', ['The dog', 'The sky'], 0), ('\n', ['The cat', 'Two'], 0)]  # newlines
GENERATE = [('What color is the sky?', 'blue'), ('What sat on the mat?', 'the cat'),
            ('What ran to the park?', 'the dog')]


def train_checkpoint(root, name, structure):
    """root/name/ckpt.pt: 40 iterations of train.py on TEXT's bytes (block_size 64); returns the out_dir."""
    data = root / 'data' / 'text'
    if not data.exists():
        data.mkdir(parents=True)
        ids = np.frombuffer(TEXT.encode(), dtype=np.uint8).astype(np.uint16)
        ids.tofile(data / 'train.bin')
        ids[:1000].tofile(data / 'val.bin')
        (data / 'meta.json').write_text(json.dumps(dict(tokenizer='byte', vocab_size=256, dtype='uint16')))
    out = root / name
    argv = ['train.py', f'--data_dir={root / "data"}', '--dataset=text', f'--out_dir={out}', f'--structure={structure}',
            '--n_embd=32', '--n_head=2', f'--block_size={BLOCK}', '--batch_size=8', '--gradient_accumulation_steps=1',
            '--max_iters=40', '--eval_interval=40', '--eval_iters=1', '--log_interval=40', '--warmup_iters=0',
            '--learning_rate=1e-2', '--device=cpu', '--compile=False']
    saved = sys.argv
    try:
        sys.argv = argv
        runpy.run_path(os.path.join(HERE, 'train.py'), run_name='__main__')
    finally:
        sys.argv = saved
    return str(out)


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Trained tiny checkpoints: SUBLLM, its LLaMA twin, a recurrent structure (on one thread, as conftest.py's
    tests run: a module fixture is set up before it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp('eval')
    try:
        return {name: train_checkpoint(root, name, structure) for name, structure in
                [('subllm', 'TT(T(T)T)T'), ('llama', 'TTTTTT'), ('recurrent', 'TRT')]}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def task_dir(tmp_path_factory):
    """A folder of two lm-eval tasks on local JSONL files: tiny_mc (multiple choice, 2-shot from its train split:
    prompts longer than the block) and tiny_gen (generation, stops at a newline)."""
    d = tmp_path_factory.mktemp('tasks')
    cache = d / 'hf_cache'

    def jsonl(name, rows):
        (d / name).write_text(''.join(json.dumps(r) + '\n' for r in rows))
    mc = [dict(question=q, choices=[c.strip() for c in choices], answer=a) for q, choices, a in QUESTIONS if q]
    jsonl('mc_test.jsonl', mc)
    jsonl('mc_train.jsonl', mc[::-1])
    jsonl('gen_test.jsonl', [dict(question=q, answer=a) for q, a in GENERATE])
    (d / 'tiny_mc.yaml').write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {d / 'mc_train.jsonl'}
    test: {d / 'mc_test.jsonl'}
  cache_dir: {cache}
output_type: multiple_choice
training_split: train
fewshot_split: train
test_split: test
num_fewshot: 2
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (d / 'tiny_gen.yaml').write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen_test.jsonl'}
  cache_dir: {cache}
output_type: generate_until
test_split: test
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: " {{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return str(d)


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]  # HarnessLM reads a request's args only


def direct_logprob(model, tokens, n):
    """Sum of log P of the last n tokens, and whether each is the argmax, from one full forward of the tokens (their
    last block_size + 1)."""
    tokens = torch.tensor(tokens[-(model.config.block_size + 1):])
    with torch.no_grad():
        logits, _ = model(tokens[None, :-1], tokens[None, 1:])  # (1, T, V)
    logp = F.log_softmax(logits[0, -n:].float(), dim=-1)
    targets = tokens[-n:]
    return logp.gather(1, targets[:, None]).sum().item(), bool((logp.argmax(-1) == targets).all())


def expected_loglikelihood(model, tok, context, continuation):
    """lm-eval's convention (trailing whitespace of the context goes to the continuation; an empty context is the
    end-of-text token), then direct_logprob."""
    ctx = context.rstrip()
    cont = context[len(ctx):] + continuation
    ctx_ids = tok.encode(ctx) or [tok.eot_token]
    return direct_logprob(model, ctx_ids + tok.encode(cont), len(tok.encode(cont)))


def test_loglikelihood_equals_the_models_own_log_probs(ckpts):
    model, tok = load_model(ckpts['subllm'])
    lm = HarnessLM(model, tok, batch_size=4)
    long_context = TEXT[:150]  # longer than the block: keeps its end
    pairs = [(q, c) for q, choices, _ in QUESTIONS for c in choices] + [(long_context, ' The cat')]
    pairs += [('The cat sat on the m', 'at'), ('The dog ran to the pa', 'rk')]  # easy: likely the argmax
    got = lm.loglikelihood(requests(*pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        expected, expected_greedy = expected_loglikelihood(model, tok, context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy
    assert any(greedy for _, greedy in got) and not all(greedy for _, greedy in got)  # trained: some answers greedy


@pytest.mark.parametrize('name', ['subllm', 'llama', 'recurrent'])
def test_batched_equals_one_at_a_time_and_padding_changes_no_logits(ckpts, name):
    model, tok = load_model(ckpts[name])
    pairs = [(q, c) for q, choices, _ in QUESTIONS for c in choices]
    batched = HarnessLM(model, tok, batch_size=16).loglikelihood(requests(*pairs), disable_tqdm=True)
    single = HarnessLM(model, tok, batch_size=1).loglikelihood(requests(*pairs), disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(batched, single):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    # the logits of a sequence alone, and right-padded in a batch beside a longer one
    short, long = torch.tensor(tok.encode(TEXT[:20])), torch.tensor(tok.encode(TEXT[100:160]))
    padded = torch.stack([torch.cat([short, torch.randint(0, 256, (40,))]), long])
    model.reset_level_stats()
    with torch.no_grad():
        alone, _ = model(short[None], short[None])
        together, _ = model(padded, padded)
    torch.testing.assert_close(together[0, :20], alone[0], atol=1e-5, rtol=1e-5)
    for depth, offered, kept in model.level_stats():  # the levels route: some tokens enter, some skip
        assert 0 < kept < offered, (depth, offered, kept)


def test_rolling_windows_score_each_token_once_with_the_last_window_full():
    # lm-eval's example: tokens [BOS 0 1 ... 9], block 4: reads BOS 0 1 2 | 3 4 5 6 | 5 6 7 8, scores 4 | 4 | 2
    assert score_windows(list(range(11)), 1, 4) == [(0, 4, 4), (4, 8, 4), (6, 10, 2)]
    assert score_windows(list(range(11)), 9, 4) == [(6, 10, 2)]  # a long context keeps its end
    for start, n_tokens in [(1, 200), (1, 64), (1, 65), (30, 100)]:
        windows = score_windows(list(range(n_tokens)), start, BLOCK)
        scored = [t for first, last, n in windows for t in range(last - n + 1, last + 1)]
        assert scored == list(range(start, n_tokens))
        assert all(last - first <= BLOCK and n <= last - first for first, last, n in windows)
        assert windows[-1][1] - windows[-1][0] == min(BLOCK, n_tokens - 1)


def test_loglikelihood_rolling_sums_the_windows(ckpts):
    model, tok = load_model(ckpts['llama'])
    lm = HarnessLM(model, tok, batch_size=3)
    short, long = TEXT[:50], TEXT[:150]
    got = lm.loglikelihood_rolling(requests((short,), (long,)), disable_tqdm=True)
    ids = [tok.eot_token] + tok.encode(short)
    assert got[0] == pytest.approx(direct_logprob(model, ids, len(ids) - 1)[0], abs=1e-4)
    ids = [tok.eot_token] + tok.encode(long)  # 151 tokens: windows score 64, 64 and the last 22 (full 64 context)
    expected = (direct_logprob(model, ids[:65], 64)[0] + direct_logprob(model, ids[64:129], 64)[0]
                + direct_logprob(model, ids, 22)[0])
    assert got[1] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize('name', ['subllm', 'recurrent'])
def test_generate_until_is_model_generate_greedy_cut_at_the_stop_string(ckpts, name):
    model, tok = load_model(ckpts[name])
    lm = HarnessLM(model, tok)
    prompts = ['Q: What color is the sky?\nA:', 'The cat sat', TEXT[:120]]  # the last is longer than the block
    stops = ['\n', 'sat']
    got = lm.generate_until(requests(*[(p, {'until': stops, 'max_gen_toks': 30}) for p in prompts]), disable_tqdm=True)
    cut = 0
    for prompt, text in zip(prompts, got):
        ids = tok.encode(prompt)[-(BLOCK - 30):]  # room for the 30 new tokens
        y = generate(model, torch.tensor([ids]), 30, top_k=1)[0, len(ids):].tolist()
        reference = tok.decode(y[:y.index(tok.eot_token)] if tok.eot_token in y else y)
        assert text == reference.split(stops[0])[0].split(stops[1])[0]
        cut += len(text) < len(reference)
    assert cut > 0  # a stop string ended some generation
    # max_gen_toks beyond the block: the prompt keeps its last token, generation stops at the block
    long = lm.generate_until(requests(('The cat sat', {'until': [], 'max_gen_toks': 500})), disable_tqdm=True)[0]
    y = generate(model, torch.tensor([tok.encode('t')]), BLOCK - 1, top_k=1)[0, 1:].tolist()
    assert long == tok.decode(y[:y.index(tok.eot_token)] if tok.eot_token in y else y)


def test_simple_evaluate_scores_local_tasks_as_computed_by_hand(ckpts, task_dir):
    model, tok = load_model(ckpts['subllm'])
    tasks = TaskManager(include_path=task_dir, include_defaults=False)  # lm-eval's own tasks are not needed
    out = lm_eval.simple_evaluate(model=HarnessLM(model, tok, batch_size=8), tasks=['tiny_mc', 'tiny_gen'],
                                  bootstrap_iters=0, task_manager=tasks)
    assert out['n-shot'] == {'tiny_mc': 2, 'tiny_gen': 0}
    correct = []
    for sample in out['samples']['tiny_mc']:  # each choice's loglikelihood, computed here from a full forward
        scores = [expected_loglikelihood(model, tok, *args)[0] for args in sample['arguments']]
        assert [lp for lp, _ in sample['filtered_resps']] == pytest.approx(scores, abs=1e-4)
        assert sample['arguments'][0][0].count('\n\n') == 2  # two examples before the question
        correct.append(int(np.argmax(scores)) == sample['target'])
    assert len(correct) == 7 and out['results']['tiny_mc']['acc,none'] == pytest.approx(np.mean(correct))
    matches = []
    for sample in out['samples']['tiny_gen']:  # greedy through model.generate, cut at the stop string
        (prompt, kwargs), = sample['arguments']
        ids = tok.encode(prompt)
        y = generate(model, torch.tensor([ids]), kwargs['max_gen_toks'], top_k=1)[0, len(ids):].tolist()
        answer = tok.decode(y[:y.index(tok.eot_token)] if tok.eot_token in y else y).split('\n')[0]
        assert sample['filtered_resps'] == [answer]
        matches.append(answer == sample['target'])
    assert len(matches) == 3 and out['results']['tiny_gen']['exact_match,none'] == pytest.approx(np.mean(matches))


@pytest.mark.parametrize('name', ['subllm', 'llama'])
def test_eval_py_end_to_end_prints_the_table_and_writes_json(ckpts, task_dir, tmp_path, monkeypatch, capsys, name):
    path = tmp_path / 'results.json'
    monkeypatch.setattr(sys, 'argv', ['eval.py', f'--out_dir={ckpts[name]}', '--tasks=tiny_mc,tiny_gen',
                                      f'--include_path={task_dir}', f'--json={path}', '--device=cpu', '--batch_size=4'])
    runpy.run_path(os.path.join(HERE, 'eval.py'), run_name='__main__')
    out = capsys.readouterr().out
    assert '|tiny_mc ' in out and '|tiny_gen' in out
    assert 'loglikelihood: 16 requests in' in out and 'generate_until: 3 requests in' in out
    results = json.loads(path.read_text())['results']
    assert set(results) == {'tiny_mc', 'tiny_gen'}
    assert 0.0 <= results['tiny_gen']['exact_match,none'] <= 1.0


def test_paper_runs_each_benchmark_at_its_shot_count_into_one_table(ckpts, task_dir, tmp_path, monkeypatch, capsys):
    import eval as script  # main() reads the settings from eval.py's globals
    path = tmp_path / 'paper.json'
    for key, value in dict(out_dir=ckpts['subllm'], tasks='paper', include_path=task_dir, json=str(path),
                           device='cpu', PAPER_TASKS=[('tiny_mc', 1), ('tiny_gen', 0)]).items():
        monkeypatch.setattr(script, key, value)  # the paper's three benchmarks stand in for local ones
    script.main()
    out = json.loads(path.read_text())
    assert out['n-shot'] == {'tiny_mc': 1, 'tiny_gen': 0} and set(out['results']) == {'tiny_mc', 'tiny_gen'}
    table = capsys.readouterr().out
    assert '|tiny_mc ' in table and '|tiny_gen' in table


@pytest.mark.parametrize('args, message', [
    (['--out_dir=nowhere'], "no checkpoint at nowhere/ckpt.pt: train a model first"),
    (['--tasks=paper', '--num_fewshot=5'], "--tasks=paper runs each benchmark at the paper's shot count"),
    (['--tasks=,'], "--tasks is empty"),
    (['--include_path=nowhere'], "--include_path=nowhere is not a folder"),
])
def test_user_errors_are_one_line_messages(task_dir, monkeypatch, args, message):
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--tasks=tiny_mc', f'--include_path={task_dir}', '--device=cpu',
                                      *args])
    with pytest.raises(SystemExit, match=message.replace('(', r'\(').replace('.', r'\.')):
        runpy.run_path(os.path.join(HERE, 'eval.py'), run_name='__main__')


def test_without_lm_eval_help_works_and_a_run_names_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'lm_eval', None)  # import lm_eval now raises ImportError
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--help'])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(HERE, 'eval.py'), run_name='__main__')
    assert e.value.code == 0 and '--num_fewshot=-1' in capsys.readouterr().out
    monkeypatch.setattr(sys, 'argv', ['eval.py', '--out_dir=out'])
    with pytest.raises(SystemExit, match='pip install -r requirements-eval.txt'):
        runpy.run_path(os.path.join(HERE, 'eval.py'), run_name='__main__')

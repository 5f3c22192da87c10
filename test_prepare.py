"""Tests for prepare.py: fast, offline, everything written under pytest's tmp_path."""
import base64
import functools
import hashlib
import http.server
import json
import os
import platform
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tiktoken

import prepare
import tokenizer
from prepare import PrepareError, get_tokenizer

HERE = Path(__file__).parent
REAL_GPT2_BPE_FILE = os.environ.get('GPT2_BPE_FILE')  # only test_real_gpt2_bpe_file uses it


@pytest.fixture(autouse=True)
def no_gpt2_bpe_file(monkeypatch):
    """The tests decide themselves whether gpt2 loads (from tiktoken, a stand-in, or a file)."""
    monkeypatch.delenv('GPT2_BPE_FILE', raising=False)


def load(out_dir):
    """Read back meta.json and both bins, checking that file sizes agree with the meta's token counts."""
    meta = json.loads((out_dir / 'meta.json').read_text())
    bins = {}
    for split in ('train', 'val'):
        path = out_dir / f'{split}.bin'
        assert path.stat().st_size == meta[f'{split}_tokens'] * np.dtype(meta['dtype']).itemsize
        bins[split] = np.fromfile(path, dtype=meta['dtype'])
    assert not list(out_dir.glob('*.tmp'))
    return meta, bins


def make_corpus(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(text.encode('utf-8'))
    return root


CORPUS = {  # sorted order: a.txt, b.md, sub/c.py; skip.bin is not a text suffix
    'a.txt': 'Hello, world!\r\nWindows line ends stay.\n' * 50,
    'b.md': '# Ünïcödé 日本語 🙂\n\nno trailing newline',
    'sub/c.py': 'def f(x):\n    return x + 1\n' * 40,
    'skip.bin': 'not text',
    '.venv/lib/skip.py': 'hidden folders are skipped',
}


class FakeGPT2:
    """Stands in for tiktoken's gpt2 Encoding (the real one needs a download): one id per word."""
    n_vocab, eot_token = 50257, 50256

    def encode_ordinary(self, text):
        return [len(w) for w in text.split(' ')]

    def decode(self, ids):
        return ' '.join('x' * i for i in ids)


# --- tokenizers ---------------------------------------------------------------

@pytest.mark.parametrize('text', ['', 'plain ascii', 'Ünïcödé 日本語 🙂', 'crlf\r\nand\ttabs\x00nul',
                                  CORPUS['b.md']])
def test_byte_round_trip(text):
    tok = get_tokenizer('byte')
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert (tok.name, tok.vocab_size, tok.eot_token) == ('byte', 256, 0)


def test_byte_decode_of_invalid_utf8_does_not_crash():
    assert get_tokenizer('byte').decode([104, 0xff, 105]) == 'h\ufffdi'


def test_unknown_tokenizer():
    with pytest.raises(PrepareError, match='gpt2 or byte'):
        get_tokenizer('sentencepiece')


def test_dtype_choice():
    assert prepare.dtype_for(256) == 'uint16'
    assert prepare.dtype_for(50257) == 'uint16'
    assert prepare.dtype_for(65536) == 'uint16'  # ids 0..65535 still fit
    assert prepare.dtype_for(65537) == 'uint32'
    assert prepare.dtype_for(100277) == 'uint32'


def fail_offline(name):
    raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")


def test_gpt2_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(tiktoken, 'get_encoding', fail_offline)
    with pytest.raises(PrepareError) as e:
        get_tokenizer('gpt2')
    msg = str(e.value)
    assert '\n' not in msg and 'ConnectionError' in msg
    assert '--tokenizer=byte' in msg and 'TIKTOKEN_CACHE_DIR' in msg


def test_auto_falls_back_to_byte_offline(monkeypatch, capsys):
    monkeypatch.setattr(tiktoken, 'get_encoding', fail_offline)
    assert get_tokenizer('auto').name == 'byte'
    assert 'auto -> byte' in capsys.readouterr().out


def test_gpt2_when_available(monkeypatch, tmp_path):
    monkeypatch.setattr(tiktoken, 'get_encoding', lambda name: FakeGPT2())
    assert get_tokenizer('auto').name == 'gpt2'
    make_corpus(tmp_path / 'in', {'a.txt': ' '.join(['one two three'] * 10), 'b.txt': 'four<|endoftext|>five six'})
    meta = prepare.prepare(input=str(tmp_path / 'in'), tokenizer='gpt2', out_root=str(tmp_path / 'data'))
    _, bins = load(tmp_path / 'data' / 'in')
    assert (meta['tokenizer'], meta['vocab_size'], meta['dtype'], meta['eot_token']) == ('gpt2', 50257, 'uint16', 50256)
    # one eot after each file, and one in place of the literal <|endoftext|>
    assert np.concatenate([bins['train'], bins['val']]).tolist() == [3, 3, 5] * 10 + [50256, 4, 50256, 4, 3, 50256]


def test_real_tiktoken_offline_fails_fast_with_one_line(tmp_path):
    """Whatever the network: no traceback, and either it works or it says what to do in one line."""
    env = {'TIKTOKEN_CACHE_DIR': str(tmp_path), 'PATH': '/usr/bin:/bin'}
    r = subprocess.run([sys.executable, '-c', 'import prepare; print(prepare.get_tokenizer("gpt2").vocab_size)'],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        assert r.stdout.strip() == '50257'
    else:
        assert 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert '--tokenizer=byte' in r.stderr


def test_gpt2_from_a_local_bpe_file(monkeypatch, tmp_path):
    """GPT2_BPE_FILE: gpt2 with no download. Here a stand-in file (the 256 bytes and one merge), its hash patched in."""
    ranks = [bytes([b]) for b in range(256)] + [b'he']
    data = ''.join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranks)).encode()
    (tmp_path / 'gpt2.tiktoken').write_bytes(data)
    monkeypatch.setenv('GPT2_BPE_FILE', str(tmp_path / 'gpt2.tiktoken'))
    monkeypatch.setattr(tokenizer, 'GPT2_BPE_SHA256', hashlib.sha256(data).hexdigest())
    monkeypatch.setattr(tiktoken, 'get_encoding', fail_offline)  # the file, not the cache or the network
    tok = get_tokenizer('auto')
    assert (tok.name, tok.eot_token, tok.encode('hehe!')) == ('gpt2', 50256, [256, 256, 33])
    assert tok.decode(tok.encode('Ünïcödé 🙂')) == 'Ünïcödé 🙂'
    # another file: an error in one line, with --tokenizer=auto too (the user asked for that file: no fallback)
    monkeypatch.setattr(tokenizer, 'GPT2_BPE_SHA256', '0' * 64)
    for name in ('gpt2', 'auto'):
        with pytest.raises(PrepareError, match="is not GPT-2's BPE file .*openai-whisper") as e:
            get_tokenizer(name)
        assert '\n' not in str(e.value)
    monkeypatch.setenv('GPT2_BPE_FILE', str(tmp_path / 'missing.tiktoken'))
    with pytest.raises(PrepareError, match='GPT2_BPE_FILE=.*missing.tiktoken: No such file'):
        get_tokenizer('gpt2')


@pytest.mark.skipif(not REAL_GPT2_BPE_FILE, reason='set GPT2_BPE_FILE to whisper/assets/gpt2.tiktoken to run it')
def test_real_gpt2_bpe_file(monkeypatch):
    monkeypatch.setenv('GPT2_BPE_FILE', REAL_GPT2_BPE_FILE)
    tok = get_tokenizer('gpt2')
    assert (tok.vocab_size, tok.eot_token, tok.encode('Hello world')) == (50257, 50256, [15496, 995])
    assert tok.encode(' the quick brown fox') == [262, 2068, 7586, 21831]


# --- local inputs -------------------------------------------------------------

def test_directory_input_bins_and_meta_agree(tmp_path):
    src = make_corpus(tmp_path / 'mycorpus', CORPUS)
    meta = prepare.prepare(input=str(src), tokenizer='byte', out_root=str(tmp_path / 'data'))
    m, bins = load(tmp_path / 'data' / 'mycorpus')
    assert m == meta
    assert (meta['tokenizer'], meta['vocab_size'], meta['dtype'], meta['num_files']) == ('byte', 256, 'uint16', 3)
    assert meta['python_version'] is None and meta['source'] == str(src)
    # train followed by val is the whole corpus, each file followed by a NUL, in sorted order
    text = get_tokenizer('byte').decode(np.concatenate([bins['train'], bins['val']]).tolist())
    assert text == ''.join(CORPUS[f] + '\x00' for f in ('a.txt', 'b.md', 'sub/c.py'))
    assert meta['val_tokens'] == len(text.encode()) // 10  # small corpus: a tenth, not 0.5%


def test_single_file_and_glob_inputs(tmp_path):
    src = make_corpus(tmp_path / 'src', CORPUS)
    out = str(tmp_path / 'data')
    meta = prepare.prepare(input=str(src / 'a.txt'), tokenizer='byte', out_root=out)
    assert meta['num_files'] == 1 and (tmp_path / 'data' / 'a' / 'train.bin').exists()  # name from the file
    meta = prepare.prepare(input=str(src / '**' / '*.py'), tokenizer='byte', out_root=out)
    assert meta['num_files'] == 1 and meta['train_tokens'] + meta['val_tokens'] == len(CORPUS['sub/c.py']) + 1
    assert (tmp_path / 'data' / 'src' / 'meta.json').exists()  # name from the glob's directory
    meta = prepare.prepare(input=str(src / '*.*'), name='custom', tokenizer='byte', out_root=out)
    assert meta['num_files'] == 3  # a glob takes what it matches, skip.bin included
    load(tmp_path / 'data' / 'custom')


def test_uint32_for_big_vocab(tmp_path, monkeypatch):
    class BigVocab:
        name, vocab_size, eot_token, eot_text, meta = 'big', 100_000, 99_999, 'its last token', {}

        def encode(self, text):
            return [70_000 + ord(c) for c in text]

    monkeypatch.setattr(prepare, 'get_tokenizer', lambda name: BigVocab())
    make_corpus(tmp_path / 'in', {'a.txt': 'abc' * 100})
    meta = prepare.prepare(input=str(tmp_path / 'in'), out_root=str(tmp_path / 'data'))
    _, bins = load(tmp_path / 'data' / 'in')
    assert meta['dtype'] == 'uint32' and bins['train'].dtype == np.uint32
    assert np.concatenate([bins['train'], bins['val']]).tolist() == [70_000 + ord(c) for c in 'abc' * 100] + [99_999]


def test_val_split_fraction_and_determinism(tmp_path):
    make_corpus(tmp_path / 'in', {'a.txt': 'x' * 2_000_000})
    out = tmp_path / 'data' / 'in'
    meta = prepare.prepare(input=str(tmp_path / 'in'), tokenizer='byte', out_root=str(tmp_path / 'data'))
    assert meta['val_tokens'] == round(2_000_001 * 0.005)  # big enough for the fraction to rule
    first = (out / 'train.bin').read_bytes(), (out / 'val.bin').read_bytes()
    prepare.prepare(input=str(tmp_path / 'in'), tokenizer='byte', out_root=str(tmp_path / 'data'))
    assert ((out / 'train.bin').read_bytes(), (out / 'val.bin').read_bytes()) == first
    meta = prepare.prepare(input=str(tmp_path / 'in'), tokenizer='byte', out_root=str(tmp_path / 'data'),
                           val_fraction=0.1)
    assert meta['val_tokens'] == 200_000


def test_empty_inputs_are_clear_errors(tmp_path):
    (tmp_path / 'empty.txt').write_text('')
    (tmp_path / 'emptydir').mkdir()
    for bad, expect in [('empty.txt', 'no text'), ('emptydir', 'no input files'), ('nothing*.txt', 'no input files')]:
        with pytest.raises(PrepareError, match=expect) as e:
            prepare.prepare(input=str(tmp_path / bad), tokenizer='byte', out_root=str(tmp_path / 'data'))
        assert '\n' not in str(e.value)


def test_interrupted_run_keeps_old_output_and_no_temp_files(tmp_path, monkeypatch):
    make_corpus(tmp_path / 'in', {'a.txt': 'old text ' * 100})
    prepare.prepare(input=str(tmp_path / 'in'), tokenizer='byte', out_root=str(tmp_path / 'data'))
    before = load(tmp_path / 'data' / 'in')
    make_corpus(tmp_path / 'in', {'a.txt': 'new text ' * 100, 'b.txt': 'more'})

    def interrupted(self, data):  # prepare.py gives the byte tokenizer the file's bytes
        if b'more' in data:
            raise KeyboardInterrupt
        return list(data)

    monkeypatch.setattr(tokenizer.ByteTokenizer, 'encode', interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(input=str(tmp_path / 'in'), tokenizer='byte', out_root=str(tmp_path / 'data'))
    after = load(tmp_path / 'data' / 'in')  # also asserts no *.tmp is left
    assert after[0] == before[0] and all((after[1][s] == before[1][s]).all() for s in ('train', 'val'))


def test_stdlib_default_with_file_limit(tmp_path):
    meta = prepare.prepare(tokenizer='byte', out_root=str(tmp_path), max_files=5)
    load(tmp_path / 'stdlib')
    assert meta['python_version'] == platform.python_version() and 'standard library' in meta['source']
    assert meta['num_files'] == 5 and meta['train_tokens'] > 1000
    files, _ = prepare.stdlib_files()
    assert len(files) > 300 and files == sorted(files) and not any('site-packages' in str(f) for f in files)


# --- downloads, from a server on 127.0.0.1 ------------------------------------

@pytest.fixture
def server(tmp_path):
    text = 'First Citizen:\nBefore we proceed any further, hear me speak.\n'
    root = make_corpus(tmp_path / 'www', {'input.txt': text})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_port}', text
    httpd.shutdown()
    httpd.server_close()


def test_download_from_loopback(server, tmp_path, capsys):
    base, text = server
    out = tmp_path / 'data'
    meta = prepare.prepare(dataset='shakespeare', url=f'{base}/input.txt', tokenizer='byte', out_root=str(out))
    assert (out / 'shakespeare' / 'input.txt').read_text() == text
    m, bins = load(out / 'shakespeare')
    assert meta['source'] == f'{base}/input.txt' and m == meta
    assert bytes(np.concatenate([bins['train'], bins['val']]).astype(np.uint8)) == text.encode() + b'\x00'
    # a second run reuses the downloaded file (the url now points nowhere)
    prepare.prepare(dataset='shakespeare', url=f'{base}/gone.txt', tokenizer='byte', out_root=str(out))
    assert 'downloaded before' in capsys.readouterr().out


def test_download_failures_are_one_line_and_suggest_offline_default(server, tmp_path):
    base, _ = server
    closed = 'http://127.0.0.1:1/input.txt'  # nothing listens on port 1
    for url in (f'{base}/missing.txt', closed):
        with pytest.raises(PrepareError) as e:
            prepare.prepare(dataset='tinystories', url=url, tokenizer='byte', out_root=str(tmp_path))
        msg = str(e.value)
        assert '\n' not in msg and url in msg and 'python prepare.py' in msg
        assert not (tmp_path / 'tinystories' / 'input.txt').exists()
        assert not (tmp_path / 'tinystories' / 'input.txt.tmp').exists()


# --- command line -------------------------------------------------------------

def test_cli_flags_and_errors(tmp_path):
    assert prepare.parse_args(['--val_fraction=0.1', '--max_files=3', '--name=x']) == \
        dict(val_fraction=0.1, max_files=3, name='x')
    for bad, expect in [(['--bogus=1'], 'out_root'), (['--max_files=many'], 'int'), (['input=x'], 'bad argument'),
                        (['--dataset=wikipedia'], 'shakespeare'), (['--val_fraction=0'], 'between 0 and 1'),
                        (['--input=a.txt', '--dataset=tinystories'], 'not both')]:
        with pytest.raises(PrepareError, match=expect) as e:
            prepare.main(bad + [f'--out_root={tmp_path}'])
        assert '\n' not in str(e.value)


def test_cli_end_to_end_prints_what_it_wrote(tmp_path):
    make_corpus(tmp_path / 'notes', {'n.md': 'some notes\n' * 100})
    r = subprocess.run([sys.executable, str(HERE / 'prepare.py'), f'--input={tmp_path}/notes/*.md',
                        '--tokenizer=byte', f'--out_root={tmp_path}/data'], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 'train.bin' in r.stdout and 'val.bin' in r.stdout and 'tokenizer byte' in r.stdout
    load(tmp_path / 'data' / 'notes')
    r = subprocess.run([sys.executable, str(HERE / 'prepare.py'), '--vocab_size=256'], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr


# --- shard sets: parquet and JSONL documents ----------------------------------

DOCS = [f"doc {i}: " + 'Ünïcödé 日本語 🙂 ' * (i % 4) + 'word ' * (i * 7 % 23) for i in range(300)]
DOCS[5] = None  # a missing value: an empty document
KILLER = """
import os, signal, sys
import prepare
read = prepare.read_documents
def read_then_die(*args):
    for n, batch in enumerate(read(*args)):
        if n == 6:
            os.kill(os.getpid(), signal.SIGKILL)  # as kill -9: no cleanup at all
        yield batch
prepare.read_documents = read_then_die
prepare.main(sys.argv[1:])
"""


def write_parquet(path, texts, row_group_size=37, column='text'):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: texts, 'id': list(range(len(texts)))}), path, row_group_size=row_group_size)


def write_jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    # a blank line is not a document
    path.write_text(''.join(json.dumps({'id': i, 'text': t}) + '\n' * (1 + (i == 3)) for i, t in enumerate(texts)))


def byte_stream(texts):
    return list(b''.join((t or '').encode() + b'\0' for t in texts))


def load_shards(out_dir):
    """meta.json and every token, val shard first, checking the shard files against the meta."""
    meta = json.loads((out_dir / 'meta.json').read_text())
    shards = meta['val_shards'] + meta['train_shards']
    assert sorted(p.name for p in out_dir.glob('*.bin')) == sorted(s['file'] for s in shards)
    assert not list(out_dir.glob('*.tmp'))
    tokens = [np.fromfile(out_dir / s['file'], dtype=meta['dtype']) for s in shards]
    assert [len(t) for t in tokens] == [s['tokens'] for s in shards]
    return meta, np.concatenate(tokens)


def test_parquet_and_jsonl_documents_become_shards_in_order(tmp_path):
    write_parquet(tmp_path / 'in' / 'a.parquet', DOCS[:150])  # row groups of 37 rows
    write_parquet(tmp_path / 'in' / 'b.parquet', DOCS[150:250], row_group_size=1000)
    write_jsonl(tmp_path / 'in' / 'c.jsonl', DOCS[250:])
    for num_proc in (1, 2):
        out = tmp_path / f'data{num_proc}'
        meta = prepare.prepare(input=str(tmp_path / 'in'), tokenizer='byte', out_root=str(out), shard_tokens=2000,
                               val_tokens=1500, num_proc=num_proc)
        m, tokens = load_shards(out / 'in')
        assert m == meta and meta['complete'] and meta['files'][2][0].endswith('c.jsonl')
        assert tokens.tolist() == byte_stream(DOCS)  # every document once, in order, each followed by the eot
        sizes = [s['tokens'] for s in meta['val_shards'] + meta['train_shards']]
        assert sizes[0] == meta['val_tokens'] == 1500 and set(sizes[1:-1]) == {2000} and 0 < sizes[-1] <= 2000
        assert meta['train_tokens'] == sum(sizes[1:]) and meta['train_shards'][0]['file'] == 'train_000000.bin'
    assert all((tmp_path / 'data1' / 'in' / f).read_bytes() == (tmp_path / 'data2' / 'in' / f).read_bytes()
               for f in os.listdir(tmp_path / 'data1' / 'in'))  # the processes don't change the output


def test_max_tokens_stops_early_and_reruns_continue_after_the_finished_shards(tmp_path, capsys):
    write_jsonl(tmp_path / 'in' / 'docs.jsonl', DOCS)
    args = dict(input=str(tmp_path / 'in' / '*.jsonl'), tokenizer='byte', shard_tokens=2000, val_tokens=1000,
                num_proc=1)
    full = prepare.prepare(**args, out_root=str(tmp_path / 'full'))
    _, all_tokens = load_shards(tmp_path / 'full' / 'in')
    out = tmp_path / 'part'
    part = prepare.prepare(**args, out_root=str(out), max_tokens=6500)
    meta, tokens = load_shards(out / 'in')
    assert tokens.tolist() == all_tokens[:6500].tolist()
    assert [s['tokens'] for s in meta['val_shards'] + meta['train_shards']] == [1000, 2000, 2000, 1500]
    capsys.readouterr()
    assert prepare.prepare(**args, out_root=str(out), max_tokens=6500) == part
    assert 'nothing to do' in capsys.readouterr().out
    # no limit now: the 3 full shards stay, the partial one is redone, and the result is that of one full run
    assert prepare.prepare(**args, out_root=str(out)) == full
    assert 'resuming after 3 finished shard(s) (5,000 tokens)' in capsys.readouterr().out
    assert load_shards(out / 'in')[1].tolist() == all_tokens.tolist()
    # other settings on the same output: an error, not a silent mix or a restart that throws hours away
    with pytest.raises(PrepareError, match=r"holds shards made with other settings \(shard_tokens 2000 -> 3000\)"):
        prepare.prepare(**{**args, 'shard_tokens': 3000}, out_root=str(out))


def test_the_same_command_again_rewrites_a_shard_cut_short(tmp_path, capsys):
    """A complete set whose shard was truncated (a copy cut short): the rerun that train.py asks for redoes it."""
    write_jsonl(tmp_path / 'in' / 'docs.jsonl', DOCS)
    args = dict(input=str(tmp_path / 'in' / '*.jsonl'), tokenizer='byte', shard_tokens=2000, val_tokens=1000,
                num_proc=1, out_root=str(tmp_path / 'data'))
    full = prepare.prepare(**args)
    _, all_tokens = load_shards(tmp_path / 'data' / 'in')
    os.truncate(tmp_path / 'data' / 'in' / 'train_000001.bin', 1000)
    capsys.readouterr()
    assert prepare.prepare(**args) == full
    assert 'nothing to do' not in capsys.readouterr().out
    assert load_shards(tmp_path / 'data' / 'in')[1].tolist() == all_tokens.tolist()


def test_a_small_corpus_just_works_with_a_val_shard_of_one_percent(tmp_path, capsys):
    """Fewer tokens than twice the default --val_tokens (10M): ~1% (here at least 4096) for val, and it says so.
    An explicit --val_tokens is honoured, or refused when the corpus cannot give it."""
    docs = [f'{i} {DOCS[i % 300] or ""}' for i in range(6000)]
    write_jsonl(tmp_path / 'in' / 'docs.jsonl', docs)
    meta = prepare.prepare(input=str(tmp_path / 'in' / '*.jsonl'), tokenizer='byte', shard_tokens=200_000, num_proc=1,
                           out_root=str(tmp_path / 'data'))
    m, tokens = load_shards(tmp_path / 'data' / 'in')
    assert m == meta and meta['complete'] and tokens.tolist() == byte_stream(docs)
    n = len(tokens)
    sizes = [s['tokens'] for s in meta['val_shards'] + meta['train_shards']]
    assert sizes[0] == max(n // 100, 4096) and set(sizes[1:-1]) <= {200_000} and sum(sizes) == n
    assert f"only {n:,} tokens, fewer than twice the default --val_tokens=10,000,000: val_000000.bin gets " \
           f"{sizes[0]:,} of them (~1%)" in capsys.readouterr().out
    assert prepare.prepare(input=str(tmp_path / 'in' / '*.jsonl'), tokenizer='byte', shard_tokens=200_000,
                           num_proc=1, out_root=str(tmp_path / 'data')) == meta  # the same command again
    assert 'nothing to do' in capsys.readouterr().out
    meta = prepare.prepare(input=str(tmp_path / 'in' / '*.jsonl'), tokenizer='byte', val_tokens=5000, num_proc=1,
                           out_root=str(tmp_path / 'explicit'))
    assert meta['val_shards'][0]['tokens'] == 5000
    with pytest.raises(PrepareError, match=rf"only {n:,} tokens in .*: fewer than --val_tokens=1,000,000 for val"):
        prepare.prepare(input=str(tmp_path / 'in' / '*.jsonl'), tokenizer='byte', val_tokens=1_000_000, num_proc=1,
                        out_root=str(tmp_path / 'refused'))


def test_killed_run_resumes_to_the_same_shards(tmp_path):
    """kill -9 in the middle of a parquet file and of a shard (2 processes), then the same command again."""
    docs = [f'{i} {DOCS[i % 300] or ""}' for i in range(3000)]
    write_parquet(tmp_path / 'in' / 'a.parquet', docs[:2000], row_group_size=300)
    write_parquet(tmp_path / 'in' / 'b.parquet', docs[2000:], row_group_size=300)
    (tmp_path / 'killer.py').write_text(KILLER)
    args = [f"--input={tmp_path / 'in' / '*.parquet'}", '--tokenizer=byte', '--shard_tokens=3000', '--val_tokens=2000',
            '--num_proc=2', f'--out_root={tmp_path / "data"}']
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, str(tmp_path / 'killer.py'), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == -9, r.stderr
    killed = json.loads((tmp_path / 'data' / 'in' / 'meta.json').read_text())
    assert not killed['complete'] and len(killed['train_shards']) >= 3
    r = subprocess.run([sys.executable, str(HERE / 'prepare.py'), *args], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"resuming after {len(killed['train_shards']) + 1} finished shard(s)" in r.stdout
    meta, tokens = load_shards(tmp_path / 'data' / 'in')
    assert tokens.tolist() == byte_stream(docs)
    assert meta['val_shards'] + meta['train_shards'][:len(killed['train_shards'])] == \
        killed['val_shards'] + killed['train_shards']
    assert meta == prepare.prepare(input=str(tmp_path / 'in' / '*.parquet'), tokenizer='byte', shard_tokens=3000,
                                   val_tokens=2000, num_proc=1, out_root=str(tmp_path / 'again'))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A stand-in for the Hugging Face hub on 127.0.0.1, where HF_ENDPOINT points: the tree listing of the
    fineweb-edu dataset in two pages (Link header), and its files, through a redirect as the hub's resolve route."""
    write_parquet(tmp_path / 'hub' / '000_00000.parquet', DOCS[:200], row_group_size=50)
    write_parquet(tmp_path / 'hub' / '001_00000.parquet', DOCS[200:], row_group_size=50)
    files = {name: (tmp_path / 'hub' / name).read_bytes() for name in ('000_00000.parquet', '001_00000.parquet')}
    sizes = {name: len(data) for name, data in files.items()}  # what the listing says, even if a test cuts a file
    tree = '/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/sample/10BT'
    requests_seen = []

    def entry(name):
        return dict(type='file', path=f'sample/10BT/{name}', size=sizes[name], oid='x')

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests_seen.append(self.path)
            resolve = '/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT/'
            if self.path == tree:
                body, headers = [entry('000_00000.parquet'), dict(type='directory', path='sample/10BT/x'),
                                 dict(type='file', path='sample/10BT/README.md', size=1)], \
                    {'Link': f'<http://127.0.0.1:{self.server.server_port}{tree}?cursor=2>; rel="next"'}
            elif self.path == tree + '?cursor=2':
                body, headers = [entry('001_00000.parquet')], {}
            elif self.path.startswith(resolve) and self.path[len(resolve):] in files:
                self.send_response(302)
                self.send_header('Location', '/cdn/' + self.path[len(resolve):])
                self.end_headers()
                return
            elif self.path.startswith('/cdn/'):
                data = files[self.path[len('/cdn/'):]]
                self.send_response(200)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            else:
                self.send_error(404)
                return
            data = json.dumps(body).encode()
            self.send_response(200)
            for k, v in {'Content-Type': 'application/json', 'Content-Length': str(len(data)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Hub)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    monkeypatch.setenv('HF_ENDPOINT', f'http://127.0.0.1:{httpd.server_port}')
    yield requests_seen, files
    httpd.shutdown()
    httpd.server_close()


def test_hub_dataset_downloads_only_what_it_reads_and_resumes(hub, tmp_path, capsys):
    requests_seen, files = hub
    args = dict(dataset='fineweb-edu', tokenizer='byte', out_root=str(tmp_path / 'data'), shard_tokens=2000,
                val_tokens=1000, num_proc=1)
    meta = prepare.prepare(**args, max_tokens=5000)  # within the first file: the second is not downloaded
    assert not any('001_00000' in r for r in requests_seen)
    assert meta['source'] == 'hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT'
    assert meta['files'] == [[f'sample/10BT/{name}', len(data)] for name, data in files.items()]  # README.md is not
    out = tmp_path / 'data' / 'fineweb-edu'
    assert load_shards(out)[1].tolist() == byte_stream(DOCS)[:5000]
    meta = prepare.prepare(**args)
    assert 'resuming after 3 finished shard(s)' in capsys.readouterr().out
    assert load_shards(out)[1].tolist() == byte_stream(DOCS) and meta['complete']
    for name, data in files.items():
        assert (out / 'download' / 'sample' / '10BT' / name).read_bytes() == data
    # the same parquet files, local, give the same shards
    local = prepare.prepare(**{**args, 'dataset': 'stdlib'}, input=str(tmp_path / 'hub' / '*.parquet'), name='local')
    assert [local[k] == meta[k] for k in ('val_shards', 'train_shards')] == [True, True]


def test_hub_failures_are_one_line(hub, tmp_path):
    requests_seen, files = hub
    with pytest.raises(PrepareError, match=r"listing HuggingFaceFW/fineweb-edu/sample/nothing at .* failed "
                                           r"\(Not Found\)\. Offline\?") as e:
        prepare.prepare(dataset='fineweb-edu', subset='sample/nothing', tokenizer='byte', out_root=str(tmp_path))
    assert '\n' not in str(e.value)
    files['001_00000.parquet'] = files['001_00000.parquet'][:100]  # the listing says more: a truncated download
    with pytest.raises(PrepareError, match=r"download of .*001_00000.parquet failed \(got 100 bytes of [\d,]+\)"):
        prepare.prepare(dataset='fineweb-edu', tokenizer='byte', out_root=str(tmp_path), val_tokens=1000, num_proc=1)
    assert not list((tmp_path / 'fineweb-edu' / 'download' / 'sample' / '10BT').glob('001*'))


def test_parquet_without_pyarrow_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'pyarrow', None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, 'pyarrow.parquet', None)
    (tmp_path / 'a.parquet').write_bytes(b'PAR1')
    for args in (dict(input=str(tmp_path / 'a.parquet')), dict(dataset='slimpajama')):
        with pytest.raises(PrepareError, match=r'^reading parquet needs pyarrow, which is not installed: '
                                               r'pip install pyarrow$'):
            prepare.prepare(**args, tokenizer='byte', out_root=str(tmp_path / 'data'))


def test_bad_shard_inputs_and_settings_are_one_line(tmp_path):
    write_parquet(tmp_path / 'other' / 'x.parquet', ['a', 'b'], column='content')
    (tmp_path / 'notparquet').mkdir()
    (tmp_path / 'notparquet' / 'y.parquet').write_text('not parquet')
    write_jsonl(tmp_path / 'badjson' / 'z.jsonl', ['fine'])
    with open(tmp_path / 'badjson' / 'z.jsonl', 'a') as f:
        f.write('{"txt": "no text field"}\n')
    write_jsonl(tmp_path / 'small' / 's.jsonl', ['tiny'])
    (tmp_path / 'mixed').mkdir()
    (tmp_path / 'mixed' / 'a.txt').write_text('text')
    write_jsonl(tmp_path / 'mixed' / 'b.jsonl', ['doc'])
    (tmp_path / 'a_file').write_text('')
    cases = [
        (dict(input=str(tmp_path / 'nowhere' / '*.parquet')), "no input files found at"),
        (dict(input=str(tmp_path / 'other')), "x.parquet has no text column 'text' (its columns: content, id): "
                                              "give --text_column=NAME"),
        (dict(input=str(tmp_path / 'notparquet')), "y.parquet is not a readable parquet file"),
        (dict(input=str(tmp_path / 'badjson')), "z.jsonl line 2: not a JSON object with a string 'text'"),
        (dict(input=str(tmp_path / 'small')), "only 5 tokens in"),
        (dict(input=str(tmp_path / 'mixed')), "mixes text files and .parquet/.jsonl files"),
        (dict(input=str(tmp_path / 'small'), out_root=str(tmp_path / 'a_file' / 'data')), "cannot write to"),
        (dict(num_proc=-1), "--num_proc must be at least 0 (0: all cores), got -1"),
        (dict(max_tokens=-5), "--max_tokens must be at least 0 (0: no limit), got -5"),
        (dict(shard_tokens=0), "--shard_tokens must be at least 1, got 0"),
        (dict(val_tokens=0), "--val_tokens must be at least 1, got 0"),
        (dict(max_tokens=1000, val_tokens=600), "--max_tokens=1,000 leaves fewer train tokens than the 600 val"),
        (dict(subset='sample/100BT'), "--subset is a folder of a hub dataset"),
    ]
    for args, expect in cases:
        with pytest.raises(PrepareError, match=re.escape(expect)) as e:
            prepare.prepare(**{'tokenizer': 'byte', 'out_root': str(tmp_path / 'data'), **args})
        assert '\n' not in str(e.value)
    assert prepare.parse_args(['--max_tokens=1e9', '--num_proc=2']) == dict(max_tokens=10 ** 9, num_proc=2)
    with pytest.raises(PrepareError, match="--max_tokens expects int, got '1.5e0'"):
        prepare.parse_args(['--max_tokens=1.5e0'])

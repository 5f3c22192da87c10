"""Tests for prepare.py: fast, offline, everything written under pytest's tmp_path."""
import functools
import http.server
import json
import platform
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import tiktoken

import prepare
from prepare import PrepareError, get_tokenizer

HERE = Path(__file__).parent


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
        name, vocab_size, eot_token = 'big', 100_000, 99_999

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

    def interrupted(self, text):
        if 'more' in text:
            raise KeyboardInterrupt
        return list(text.encode())

    monkeypatch.setattr(prepare.ByteTokenizer, 'encode', interrupted)
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

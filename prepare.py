"""
Turn text into the token files that train.py reads (nanoGPT layout):

    data/<name>/train.bin   flat array of token ids, read with np.memmap
    data/<name>/val.bin     the last ~0.5% of the tokens (at least a few thousand)
    data/<name>/meta.json   tokenizer, vocab_size, dtype, token counts, source

Usage (all flags are --key=value):

    python prepare.py                                # offline default: Python's own stdlib source
    python prepare.py --input=notes.txt              # a local file            -> data/notes/
    python prepare.py --input=docs/ --name=docs      # a directory of .txt/.md/.py files
    python prepare.py --input='src/**/*.py'          # a glob (quote it)       -> data/src/
    python prepare.py --dataset=shakespeare          # download tiny Shakespeare (1 MB)
    python prepare.py --dataset=tinystories          # download TinyStories' validation split (~19 MB)
    python prepare.py --tokenizer=byte               # raw UTF-8 bytes: vocab 256, never downloads

Tokenizers: gpt2 (tiktoken, vocab 50257; its vocabulary is downloaded once and cached),
byte (vocab 256, exact round trip), auto (default: gpt2 if it loads, else byte).
Documents (files, or pieces of text split at a literal <|endoftext|>, as TinyStories
uses) are each followed by the tokenizer's eot_token: 50256 for gpt2, byte 0 (NUL) for byte.
"""
import glob
import inspect
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

DATASETS = {  # name -> (url, what it is)
    'shakespeare': ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
                    'tiny Shakespeare, 1.1 MB'),
    'tinystories': ('https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt',
                    'TinyStories validation split, ~19 MB of plain text'),
}
TEXT_SUFFIXES = ('.txt', '.md', '.py')
EOT_TEXT = '<|endoftext|>'
MIN_VAL_TOKENS = 4096     # a 0.5% split of a small corpus is too few tokens for a stable val loss
CHUNK_BYTES = 1 << 20     # read ~1 MB at a time, so memory stays flat whatever the corpus size


class PrepareError(SystemExit):
    """A user error. Being a SystemExit, it ends the program with its one-line message, no traceback."""


# -----------------------------------------------------------------------------
# tokenizers: encode(str) -> list[int], decode(list[int]) -> str, vocab_size, name, eot_token

class ByteTokenizer:
    name, vocab_size, eot_token = 'byte', 256, 0

    def encode(self, text):
        return list(text.encode('utf-8'))

    def decode(self, ids):
        # a model can sample byte sequences that are not valid UTF-8: show them as U+FFFD, don't crash
        return bytes(ids).decode('utf-8', errors='replace')


class GPT2Tokenizer:
    name = 'gpt2'

    def __init__(self):
        import tiktoken
        try:
            self.enc = tiktoken.get_encoding('gpt2')
        except Exception as e:  # offline: requests' ConnectionError; also HTTP errors, a corrupt cache
            raise PrepareError(f"gpt2 tokenizer unavailable: tiktoken could not download the GPT-2 vocabulary "
                               f"({type(e).__name__}; offline?). Use --tokenizer=byte, or set TIKTOKEN_CACHE_DIR "
                               f"to a directory holding a cached copy.") from None
        self.vocab_size, self.eot_token = self.enc.n_vocab, self.enc.eot_token  # 50257, 50256

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # ordinary: '<|endoftext|>' in user text is just text

    def decode(self, ids):
        return self.enc.decode(list(ids))  # tiktoken already decodes with errors='replace'


def get_tokenizer(name):
    """'gpt2', 'byte', or 'auto' (gpt2 when its vocabulary loads, else byte). sample.py imports this."""
    if name == 'byte':
        return ByteTokenizer()
    if name == 'gpt2':
        return GPT2Tokenizer()
    if name == 'auto':
        try:
            return GPT2Tokenizer()
        except PrepareError:
            print("tokenizer: auto -> byte (the gpt2 vocabulary could not be downloaded; this is fine offline)")
            return ByteTokenizer()
    raise PrepareError(f"unknown tokenizer {name!r}: use --tokenizer=auto, gpt2 or byte")


def dtype_for(vocab_size):
    return 'uint16' if vocab_size <= 65536 else 'uint32'  # token ids run 0..vocab_size-1


# -----------------------------------------------------------------------------
# sources: the files to tokenize, in a fixed order, and a line saying where they came from

def stdlib_files():
    root = Path(sysconfig.get_paths()['stdlib'])
    # installed packages differ between machines, and the test suites are full of deliberately odd files
    skip = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test', '__pycache__'}
    files = sorted(p for p in root.rglob('*.py') if not skip & set(p.relative_to(root).parts))
    return files, f"Python {platform.python_version()} standard library source ({root})"


def local_files(pattern):
    p = Path(pattern)
    if p.is_file():
        return [p], str(p)
    if p.is_dir():
        # hidden folders (.git, .venv) are tooling, not the user's text
        files = sorted(f for f in p.rglob('*') if f.suffix in TEXT_SUFFIXES and f.is_file()
                       and not any(part.startswith('.') for part in f.relative_to(p).parts))
    else:
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise PrepareError(f"no input files found at {pattern!r}: give a file, a directory of "
                           f"{'/'.join(TEXT_SUFFIXES)} files, or a glob such as 'notes/*.txt'")
    return files, pattern


def name_from_input(pattern):
    head = Path(pattern.split('*')[0].split('?')[0].split('[')[0])  # the part before any wildcard
    if head.is_file():
        return head.stem
    return (head.resolve() if head.is_dir() else head).name or 'input'


def download(url, path):
    """Fetch url to path once (later runs reuse it); a failure is one line that points to the offline default."""
    if path.exists():
        print(f"using {path} (downloaded before; delete it to fetch again)")
        return
    tmp = path.with_name(path.name + '.tmp')
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, 'wb') as f, \
                tqdm(total=int(r.headers.get('Content-Length') or 0) or None, unit='B', unit_scale=True,
                     desc=f"downloading {url}") as bar:
            while block := r.read(CHUNK_BYTES):
                f.write(block)
                bar.update(len(block))
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are all OSErrors
        tmp.unlink(missing_ok=True)
        raise PrepareError(f"download of {url} failed ({getattr(e, 'reason', e)}). Offline? `python prepare.py` "
                           f"needs no download (Python stdlib corpus), or use --input=your_text.txt") from None
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# tokenising

def token_chunks(files, tok, bar):
    """Yield lists of token ids, ~1 MB of text at a time, with tok.eot_token after each document."""
    for path in files:
        with open(path, 'rb') as f:
            # Binary mode keeps '\r\n' exact, and a chunk of whole lines never splits a UTF-8 character
            # (nor a literal <|endoftext|>); gpt2 merges can't cross a chunk edge, which costs next to nothing.
            while lines := f.readlines(CHUNK_BYTES):
                data = b''.join(lines)
                for i, piece in enumerate(data.decode('utf-8', errors='replace').split(EOT_TEXT)):
                    if i:
                        yield [tok.eot_token]
                    yield tok.encode(piece)
                bar.update(len(data))
        yield [tok.eot_token]


def prepare(dataset='stdlib', input='', name='', url='', tokenizer='auto', val_fraction=0.005,
            out_root='data', max_files=0):
    """Write data/<name>/{train.bin,val.bin,meta.json} and return the meta dict."""
    t0 = time.time()
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    if input and (url or dataset != 'stdlib'):
        raise PrepareError("give either --input=PATH or --dataset=NAME/--url=URL, not both")
    if not input and not url and dataset not in ('stdlib', *DATASETS):
        raise PrepareError(f"unknown dataset {dataset!r}: use one of stdlib, {', '.join(DATASETS)} "
                           f"(or --input=PATH for your own text)")
    downloading = not input and (url or dataset != 'stdlib')
    python_version = None
    if input:
        name = name or name_from_input(input)
        files, source = local_files(input)
    elif not downloading:
        name = name or 'stdlib'
        files, source = stdlib_files()
        python_version = platform.python_version()
    tok = get_tokenizer(tokenizer)  # before any download, so a missing gpt2 vocabulary fails fast
    if downloading:
        name = name or (dataset if dataset != 'stdlib' else Path(url).stem or 'download')
        if dataset in DATASETS:
            print(f"{dataset}: {DATASETS[dataset][1]}")
            url = url or DATASETS[dataset][0]
        (Path(out_root) / name).mkdir(parents=True, exist_ok=True)
        files, source = [Path(out_root) / name / 'input.txt'], url
        download(url, files[0])
    files = files[:max_files] if max_files > 0 else files
    total_bytes = sum(f.stat().st_size for f in files)
    if total_bytes == 0:
        raise PrepareError(f"the input has no text ({len(files)} empty file(s) from {source}): nothing to tokenize")

    out_dir = Path(out_root) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for(tok.vocab_size)
    print(f"tokenizing {len(files):,} file(s), {total_bytes / 1e6:.1f} MB from {source} "
          f"with {tok.name} (vocab {tok.vocab_size:,}, {dtype})")

    # Stream every token into one temp file, then cut it: the tail is val, the rest becomes train.
    # Temp names then os.replace, so an interrupted run never leaves a half-written .bin for train.py.
    all_tmp, val_tmp = out_dir / 'train.bin.tmp', out_dir / 'val.bin.tmp'
    try:
        n = 0
        with open(all_tmp, 'wb') as f, tqdm(total=total_bytes, unit='B', unit_scale=True, desc='tokenizing') as bar:
            for ids in token_chunks(files, tok, bar):
                arr = np.asarray(ids, dtype=dtype)
                f.write(arr.tobytes())
                n += len(arr)
        n_val = max(round(n * val_fraction), min(MIN_VAL_TOKENS, n // 10))
        n_train = n - n_val
        if n_val < 1 or n_train < 1:
            raise PrepareError(f"only {n} tokens in {source}: too little text to split into train and val")
        itemsize = np.dtype(dtype).itemsize
        with open(all_tmp, 'rb') as src, open(val_tmp, 'wb') as dst:
            src.seek(n_train * itemsize)
            shutil.copyfileobj(src, dst)
        os.truncate(all_tmp, n_train * itemsize)
    except BaseException:  # includes Ctrl-C: leave no temp files behind
        all_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
        raise

    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=dtype, train_tokens=n_train, val_tokens=n_val,
                eot_token=tok.eot_token,
                doc_separator=f"token {tok.eot_token} ({'<|endoftext|>' if tok.name == 'gpt2' else 'NUL byte'}) "
                              f"after each file, and in place of each literal <|endoftext|> in the text",
                source=source, num_files=len(files), text_bytes=total_bytes, python_version=python_version,
                val_fraction=val_fraction)
    # Remove the old meta first and write the new one last: train.py sees either a complete old set,
    # no meta.json (it asks you to run prepare.py), or a complete new set; never new bins with old meta.
    meta_path = out_dir / 'meta.json'
    meta_path.unlink(missing_ok=True)
    os.replace(all_tmp, out_dir / 'train.bin')
    os.replace(val_tmp, out_dir / 'val.bin')
    meta_tmp = out_dir / 'meta.json.tmp'
    meta_tmp.write_text(json.dumps(meta, indent=2) + '\n')
    os.replace(meta_tmp, meta_path)

    mb = itemsize / 1e6
    print(f"wrote {out_dir}/ in {time.time() - t0:.1f}s: train.bin {n_train:,} tokens ({n_train * mb:.1f} MB), "
          f"val.bin {n_val:,} tokens ({n_val * mb:.1f} MB), meta.json; tokenizer {tok.name} "
          f"(vocab {tok.vocab_size:,}, {dtype})")
    return meta


def parse_args(argv):
    """nanoGPT-style --key=value flags; each value takes the type of prepare()'s default."""
    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    config = {}
    for arg in argv:
        if arg in ('-h', '--help'):
            print(__doc__)
            sys.exit(0)
        key, eq, value = arg[2:].partition('=')
        if not arg.startswith('--') or not eq or key not in defaults:
            raise PrepareError(f"bad argument {arg!r}: use --key=value with key one of {', '.join(defaults)}")
        try:
            config[key] = type(defaults[key])(value)
        except ValueError:
            raise PrepareError(f"--{key} expects {type(defaults[key]).__name__}, got {value!r}") from None
    return config


def main(argv=None):
    return prepare(**parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
    main()

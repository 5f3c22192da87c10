"""
Turn text into the token files that train.py reads (nanoGPT layout):

    data/<name>/train.bin   flat array of token ids, read with np.memmap
    data/<name>/val.bin     the last ~0.5% of the tokens (at least a few thousand)
    data/<name>/meta.json   tokenizer, vocab_size, dtype, token counts, source

or, for corpora of documents in parquet or JSONL files (FineWeb-Edu, SlimPajama, your own), a shard set:

    data/<name>/val_000000.bin, train_000000.bin, train_000001.bin, ...   uint16 token ids, shard_tokens each
    data/<name>/meta.json   the same fields, plus the shards and where each one ends in the documents

Usage (all flags are --key=value):

    python prepare.py                                # offline default: Python's own stdlib source
    python prepare.py --input=notes.txt              # a local file            -> data/notes/
    python prepare.py --input=docs/ --name=docs      # a directory of .txt/.md/.py files
    python prepare.py --input='src/**/*.py'          # a glob (quote it)       -> data/src/
    python prepare.py --dataset=shakespeare          # download tiny Shakespeare (1 MB)
    python prepare.py --dataset=tinystories          # download TinyStories' validation split (~19 MB)
    python prepare.py --tokenizer=byte               # raw UTF-8 bytes: vocab 256, never downloads

    python prepare.py --dataset=fineweb-edu          # FineWeb-Edu sample/10BT from the Hugging Face hub -> shards
    python prepare.py --dataset=fineweb-edu --subset=sample/100BT    # another folder of it
    python prepare.py --dataset=fineweb-edu --max_tokens=1e9         # stop after 1B tokens (files download as needed)
    python prepare.py --dataset=slimpajama           # SlimPajama-6B (the paper's corpus, a 6B-token sample of it)
    python prepare.py --input='shards/*.parquet' --text_column=text  # local parquet and/or JSONL files -> shards

Tokenizers: gpt2 (tiktoken, vocab 50257; its vocabulary is downloaded once and cached),
byte (vocab 256, exact round trip), auto (default: gpt2 if it loads, else byte), and hf:DIR, the tokenizer.json of
a Hugging Face model directory (pip install tokenizers), to train a model loaded with --init_from=hf on (hf.py).
Offline gpt2: GPT2_BPE_FILE=path/to/gpt2.tiktoken (GPT-2's BPE ranks in tiktoken's format, as the openai-whisper
sdist ships them in whisper/assets/; checked against GPT-2's sha256) makes gpt2 load from that file, no download.
Documents (files, or pieces of text split at a literal <|endoftext|>, as TinyStories
uses; or the rows of parquet/JSONL files) are each followed by the tokenizer's eot_token: 50256 for gpt2, byte 0
(NUL) for byte.

Shard sets: val_000000.bin holds the first val_tokens (default 10M; a corpus of fewer than 20M tokens gets ~1%,
at least 4096) tokens, then come train shards of shard_tokens (default 100M) each, until the documents end or
max_tokens (val included) are written. Documents are read in batches (parquet one row group at a time), so memory
stays flat whatever the corpus size, and tokenized by num_proc processes (0: all cores). Each shard is written to a
temp file and renamed, and meta.json records where the next shard starts: run the same command again after an
interruption (Ctrl-C, kill -9, a lost connection) and it keeps the finished shards and downloads and writes what an
uninterrupted run writes.
Parquet needs pyarrow (pip install pyarrow). Downloads come from $HF_ENDPOINT (default https://huggingface.co).
"""
import errno
import glob
import json
import os
import platform
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configurator import check_ranges, configure, first_line, function_namespace
from documents import CHUNK_BYTES, download, hub_files, hub_url, import_parquet, read_documents, tokenized
from tokenizer import EOT_TEXT, PrepareError, dtype_for, get_tokenizer

DATASETS = {  # name -> (url, what it is)
    'shakespeare': ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt',
                    'tiny Shakespeare, 1.1 MB'),
    'tinystories': ('https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories-valid.txt',
                    'TinyStories validation split, ~19 MB of plain text'),
}
HUB_DATASETS = {  # name -> (hub dataset, default folder (--subset), its files to read, what it is)
    'fineweb-edu': ('HuggingFaceFW/fineweb-edu', 'sample/10BT', '*.parquet',
                    'FineWeb-Edu, educational web pages; sample/10BT is ~10B GPT-2 tokens'),
    'slimpajama': ('DKYoon/SlimPajama-6B', 'data', 'train-*.parquet',
                   "SlimPajama-6B, a 6B-token random sample of SlimPajama-627B (the paper's corpus): 48 parquet "
                   "files, ~14 GB"),
}
TEXT_SUFFIXES = ('.txt', '.md', '.py')
TABLE_SUFFIXES = ('.parquet', '.jsonl')  # documents in rows: these become a shard set
MIN_VAL_TOKENS = 4096     # a 0.5% split of a small corpus is too few tokens for a stable val loss
VAL_TOKENS = 10_000_000   # prepare()'s default val_tokens: a corpus of fewer than twice it gets ~1% for val


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
        files = sorted(f for f in p.rglob('*') if f.suffix in TEXT_SUFFIXES + TABLE_SUFFIXES and f.is_file()
                       and not any(part.startswith('.') for part in f.relative_to(p).parts))
    else:
        files = sorted(Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
    if not files:
        raise PrepareError(f"no input files found at {pattern!r}: give a file, a directory of "
                           f"{'/'.join(TEXT_SUFFIXES + TABLE_SUFFIXES)} files, or a glob such as 'notes/*.txt'")
    return files, pattern


def name_from_input(pattern):
    head = Path(pattern.split('*')[0].split('?')[0].split('[')[0])  # the part before any wildcard
    if head.is_file():
        return head.stem
    return (head.resolve() if head.is_dir() else head).name or 'input'


# -----------------------------------------------------------------------------
# tokenising

def token_chunks(files, tok, bar):
    """Yield lists of token ids, ~1 MB of text at a time, with tok.eot_token after each document. The byte
    tokenizer takes the file's bytes as they are, so its round trip is exact even where they are not UTF-8; gpt2
    needs text, so bytes that are not UTF-8 become U+FFFD, and a line says so."""
    for path in files:
        replaced = 0
        with open(path, 'rb') as f:
            # Binary mode keeps '\r\n' exact, and a chunk of whole lines never splits a UTF-8 character
            # (nor a literal <|endoftext|>); gpt2 merges can't cross a chunk edge, which costs next to nothing.
            while lines := f.readlines(CHUNK_BYTES):
                data = b''.join(lines)
                if tok.name == 'byte':
                    pieces = data.split(EOT_TEXT.encode())
                else:
                    try:
                        text = data.decode('utf-8')
                    except UnicodeDecodeError:
                        text = data.decode('utf-8', errors='replace')
                        replaced += text.count('\ufffd') - data.count('\ufffd'.encode())
                    pieces = text.split(EOT_TEXT)
                for i, piece in enumerate(pieces):
                    if i:
                        yield [tok.eot_token]
                    yield tok.encode(piece)
                bar.update(len(data))
        if replaced:
            tqdm.write(f"{path}: {replaced:,} invalid UTF-8 sequence(s) read as U+FFFD for {tok.name} "
                       f"(--tokenizer=byte keeps every byte)")
        yield [tok.eot_token]


def io_error(e, out_dir, inputs=()):
    """The one-line PrepareError for an OSError while reading the inputs or writing out_dir (a full disk, a file
    or folder that cannot be written)."""
    reason = e.strerror or first_line(e)
    if e.filename is not None and str(e.filename) in {str(p) for p in inputs}:
        return PrepareError(f"cannot read {e.filename} ({reason})")
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return PrepareError(f"cannot write to {out_dir}/ ({reason}): free some disk space, or give another "
                            f"--out_root, and run the same command again")
    return PrepareError(f"cannot write to {out_dir}/ ({reason}): give a writable --out_root")


def make_out_dir(out_root, name):
    out_dir = Path(out_root) / name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / '.write_test').touch()  # fail now, not after an hour of tokenizing
        (out_dir / '.write_test').unlink()
    except OSError as e:
        raise PrepareError(f"cannot write to {out_dir}/ ({e.strerror or e}): give a writable --out_root") from None
    return out_dir


# -----------------------------------------------------------------------------
# shard sets: documents from parquet or JSONL files, tokenized in parallel into fixed-size shards

def shard_name(j):
    return 'val_000000.bin' if j == 0 else f'train_{j - 1:06d}.bin'  # the val shard comes first in the stream


def write_meta(meta, out_dir, done, max_tokens, complete):
    """meta.json with the finished shards (done, val first), one line per field and per list item (per file, per
    shard), written atomically."""
    meta.update(train_tokens=sum(s['tokens'] for s in done[1:]), max_tokens=max_tokens, complete=complete,
                val_shards=done[:1], train_shards=done[1:])
    meta_path = out_dir / 'meta.json'
    fields = [f'  {json.dumps(k)}: ' + (json.dumps(v) if not isinstance(v, list) else
              '[' + ','.join(f'\n    {json.dumps(item)}' for item in v) + '\n  ]') for k, v in meta.items()]
    tmp = meta_path.with_name(meta_path.name + '.tmp')
    tmp.write_text('{\n' + ',\n'.join(fields) + '\n}\n')
    os.replace(tmp, meta_path)


def finished_shards(meta, out_dir, max_tokens):
    """(meta.json of an earlier run on out_dir, the shards of it that this run keeps, in stream order: val first).
    None instead of the shards when that run wrote what this one would: nothing to do. A run made with other
    settings is an error: a silent mix, or a restart that throws hours away, would be worse."""
    meta_path, itemsize = out_dir / 'meta.json', np.dtype(meta['dtype']).itemsize
    try:
        old = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if not isinstance(old, dict) or ('train_shards' in old and not all(
                k in old for k in ('complete', 'max_tokens', 'val_shards', 'val_tokens', 'train_tokens'))):
            raise ValueError('not a meta.json of prepare.py')
    except (OSError, ValueError) as e:
        raise PrepareError(f"{meta_path} cannot be read ({first_line(e)}): delete it to start over") from None
    if 'train_shards' not in old:
        return old, []
    changed = ['the input files' if k == 'files' else f"{k} {old.get(k)!r} -> {v!r}"
               for k, v in meta.items() if old.get(k) != v]
    if changed:
        raise PrepareError(f"{out_dir}/ holds shards made with other settings ({', '.join(changed)}): delete "
                           f"{meta_path} to start over, or give another --name")
    shards = old['val_shards'] + old['train_shards']
    if old['complete'] and old['max_tokens'] == max_tokens and all(  # and no shard was cut short since
            (out_dir / s['file']).exists() and (out_dir / s['file']).stat().st_size == s['tokens'] * itemsize
            for s in shards):
        print(f"{out_dir}/ is already complete ({sum(s['tokens'] for s in shards):,} tokens): nothing to do")
        return old, None
    done = []  # the finished shards, in the order of the token stream: val_000000.bin, train_000000.bin, ...
    for shard in shards:
        target = meta['val_tokens'] if not done else meta['shard_tokens']
        kept = sum(s['tokens'] for s in done) + target
        path = out_dir / shard['file']
        if shard['tokens'] != target or (max_tokens and kept > max_tokens) or not path.exists() \
                or path.stat().st_size != target * itemsize:
            break  # a partial last shard, one past a smaller --max_tokens, or a damaged one: redo it from its start
        done.append(shard)
    return old, done


def split_small_set(out_dir, done, dtype, shard_tokens):
    """The finished shards of a corpus smaller than twice the default val_tokens, split again: ~1% of the tokens
    (at least MIN_VAL_TOKENS) for val_000000.bin, the rest for the train shards. The tokens fit in memory (fewer
    than 20M); each file is written to a temp file, then renamed."""
    tokens = np.concatenate([np.fromfile(out_dir / s['file'], dtype=dtype) for s in done])
    n_val = max(len(tokens) // 100, MIN_VAL_TOKENS)
    pieces = [tokens[:n_val]] + [tokens[i:i + shard_tokens] for i in range(n_val, len(tokens), shard_tokens)]
    for j, piece in enumerate(pieces):
        tmp = out_dir / (shard_name(j) + '.tmp')
        piece.tofile(tmp)
        os.replace(tmp, out_dir / shard_name(j))
    # where each shard ends in the documents is known for the last one only: a rerun redoes all of them
    return [dict(file=shard_name(j), tokens=len(piece), end=done[-1]['end'] if j == len(pieces) - 1 else None)
            for j, piece in enumerate(pieces)]


def final_shards(out_dir, done, written, source, dtype, shard_tokens, val_tokens, small_val):
    """The finished shards as the set keeps them, once the documents ended: a small corpus (small_val: val_tokens is
    the default) split again with ~1% for val; too few tokens for val_tokens is an error, and the shards go (so that
    a rerun with a smaller --val_tokens starts afresh). Other token files in out_dir go too."""
    if small_val and 2 * MIN_VAL_TOKENS <= written < 2 * val_tokens:  # ~1% for val, not the default val_tokens
        done = split_small_set(out_dir, done, dtype, shard_tokens)
        print(f"only {written:,} tokens, fewer than twice the default --val_tokens={val_tokens:,}: val_000000.bin "
              f"gets {done[0]['tokens']:,} of them (~1%), the train shards the rest")
    elif not done or done[0]['tokens'] < val_tokens or written - done[0]['tokens'] < val_tokens:
        for shard in done:
            (out_dir / shard['file']).unlink(missing_ok=True)
        (out_dir / 'meta.json').unlink(missing_ok=True)
        raise PrepareError(f"only {written:,} tokens in {source}: fewer than --val_tokens={val_tokens:,} for val and "
                           f"as many again for train; give a smaller --val_tokens, e.g. {max(written // 100, 1)}")
    names = {s['file'] for s in done}
    for path in [*out_dir.glob('train_*.bin'), *out_dir.glob('val_*.bin'), out_dir / 'train.bin', out_dir / 'val.bin']:
        if path.name not in names:  # shards of an earlier, longer run, or the single-file layout's bins
            path.unlink(missing_ok=True)
    return done


def prepare_shards(sources, source, tok, out_dir, text_column, num_proc, max_tokens, shard_tokens, val_tokens,
                   small_val=False):
    """Tokenize the documents of parquet/JSONL files into val_000000.bin (the first val_tokens tokens) and
    train_000000.bin, ... (shard_tokens each) until the documents end or max_tokens are written. Each shard goes to
    a temp file, renamed when complete, and meta.json, rewritten after each shard, records where in the documents
    the next shard starts: a rerun of the same command continues after the last finished shard, and writes what
    an uninterrupted run writes. meta.json says complete: true only at the end (train.py waits for that).
    small_val (val_tokens is the default): a corpus of fewer than 2 * val_tokens gets a val shard of ~1% instead."""
    t0, dtype = time.time(), dtype_for(tok.vocab_size)
    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=dtype, eot_token=tok.eot_token,
                doc_separator=f"token {tok.eot_token} after each document", source=source, **tok.meta,
                files=[[name, size] for name, size, _, _ in sources], text_column=text_column,
                shard_tokens=shard_tokens, val_tokens=val_tokens)
    old, done = finished_shards(meta, out_dir, max_tokens)
    if done is None:
        return old
    written = sum(s['tokens'] for s in done)
    file_index, row, skip = done[-1]['end'] if done else (0, 0, 0)
    budget = max_tokens or float('inf')
    print(f"tokenizing {len(sources):,} file(s) from {source} with {tok.name} (vocab {tok.vocab_size:,}, {dtype}), "
          f"{num_proc} process(es): val {val_tokens:,} tokens, then train shards of {shard_tokens:,}"
          + (f", up to {max_tokens:,} tokens in all" if max_tokens else ''))
    if done:
        print(f"resuming after {len(done)} finished shard(s) ({written:,} tokens): at file {file_index + 1}, "
              f"row {row:,}")

    def finish(end):
        """The shard in tmp is complete: give it its name, and record it with where the next one starts."""
        out.close()
        os.replace(tmp, out_dir / shard_name(len(done)))
        done.append(dict(file=shard_name(len(done)), tokens=n, end=end))
        write_meta(meta, out_dir, done, max_tokens, complete=False)

    out = tmp = None
    start_tokens, docs = written, 0
    stream = tokenized(read_documents(sources, text_column, (file_index, row)), tok, dtype, num_proc)
    bar = tqdm(total=max_tokens or None, initial=written, unit='tok', unit_scale=True, desc='tokenizing')
    try:
        for file_index, row, ids, lens in stream:
            starts = np.cumsum(lens) - lens  # where each document begins in ids
            i, skip = skip, 0  # resuming: the first document's first skip tokens are in the last finished shard
            while i < len(ids) and written < budget:
                if out is None:
                    tmp = out_dir / (shard_name(len(done)) + '.tmp')
                    out, n = open(tmp, 'wb'), 0
                    size = min(val_tokens if not done else shard_tokens, budget - written)  # this shard's tokens
                take = min(size - n, len(ids) - i)
                out.write(ids[i:i + take])
                i, n, written = i + take, n + take, written + take
                bar.update(take)
                if n == size:  # the shard is full: the next one starts in the document that holds token i
                    d = int(np.searchsorted(starts, i, side='right')) - 1
                    finish([file_index, row + d, int(i - starts[d])] if i < len(ids) else
                           [file_index, row + len(lens), 0])
                    out = None
            docs += len(lens)
            bar.set_postfix_str(f"{docs:,} docs, file {file_index + 1}/{len(sources)}", refresh=False)
            if written >= budget:
                break
        if out is not None:  # the documents ended inside a shard: it is the last one
            finish([len(sources), 0, 0])
            out = None
    except OSError as e:  # a full disk, or an input file that cannot be read
        raise io_error(e, out_dir, [s[2] for s in sources]) from None
    finally:  # also on Ctrl-C or an error: stop the workers, and leave no temp file behind
        stream.close()
        bar.close()
        if out is not None:
            out.close()
            tmp.unlink(missing_ok=True)

    done = final_shards(out_dir, done, written, source, dtype, shard_tokens, val_tokens, small_val)
    write_meta(meta, out_dir, done, max_tokens, complete=True)
    val_n = done[0]['tokens']
    dt, mb = time.time() - t0, np.dtype(dtype).itemsize / 1e6
    print(f"wrote {out_dir}/ in {dt:.1f}s ({(written - start_tokens) / dt:,.0f} tokens/s): val_000000.bin {val_n:,} "
          f"tokens, {len(done) - 1} train shard(s) {written - val_n:,} tokens ({(written - val_n) * mb:.1f} MB), "
          f"meta.json; tokenizer {tok.name} (vocab {tok.vocab_size:,}, {dtype})")
    return meta


def check_source(dataset, input, url, subset):
    """One source of text: --input, --dataset (and --subset of a hub dataset) or --url; a mix is one line."""
    if input and (url or dataset != 'stdlib'):
        raise PrepareError("give either --input=PATH or --dataset=NAME/--url=URL, not both")
    if not input and not url and dataset not in ('stdlib', *DATASETS, *HUB_DATASETS):
        raise PrepareError(f"unknown dataset {dataset!r}: use one of stdlib, {', '.join([*DATASETS, *HUB_DATASETS])} "
                           f"(or --input=PATH for your own text)")
    if dataset in HUB_DATASETS and url:
        raise PrepareError(f"--url is for a text file to download; --dataset={dataset} comes from the hub")
    if subset and dataset not in HUB_DATASETS:
        raise PrepareError(f"--subset is a folder of a hub dataset ({', '.join(HUB_DATASETS)}), not of {dataset!r}")


def prepare_text(files, source, tok, out_dir, val_fraction, python_version, t0):
    """out_dir/train.bin, val.bin (the last val_fraction of the tokens, at least a few thousand) and meta.json from
    text files. Every token streams into one temp file, which is then cut: the tail is val, the rest becomes train.
    Temp names then os.replace, so an interrupted run never leaves a half-written .bin for train.py."""
    total_bytes = sum(f.stat().st_size for f in files)
    if total_bytes == 0:
        raise PrepareError(f"the input has no text ({len(files)} empty file(s) from {source}): nothing to tokenize")

    dtype = dtype_for(tok.vocab_size)
    print(f"tokenizing {len(files):,} file(s), {total_bytes / 1e6:.1f} MB from {source} "
          f"with {tok.name} (vocab {tok.vocab_size:,}, {dtype})")

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
    except BaseException as e:  # includes Ctrl-C: leave no temp files behind
        all_tmp.unlink(missing_ok=True)
        val_tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise io_error(e, out_dir, files) from None
        raise

    meta = dict(tokenizer=tok.name, vocab_size=tok.vocab_size, dtype=dtype, train_tokens=n_train, val_tokens=n_val,
                eot_token=tok.eot_token,
                doc_separator=f"token {tok.eot_token} ({tok.eot_text}) after each file, and in place of each literal "
                              f"<|endoftext|> in the text", **tok.meta,
                source=source, num_files=len(files), text_bytes=total_bytes, python_version=python_version,
                val_fraction=val_fraction)
    # Remove the old meta first and write the new one last: train.py sees either a complete old set,
    # no meta.json (it asks you to run prepare.py), or a complete new set; never new bins with old meta.
    meta_path = out_dir / 'meta.json'
    try:
        meta_path.unlink(missing_ok=True)
        os.replace(all_tmp, out_dir / 'train.bin')
        os.replace(val_tmp, out_dir / 'val.bin')
        meta_tmp = out_dir / 'meta.json.tmp'
        meta_tmp.write_text(json.dumps(meta, indent=2) + '\n')
        os.replace(meta_tmp, meta_path)
    except OSError as e:
        raise io_error(e, out_dir) from None

    mb = itemsize / 1e6
    print(f"wrote {out_dir}/ in {time.time() - t0:.1f}s: train.bin {n_train:,} tokens ({n_train * mb:.1f} MB), "
          f"val.bin {n_val:,} tokens ({n_val * mb:.1f} MB), meta.json; tokenizer {tok.name} "
          f"(vocab {tok.vocab_size:,}, {dtype})")
    return meta


def prepare(
        dataset='stdlib',          # stdlib (offline: Python's own source), shakespeare or tinystories (downloads),
                                   # fineweb-edu or slimpajama (parquet from the Hugging Face hub, into a shard set)
        input='',                  # your own text instead: a file, a directory, or a glob (quoted); .parquet and
                                   # .jsonl files become a shard set
        name='',                   # the folder under out_root (default: from the input's or the dataset's name)
        url='',                    # a plain text file to download instead
        tokenizer='auto',          # gpt2, byte (vocab 256, exact round trip), auto (gpt2 if it loads, else byte) or
                                   # hf:DIR (a Hugging Face model's tokenizer.json)
        val_fraction=0.005,        # train.bin/val.bin: the fraction of the tokens at the end that becomes val.bin
        out_root='data',           # writes out_root/name/
        max_files=0,               # read only the first max_files input files (0: all)
        text_column='text',        # parquet/JSONL: the field that holds each document's text
        subset='',                 # fineweb-edu/slimpajama: the hub folder to read (default: sample/10BT, data)
        num_proc=0,                # shard sets: tokenizing processes (0: all cores)
        max_tokens=0,              # shard sets: stop after this many tokens, val included (0: no limit)
        shard_tokens=100_000_000,  # shard sets: tokens per train shard
        val_tokens=10_000_000,     # shard sets: tokens of the val shard (val_000000.bin); left at this default,
                                   # ~1% of a corpus smaller than twice it
):
    """Write data/<name>/{train.bin,val.bin,meta.json}, or for parquet/JSONL documents (--input, or a hub dataset)
    a shard set (prepare_shards), and return the meta dict. val_fraction is for the first layout; text_column,
    subset, num_proc, max_tokens, shard_tokens and val_tokens for the second."""
    t0 = time.time()
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    check_ranges(locals(), {'num_proc': ('[0, inf)', ' (0: all cores)'), 'max_tokens': ('[0, inf)', ' (0: no limit)'),
                            'shard_tokens': '[1, inf)', 'val_tokens': '[1, inf)',
                            'max_files': ('[0, inf)', ' (0: all)')}, error=PrepareError)
    small_val = val_tokens == VAL_TOKENS  # the default: a small corpus gets ~1% instead (a given value is honoured)
    if max_tokens and max_tokens < 2 * val_tokens and not small_val:
        raise PrepareError(f"--max_tokens={max_tokens:,} leaves fewer train tokens than the {val_tokens:,} val tokens "
                           f"(--val_tokens): raise --max_tokens or lower --val_tokens")
    check_source(dataset, input, url, subset)
    num_proc = num_proc or (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count())

    sources = None  # parquet/JSONL files, for a shard set: (name in meta.json, size in bytes, local path, url)
    python_version = None
    if dataset in HUB_DATASETS:
        repo, folder, pattern, what = HUB_DATASETS[dataset]
        folder, name = subset or folder, name or dataset
        source = f"hf://datasets/{repo}/{folder}"
        print(f"{dataset}: {what}")
        import_parquet()  # fail now if pyarrow is missing, not after a download
    elif input:
        name = name or name_from_input(input)
        files, source = local_files(input)
        tables = [f.suffix in TABLE_SUFFIXES for f in files]
        if any(tables) and not all(tables):
            raise PrepareError(f"{input!r} mixes text files and {'/'.join(TABLE_SUFFIXES)} files: give one kind")
        if all(tables):
            sources = [(str(f), f.stat().st_size, f, None) for f in files]
            if any(f.suffix == '.parquet' for f in files):
                import_parquet()
    elif not url and dataset == 'stdlib':
        name = name or 'stdlib'
        files, source = stdlib_files()
        python_version = platform.python_version()
    tok = get_tokenizer(tokenizer)  # before any download, so a missing gpt2 vocabulary fails fast
    if dataset in HUB_DATASETS:
        out_dir = make_out_dir(out_root, name)
        sources = [(path, size, out_dir / 'download' / path, hub_url(repo, path))
                   for path, size in hub_files(repo, folder, pattern)]
    if sources is not None:
        sources = sources[:max_files] if max_files > 0 else sources
        return prepare_shards(sources, source, tok, make_out_dir(out_root, name), text_column, num_proc, max_tokens,
                              shard_tokens, val_tokens, small_val)

    if not input and (url or dataset != 'stdlib'):  # a text file to download
        name = name or (dataset if dataset != 'stdlib' else Path(url).stem or 'download')
        if dataset in DATASETS:
            print(f"{dataset}: {DATASETS[dataset][1]}")
            url = url or DATASETS[dataset][0]
        make_out_dir(out_root, name)
        files, source = [Path(out_root) / name / 'input.txt'], url
        download(url, files[0])
    files = files[:max_files] if max_files > 0 else files
    return prepare_text(files, source, tok, make_out_dir(out_root, name), val_fraction, python_version, t0)


def parse_args(argv):
    """The settings given as --key=value flags (configurator.py: each value takes the type of prepare()'s default,
    --help lists them all with their defaults), as a dict."""
    namespace = function_namespace(prepare)
    for arg in argv:
        if not arg.startswith('--') and arg not in ('-h', '--help'):  # no config files here
            raise PrepareError(f"bad argument {arg!r}: use --key=value (--help lists the settings)")
    given = configure(namespace, argv, error=PrepareError)
    return {k: namespace[k] for k in given}


def main(argv=None):
    return prepare(**parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
    main()

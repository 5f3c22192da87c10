"""
The documents of a shard set (prepare.py): files from the Hugging Face hub, downloaded when their turn comes, and
parquet or JSONL files read in batches (parquet one row group at a time, so memory stays flat whatever the corpus
size), then encoded by a pool of processes, in order.
"""
import collections
import fnmatch
import itertools
import json
import multiprocessing
import os
import re
import signal
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenizer import PrepareError, get_tokenizer

CHUNK_BYTES = 1 << 20     # read ~1 MB at a time, so memory stays flat whatever the corpus size
BATCH_DOCS = 256          # documents per tokenizing task


def download(url, path, size=None):
    """Fetch url to path once (later runs reuse it); a failure is one line that points to the offline default.
    With the size the server listed, a truncated download is an error too."""
    if path.exists():
        print(f"using {path} (downloaded before; delete it to fetch again)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + '.tmp')
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, 'wb') as f, \
                tqdm(total=int(r.headers.get('Content-Length') or 0) or None, unit='B', unit_scale=True,
                     desc=f"downloading {url}") as bar:
            while block := r.read(CHUNK_BYTES):
                f.write(block)
                bar.update(len(block))
        if size is not None and tmp.stat().st_size != size:
            raise OSError(f"got {tmp.stat().st_size:,} bytes of {size:,}")
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are all OSErrors
        tmp.unlink(missing_ok=True)
        raise PrepareError(f"download of {url} failed ({getattr(e, 'reason', e)}). Offline? `python prepare.py` "
                           f"needs no download (Python stdlib corpus), or use --input=your_text.txt") from None
    os.replace(tmp, path)


def hub_endpoint():
    return os.environ.get('HF_ENDPOINT', 'https://huggingface.co').rstrip('/')  # as huggingface_hub reads it


def hub_files(repo, folder, pattern):
    """[path, size] of the files of a hub dataset under folder whose names match pattern, sorted, from the hub's
    tree listing (two plain HTTP routes, api/.../tree and resolve, are all we need: no client library)."""
    url = f"{hub_endpoint()}/api/datasets/{repo}/tree/main/{urllib.parse.quote(folder)}"
    entries = []
    while url:  # the listing comes in pages, each naming the next in a Link header
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                entries += json.load(r)
                url = next(iter(re.findall(r'<([^>]+)>;\s*rel="next"', r.headers.get('Link') or '')), None)
        except (OSError, ValueError) as e:
            raise PrepareError(f"listing {repo}/{folder} at {url} failed ({getattr(e, 'reason', e)}). Offline? "
                               f"`python prepare.py` needs no download, or use --input='shards/*.parquet'") from None
    files = sorted([e['path'], e['size']] for e in entries
                   if e.get('type') == 'file' and fnmatch.fnmatch(Path(e['path']).name, pattern))
    if not files:
        raise PrepareError(f"no {pattern} files in {repo}/{folder} on {hub_endpoint()}: check --subset")
    return files


def hub_url(repo, path):
    return f"{hub_endpoint()}/datasets/{repo}/resolve/main/{urllib.parse.quote(path)}"


def import_parquet():
    """pyarrow is needed only for parquet: an optional dependency, imported on that path alone."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError("reading parquet needs pyarrow, which is not installed: pip install pyarrow") from None
    return pq


def parquet_batches(path, text_column, first):
    """(row, texts) for batches of BATCH_DOCS documents from row first on, read one row group at a time."""
    pq = import_parquet()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid for a file that is not parquet, OSError for an unreadable one
        raise PrepareError(f"{path} is not a readable parquet file ({str(e).strip().splitlines()[0]})") from None
    schema = pf.schema_arrow
    if text_column not in schema.names or 'string' not in str(schema.field(text_column).type):
        raise PrepareError(f"{path} has no text column {text_column!r} (its columns: {', '.join(schema.names)}): "
                           f"give --text_column=NAME")
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    if first >= starts[-1]:
        return
    group = int(np.searchsorted(starts, first, side='right')) - 1  # the row group that holds row first
    row = int(starts[group])
    for batch in pf.iter_batches(batch_size=BATCH_DOCS, row_groups=list(range(group, pf.num_row_groups)),
                                 columns=[text_column]):
        texts = batch.column(0).to_pylist()
        if row < first:  # resuming inside this row group
            texts, row = texts[first - row:], row + min(len(texts), first - row)
        if texts:
            yield row, texts
            row += len(texts)


def jsonl_batches(path, text_column, first):
    """(row, texts) for batches of BATCH_DOCS documents from row first on: one JSON object per line (blank lines
    are not documents)."""
    row, texts = 0, []
    with open(path, encoding='utf-8', errors='replace') as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row += 1
            if row <= first:
                continue
            try:
                text = json.loads(line)[text_column]
                if not isinstance(text, (str, type(None))):
                    raise TypeError
            except (ValueError, KeyError, TypeError, IndexError):
                raise PrepareError(f"{path} line {line_number}: not a JSON object with a string {text_column!r}: "
                                   f"give --text_column=NAME, or fix the line") from None
            texts.append(text)
            if len(texts) == BATCH_DOCS:
                yield row - len(texts), texts
                texts = []
    if texts:
        yield row - len(texts), texts


def read_documents(sources, text_column, start):
    """(file index, row, texts) in order, from row start[1] of file start[0] on. A file from the hub is downloaded
    when its turn comes, so --max_tokens downloads only the files it reads."""
    for i in range(start[0], len(sources)):
        name, size, path, url = sources[i]
        if url:
            download(url, path, size)
        batches = parquet_batches if path.suffix == '.parquet' else jsonl_batches
        for row, texts in batches(path, text_column, start[1] if i == start[0] else 0):
            yield i, row, texts


def encode_docs(tok, dtype, texts):
    """The token ids of a batch of documents, each followed by tok.eot_token, and each document's token count."""
    docs = [tok.encode(text or '') + [tok.eot_token] for text in texts]  # None (a missing value): an empty document
    lens = np.array([len(d) for d in docs], dtype=np.int64)
    return np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype, count=int(lens.sum())), lens


worker_tokenizer = None  # each worker process builds its own, by name, in init_worker


def init_worker(tokenizer):
    global worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process, which then stops the pool
    worker_tokenizer = get_tokenizer(tokenizer)


def encode_in_worker(dtype, texts):
    return encode_docs(worker_tokenizer, dtype, texts)


def tokenized(batches, tok, dtype, num_proc):
    """(file index, row, ids, lens) for each batch of documents, in order, encoded by num_proc processes. At most
    2 * num_proc batches are in flight, so memory stays flat however fast the reader is."""
    if num_proc == 1:
        for i, row, texts in batches:
            yield i, row, *encode_docs(tok, dtype, texts)
        return
    with multiprocessing.Pool(num_proc, initializer=init_worker, initargs=(tok.name,)) as pool:
        pending = collections.deque()
        for batch in itertools.chain(batches, [None]):  # None: the end, so the last batches are yielded too
            if batch is not None:
                i, row, texts = batch
                pending.append((i, row, pool.apply_async(encode_in_worker, (dtype, texts))))
            while pending and (batch is None or len(pending) >= 2 * num_proc):
                i, row, result = pending.popleft()
                yield i, row, *result.get()


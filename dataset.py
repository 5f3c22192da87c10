"""
The token files that prepare.py writes, opened for train.py: meta.json, and each split's files (train.bin and
val.bin, or the shards that meta.json lists), checked before a run spends anything on them, each file's size
against its token count in meta.json. A problem is one line that says what to do (usually: run prepare.py again).
"""
import json
import os

import numpy as np

from configurator import first_line


def read_meta(data_path):
    """data_path/meta.json as a dict ({} when there is none: the missing files are said below)."""
    path = os.path.join(data_path, 'meta.json')
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            meta = json.load(f)
        lacks = [k for k in ('tokenizer', 'vocab_size', 'dtype') if not isinstance(meta, dict) or k not in meta]
        if lacks:
            raise ValueError(f"it has no {', '.join(lacks)}")
        np.dtype(meta['dtype'])
    except (OSError, ValueError, TypeError) as e:  # also json's JSONDecodeError and UnicodeDecodeError
        raise SystemExit(f"{path} cannot be read ({first_line(e)}): run prepare.py again for this data "
                         f"(`python prepare.py --help`)") from None
    return meta


def check_sizes(data_path, meta, files):
    """Every file holds the tokens that meta.json says it does (a copy cut short, a truncated shard): each file's
    size must be its token count times the dtype's size. Files whose count meta.json does not give are skipped."""
    itemsize = np.dtype(meta['dtype']).itemsize
    for split, names in files.items():
        counts = [s.get('tokens') for s in meta[f'{split}_shards']] if f'{split}_shards' in meta else \
            [meta.get(f'{split}_tokens')]
        for name, tokens in zip(names, counts):
            size = os.path.getsize(os.path.join(data_path, name))
            if isinstance(tokens, int) and size != tokens * itemsize:
                raise SystemExit(f"{data_path}/{name} has {size:,} bytes, but meta.json says {tokens:,} "
                                 f"{meta['dtype']} tokens ({tokens * itemsize:,} bytes): it was cut short or "
                                 f"damaged; run the same prepare.py command again")


def open_dataset(data_path, block_size):
    """(meta, files, first_crop): meta.json; {split: its file names}; and {split: (files + 1,) array}, where each
    file's crop starts begin in a numbering of all the split's crop starts (a file of n tokens has n - block_size):
    get_batch draws from that numbering, so a crop never spans two files and every crop is equally likely (one file:
    nanoGPT's draw, exactly)."""
    meta = read_meta(data_path)
    files = {split: [s['file'] for s in meta[f'{split}_shards']] if f'{split}_shards' in meta else [f'{split}.bin']
             for split in ('train', 'val')}
    missing = [f for f in (*files['train'], *files['val'], 'meta.json')
               if not os.path.exists(os.path.join(data_path, f))]
    if missing:
        shown = ', '.join(missing[:3]) + (' ...' if len(missing) > 3 else '')  # a shard set can miss hundreds
        raise SystemExit(f"no {shown} in {data_path}/: run `python prepare.py` first "
                         f"(it writes data/stdlib/; see `python prepare.py --help` for other data)")
    if not meta.get('complete', True):
        raise SystemExit(f"{data_path}/ is not complete (prepare.py was interrupted, or is still running): run the "
                         f"same prepare.py command again, and it continues where it stopped")
    check_sizes(data_path, meta, files)
    first_crop = {}
    for split, names in files.items():
        sizes = [os.path.getsize(os.path.join(data_path, f)) // np.dtype(meta['dtype']).itemsize for f in names]
        if max(sizes) < block_size + 1:
            where = f"{data_path}/{names[0]}" if len(names) == 1 else f"the largest of {len(names)} {split} shards"
            raise SystemExit(f"block_size={block_size} is larger than the {split} split ({max(sizes)} tokens in "
                             f"{where}): use a smaller --block_size or prepare more text")
        first_crop[split] = np.cumsum([0] + [max(0, n - block_size) for n in sizes])  # (files + 1,)
    return meta, files, first_crop

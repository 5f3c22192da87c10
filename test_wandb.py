"""
--wandb_log=True, as nanoGPT: rank 0 sends wandb what log.jsonl gets. Run offline (WANDB_MODE=offline), the run's
records are read back from the local wandb run file. wandb is optional: without it, one line says how to get it.
"""
import glob
import json
import subprocess
import sys

import pytest

from test_train import TINY, TRAIN, env1, make_data, read_log


def wandb_history(path):
    """The history rows of a wandb run file: LevelDB's log format (a 7-byte file header, then 32 KiB blocks of
    records, each with a 7-byte header: checksum, length, type; FULL = 1 and LAST = 4 end a record), each record a
    wandb Record protobuf."""
    from wandb.proto import wandb_internal_pb2
    data, pos, pieces, rows = open(path, 'rb').read(), 7, b'', []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], 'little'), data[pos + 6]
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b''
            if record.WhichOneof('record_type') == 'history':
                rows.append({i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_gets_every_record_of_the_log(tmp_path):
    pytest.importorskip('wandb')
    import numpy as np
    rng = np.random.default_rng(0)
    data = make_data(tmp_path / 'data', rng.integers(0, 64, 4000), rng.integers(0, 64, 600))
    out = tmp_path / 'out'
    env = dict(env1(), WANDB_MODE='offline', WANDB_DIR=str(tmp_path), WANDB_SILENT='true')
    p = subprocess.run([sys.executable, TRAIN, *TINY, *data, f'--out_dir={out}', '--max_iters=6', '--eval_interval=3',
                        '--wandb_log=True', '--wandb_run_name=tiny'], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    [run_file] = glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / 'run-*.wandb'))
    rows = wandb_history(run_file)
    log = read_log(out)
    assert [r['iter'] for r in log] == [0, 3, 6] and [r['_step'] for r in rows] == [0, 3, 6]
    for record, row in zip(log, rows):  # every field, the per-level lists as name/0, name/1
        assert {k: row[k] for k in record if not isinstance(record[k], list)} == \
            {k: v for k, v in record.items() if not isinstance(v, list)}
        assert [row['kept/0'], row['kept/1']] == record['kept'] and [row['dropped/0'], row['dropped/1']] == \
            record['dropped']


def test_wandb_log_without_wandb_is_one_line(tmp_path):
    """As if wandb were not installed (find_spec finds no wandb): one line, before anything is written."""
    import numpy as np
    data = make_data(tmp_path / 'data', np.zeros(400), np.zeros(400))
    code = ("import importlib.util, runpy, sys\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'wandb' else real(name, *a)\n"
            f"sys.argv = ['train.py'] + sys.argv[1:]\nrunpy.run_path({TRAIN!r}, run_name='__main__')\n")
    p = subprocess.run([sys.executable, '-c', code, *TINY, *data, f'--out_dir={tmp_path / "out"}', '--wandb_log=True'],
                       capture_output=True, text=True, env=env1(), cwd=tmp_path, timeout=120)
    assert p.returncode == 1 and p.stdout == ''
    assert p.stderr.strip() == "--wandb_log=True needs wandb, which is not installed: pip install wandb (or " \
                               "--wandb_log=False)"
    assert not (tmp_path / 'out').exists()

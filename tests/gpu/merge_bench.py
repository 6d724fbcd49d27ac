"""Join benchmark records of one shape, made one after the other on one machine (run_on_device.sh bench writes one
per process), into one record whose table compares them all:

    python tests/gpu/merge_bench.py OUT.json IN.json... [--note TEXT]"""
import argparse
import json
from pathlib import Path


def merge(records: list[dict], note: str | None = None) -> dict:
    first = records[0]
    same = lambda r: {**r['config'], 'impls': None} == {**first['config'], 'impls': None}
    if not all(r['kind'] == 'bench' and same(r) and r['meta'].get('device_name') == first['meta'].get('device_name')
               for r in records):
        raise ValueError('records of different shapes, settings or devices cannot share one table')
    meta = {**first['meta'], 'command': ' ; '.join(r['meta'].get('command') or '?' for r in records),
            'seconds': sum(r['meta']['seconds'] for r in records)}
    if note:
        meta['note'] = note
    return {**first, 'meta': meta, 'config': {**first['config'], 'impls': [i for r in records for i in r['config']['impls']]},
            'results': [x for r in records for x in r['results']]}


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('out')
    p.add_argument('inputs', nargs='+')
    p.add_argument('--note')
    a = p.parse_args()
    rec = merge([json.loads(Path(f).read_text()) for f in a.inputs], a.note)
    Path(a.out).write_text(json.dumps(rec, indent=1) + '\n')

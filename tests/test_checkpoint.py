"""Checkpoint files (nbs/10a_checkpoint.ipynb): a save changes exactly the checkpoint's own files, in place.

The property: in a folder holding files of every kind (names that start like weights but are not, symlinks to a
folder and to a weight file, dangling symlinks, FIFOs, folders, an earlier sharded and an earlier single-file
checkpoint), a save changes only the names transformers gives a checkpoint's config and weights (writing
through a symlink), removes only the earlier weight files that it does not rewrite, and loading gives exactly
the weights saved. Then: a mount point, a folder that cannot be renamed, two processes saving at once, saves that
fail half-way, and files that are not what their names say.
"""
import errno
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip('transformers')

from myfla_gla import GLAConfig, GLAForCausalLM  # noqa: E402
from myfla_gla.models import checkpoint as ckpt  # noqa: E402
from myfla_gla.models.checkpoint import CheckpointFileError, load_state_dict_from_folder  # noqa: E402

# torch caches the factory functions that `with torch.device('meta')` redirects on first use: build it before
# conftest's NaN-filling `torch.empty` is patched in (as tests/test_dropin.py does)
with torch.device('meta'):
    torch.empty(1)

SHARD = 40_000   # bytes: the tiny models below then take 2 or 3 shards


pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)


def tiny(seed: int, layers: int = 1) -> GLAForCausalLM:
    "A tiny model whose weights depend on `seed`."
    torch.manual_seed(seed)
    return GLAForCausalLM(GLAConfig(hidden_size=32, num_hidden_layers=layers, num_heads=2, vocab_size=64,
                                    intermediate_size=48, bos_token_id=None, eos_token_id=None)).eval()


def assert_loads_as(folder, model):
    "Loading the folder gives exactly `model`'s weights and config."
    loaded = GLAForCausalLM.from_pretrained(folder)
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers
    want = model.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def entry(path: Path):
    "What is at `path`, without following a symlink or opening a FIFO: kind, link target, content hash."
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        return ('link', target, entry(Path(os.path.realpath(path))) if os.path.exists(path) else 'dangling')
    if stat.S_ISREG(st.st_mode):
        return ('file', hashlib.sha256(path.read_bytes()).hexdigest(), stat.S_IMODE(st.st_mode))
    if stat.S_ISDIR(st.st_mode):
        return ('dir', tuple(sorted((p.name, entry(p)) for p in path.iterdir())))
    return ('fifo' if stat.S_ISFIFO(st.st_mode) else 'other', stat.S_IMODE(st.st_mode))


def snapshot(folder: Path) -> dict:
    return {p.name: entry(p) for p in folder.iterdir()}


def weights_of(folder: Path) -> set:
    "The names in `folder` that are a checkpoint's weights, shards or index (whatever their kind)."
    return {n for n in os.listdir(folder) if ckpt.is_weight_file(n)}


def populate(d: Path, ext: Path, old: GLAForCausalLM):
    "A folder with files of every kind; `ext` holds what its symlinks point to."
    d.mkdir()
    ext.mkdir()
    for name in ['model.onnx', 'model-card.md', 'model.py', 'model.yaml', 'pytorch_model_notes.txt', 'tokenizer.json']:
        (d / name).write_text(f'the user\'s {name}')
    (d / 'model.py').chmod(0o750)
    (d / 'tokenizer').mkdir()
    (d / 'tokenizer' / 'vocab.txt').write_text('a b c')
    (d / 'model-00001-of-00005.safetensors').mkdir()          # a folder with a weight's name
    (ext / 'data').mkdir()
    (ext / 'data' / 'big.bin').write_bytes(os.urandom(200_000))
    (d / 'data').symlink_to(ext / 'data')                     # a symlink to a folder
    old.save_pretrained(ext / 'single')
    (d / 'model.safetensors').symlink_to(ext / 'single' / 'model.safetensors')   # a symlink to a weight file
    (d / 'pytorch_model-00001-of-00002.bin').symlink_to(ext / 'missing.bin')    # dangling, a weight's name
    (d / 'notes-link').symlink_to(ext / 'nowhere')                             # dangling
    os.mkfifo(d / 'model.fifo')                                                 # FIFOs
    os.mkfifo(d / 'pytorch_model.bin.index.json')                               # ... one with a weight's name
    old.save_pretrained(ext / 'sharded', max_shard_size=SHARD // 2)             # an earlier sharded checkpoint
    for f in (ext / 'sharded').iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    torch.save(old.state_dict(), d / 'pytorch_model.bin')                      # an earlier single-file one
    return {f.name for f in (ext / 'sharded').iterdir() if ckpt.is_weight_file(f.name)}


def check_save(d: Path, ext: Path, model, removed: set, **kwargs):
    "Save `model` into `d`; exactly the checkpoint's files change, `removed` go, and it loads as `model`."
    before, outside = snapshot(d), entry(ext)
    model.save_pretrained(d, **kwargs)
    after = snapshot(d)
    if 'max_shard_size' in kwargs:
        index = json.loads((d / 'model.safetensors.index.json').read_text())
        weights = set(index['weight_map'].values()) | {'model.safetensors.index.json'}
    else:
        weights = {'model.safetensors'}
    written = {'config.json', 'generation_config.json'} | weights
    assert set(after) == (set(before) - removed) | written          # nothing else appears (no temporary folder)
    for name in set(before) - removed - written:
        assert after[name] == before[name], name                     # every other entry exactly as it was
    for name in written:
        if name in before and before[name][0] == 'link':             # written through the link, which stays
            assert after[name][:2] == before[name][:2] and after[name][2][0] == 'file', name
        else:
            assert after[name][0] == 'file', name
    links = {n: Path(os.path.realpath(d / n)) for n in written if before.get(n, ('',))[0] == 'link'}
    assert_loads_as(d, model)
    return outside, links


def test_a_save_changes_exactly_the_checkpoint_files(tmp_path, monkeypatch):
    d, ext = tmp_path / 'ckpt', tmp_path / 'elsewhere'
    old_shards = populate(d, ext, tiny(0))
    # 1. single-file over both earlier checkpoints: their weights go (the FIFO, the folder and the dangling symlink
    #    with weight names stay), model.safetensors is written through its symlink
    outside, links = check_save(d, ext, tiny(1), removed=old_shards | {'pytorch_model.bin'})
    assert links == {'model.safetensors': ext / 'single' / 'model.safetensors'}
    assert (d / 'model.safetensors').is_symlink()
    new_outside = entry(ext)
    assert new_outside[1] != outside[1] and dict(new_outside[1])['data'] == dict(outside[1])['data']
    assert weights_of(d) == {'model.safetensors', 'pytorch_model-00001-of-00002.bin', 'pytorch_model.bin.index.json',
                             'model-00001-of-00005.safetensors'}
    # 2. sharded, from inside the folder: the symlink model.safetensors is removed (not its target)
    monkeypatch.chdir(d)
    target = (ext / 'single' / 'model.safetensors').read_bytes()
    check_save(Path('.'), ext, tiny(2, layers=2), removed={'model.safetensors'}, max_shard_size=SHARD)
    assert (ext / 'single' / 'model.safetensors').read_bytes() == target
    shards = set(json.loads((d / 'model.safetensors.index.json').read_text())['weight_map'].values())
    assert len(shards) > 1 and all(re.fullmatch(r'model-0000\d-of-0000\d\.safetensors', n) for n in shards)
    # 3. single-file again: the shards and the index go
    monkeypatch.chdir(tmp_path)
    check_save(d, ext, tiny(3), removed=shards | {'model.safetensors.index.json'})
    assert not (d / 'model.safetensors').is_symlink()
    # 4. and sharded from inside once more, now with 2 shards
    monkeypatch.chdir(d)
    check_save(Path('.'), ext, tiny(4), removed={'model.safetensors'}, max_shard_size=SHARD)
    assert (d / 'model.py').stat().st_mode & 0o777 == 0o750


def test_a_name_we_write_that_is_not_a_file_stops_the_save(tmp_path):
    d = tmp_path / 'ckpt'
    old = tiny(0)
    old.save_pretrained(d)
    for name, make in [('config.json', os.mkfifo), ('model.safetensors', lambda p: p.symlink_to(tmp_path / 'gone')),
                       ('generation_config.json', Path.mkdir)]:
        real = d / (name + '.real')
        os.rename(d / name, real)
        make(d / name)
        before = snapshot(d)
        with pytest.raises(FileExistsError, match=rf"{name}' is (not a regular file|a dangling symlink|a folder)"):
            tiny(1).save_pretrained(d)
        assert snapshot(d) == before
        (d / name).rmdir() if (d / name).is_dir() else os.unlink(d / name)
        os.rename(real, d / name)
    assert_loads_as(d, old)


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    tiny(0).save_pretrained(tmp_path)
    (tmp_path / 'model.safetensors').chmod(0o640)
    tiny(1).save_pretrained(tmp_path)
    assert (tmp_path / 'model.safetensors').stat().st_mode & 0o777 == 0o640


def test_variants_live_side_by_side(tmp_path):
    tiny(0).save_pretrained(tmp_path)
    default = snapshot(tmp_path)['model.safetensors']
    tiny(1).save_pretrained(tmp_path, variant='v2', max_shard_size=SHARD)
    tiny(2).save_pretrained(tmp_path, variant='v2')       # the variant's shards go, the default's file stays
    assert snapshot(tmp_path)['model.safetensors'] == default
    assert weights_of(tmp_path) == {'model.safetensors'}
    assert {n for n in os.listdir(tmp_path) if ckpt.is_weight_file(n, 'v2')} == {'model.v2.safetensors'}
    want = tiny(2).state_dict()
    got = load_state_dict_from_folder(tmp_path, variant='v2')
    assert all(torch.equal(got[k], want[k]) for k in got)


# ---------------------------------------------------------------------------------------------------------------
# mount points, and folders that cannot be renamed


def test_save_into_a_mount_point(tmp_path, monkeypatch):
    mnt = tmp_path / 'mnt'
    mnt.mkdir()
    if shutil.which('mount') is None:
        pytest.skip('no mount command: test_a_folder_is_never_renamed covers it')
    res = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({res.stderr.strip()}): test_a_folder_is_never_renamed covers it')
    try:
        assert os.path.ismount(mnt)
        (mnt / 'model.onnx').write_text('kept')
        tiny(1).save_pretrained(mnt)
        assert_loads_as(mnt, tiny(1))
        tiny(2).save_pretrained(mnt, max_shard_size=SHARD)
        assert_loads_as(mnt, tiny(2))
        monkeypatch.chdir(mnt)
        tiny(3).save_pretrained('.')
        assert_loads_as('.', tiny(3))
        assert sorted(os.listdir(mnt)) == ['config.json', 'generation_config.json', 'model.onnx', 'model.safetensors']
    finally:
        monkeypatch.chdir(tmp_path)
        subprocess.run(['umount', str(mnt)], check=True)


def test_a_folder_is_never_renamed(tmp_path, monkeypatch):
    "As in a mount point (EBUSY) or from inside it (EXDEV): renaming the folder, or any folder above it, fails."
    d = tmp_path / 'ckpt'
    d.mkdir()
    (d / 'model.onnx').write_text('kept')
    protected = {str(p) for p in [d, *d.parents]}
    calls = []

    def guard(real, code):
        def rename(src, dst, *args, **kwargs):
            calls.append((str(src), str(dst)))
            if {os.path.realpath(src), os.path.realpath(dst)} & protected:
                raise OSError(code, os.strerror(code), str(src))
            return real(src, dst, *args, **kwargs)
        return rename
    monkeypatch.setattr(os, 'rename', guard(os.rename, errno.EBUSY))
    monkeypatch.setattr(os, 'replace', guard(os.replace, errno.EXDEV))
    tiny(1).save_pretrained(d)
    assert_loads_as(d, tiny(1))
    monkeypatch.chdir(d)
    tiny(2).save_pretrained('.', max_shard_size=SHARD)
    assert_loads_as('.', tiny(2))
    assert calls and all(Path(dst).parent.resolve() == d for _, dst in calls)   # files renamed into the folder only


# ---------------------------------------------------------------------------------------------------------------
# two processes


def _save_many(folder, seed, layers, sharded, n, errors):
    model = tiny(seed, layers)
    try:
        for i in range(n):
            model.save_pretrained(folder, **({'max_shard_size': SHARD} if (i + sharded) % 2 else {}))
    except BaseException as e:  # reported to the parent, which fails the test
        errors.put(f'{type(e).__name__}: {e}')


@pytest.mark.skipif(ckpt.fcntl is None, reason='no flock here (Windows): two saves into one folder are not serialised')
def test_two_processes_saving_into_one_folder(tmp_path):
    "Both succeed every time, every load in between is one whole checkpoint, and one whole checkpoint remains."
    d = tmp_path / 'ckpt'
    (d / 'tokenizer').mkdir(parents=True)
    models = {1: tiny(1, 1), 2: tiny(2, 2)}
    ctx = multiprocessing.get_context('fork')
    errors = ctx.Queue()
    procs = [ctx.Process(target=_save_many, args=(d, seed, layers, seed % 2, 12, errors)) for seed, layers in [(1, 1), (2, 2)]]
    for p in procs:
        p.start()
    loads, deadline = 0, time.monotonic() + 60
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if (d / 'config.json').exists():   # a load while the saves run: one of the two, never a mix
            loaded = GLAForCausalLM.from_pretrained(d)
            want = models[loaded.config.num_hidden_layers].state_dict()
            assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
            loads += 1
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            pytest.fail('a saving process did not finish in 60 s')
    assert [p.exitcode for p in procs] == [0, 0]
    assert errors.empty(), errors.get()
    last = GLAForCausalLM.from_pretrained(d).config.num_hidden_layers
    assert_loads_as(d, models[last])
    names = set(os.listdir(d))
    assert names - weights_of(d) == {'config.json', 'generation_config.json', 'tokenizer'}   # no temporary folder
    single = weights_of(d) == {'model.safetensors'}
    sharded = 'model.safetensors.index.json' in names and 'model.safetensors' not in names
    assert single or sharded, sorted(names)
    assert loads > 0


# ---------------------------------------------------------------------------------------------------------------
# saves that fail half-way


def test_a_save_that_fails_while_writing_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    d = tmp_path / 'ckpt'
    tiny(1).save_pretrained(d)
    (d / 'model.onnx').write_text('kept')
    before = snapshot(d)
    import transformers.modeling_utils as mu
    real, written = mu.safe_save_file, []

    def fails_on_the_second_shard(tensors, filename, metadata=None):
        if written:
            Path(filename).write_bytes(b'half a shard')
            raise OSError(errno.ENOSPC, 'No space left on device', filename)
        written.append(filename)
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(mu, 'safe_save_file', fails_on_the_second_shard)
    with pytest.raises(OSError, match='No space left'):
        tiny(2, 2).save_pretrained(d, max_shard_size=SHARD)
    assert len(written) == 1
    assert snapshot(d) == before                    # unchanged, and no temporary folder left
    assert_loads_as(d, tiny(1))


def test_a_save_that_fails_between_renames_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    d = tmp_path / 'ckpt'
    tiny(1).save_pretrained(d)
    real = os.replace

    def fails_on_the_index(src, dst, *args, **kwargs):
        if str(dst).endswith('.index.json'):
            raise OSError(errno.EIO, 'Input/output error', str(dst))
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, 'replace', fails_on_the_index)
    with pytest.raises(OSError, match='Input/output error'):
        tiny(2, 2).save_pretrained(d, max_shard_size=SHARD)
    assert_loads_as(d, tiny(1))                     # the new shards are in, but nothing points at them
    assert not [n for n in os.listdir(d) if n.startswith('.')]
    monkeypatch.undo()
    tiny(3).save_pretrained(d)                      # the next save removes what the failed one left
    assert sorted(os.listdir(d)) == ['config.json', 'generation_config.json', 'model.safetensors']
    assert_loads_as(d, tiny(3))


def test_a_save_that_stops_between_shards_of_the_same_names_never_leaves_a_mix(tmp_path, monkeypatch):
    "Old and new shards share their names: a stop after the first shard leaves a folder that fails to load."
    d = tmp_path / 'ckpt'
    tiny(1, 2).save_pretrained(d, max_shard_size=SHARD)
    old_names = set(os.listdir(d))
    real, renamed = os.replace, []

    def fails_on_the_second_shard(src, dst, *args, **kwargs):
        if str(dst).endswith('.safetensors') and renamed:
            raise OSError(errno.EIO, 'Input/output error', str(dst))
        renamed.append(dst)
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, 'replace', fails_on_the_second_shard)
    with pytest.raises(OSError, match='Input/output error'):
        tiny(2, 2).save_pretrained(d, max_shard_size=SHARD)
    monkeypatch.undo()
    assert set(os.listdir(d)) == old_names - {'model.safetensors.index.json'}    # same shard names, no index
    with pytest.raises(OSError, match='No weights'):
        GLAForCausalLM.from_pretrained(d)
    tiny(3, 2).save_pretrained(d, max_shard_size=SHARD)
    assert set(os.listdir(d)) == old_names
    assert_loads_as(d, tiny(3, 2))


def test_a_killed_save_leaves_a_hidden_folder_the_next_save_removes(tmp_path):
    d = tmp_path / 'ckpt'
    tiny(1).save_pretrained(d)
    (d / (ckpt._TMP_PREFIX + 'abc')).mkdir()         # what a process killed while writing leaves
    (d / (ckpt._TMP_PREFIX + 'abc') / 'model.safetensors').write_bytes(b'half')
    (d / '.keep').mkdir()
    tiny(2).save_pretrained(d)
    assert sorted(os.listdir(d)) == ['.keep', 'config.json', 'generation_config.json', 'model.safetensors']


# ---------------------------------------------------------------------------------------------------------------
# files that are not what their names say


def _cut(path: Path, keep: int | float):
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])


BAD_FILES = {   # case -> (checkpoint, the file, how it is spoiled, what the error says)
    'config truncated': ('single', 'config.json', lambda p: _cut(p, 0.5), 'truncated?'),
    'config empty': ('single', 'config.json', lambda p: p.write_text(''), 'it is empty'),
    'config a list': ('single', 'config.json', lambda p: p.write_text('[1, 2]'), 'holds a list'),
    'config not text': ('single', 'config.json', lambda p: p.write_bytes(b'\xff\xfe{'), 'not JSON text'),
    'weights truncated': ('single', 'model.safetensors', lambda p: _cut(p, 0.9), 'not a readable safetensors file'),
    'weights empty': ('single', 'model.safetensors', lambda p: p.write_bytes(b''), '(empty: '),
    'index truncated': ('sharded', 'model.safetensors.index.json', lambda p: _cut(p, 0.5), 'truncated?'),
    'index a string': ('sharded', 'model.safetensors.index.json', lambda p: p.write_text('"x"'), 'holds a string'),
    'index without map': ('sharded', 'model.safetensors.index.json', lambda p: p.write_text('{"metadata": {}}'),
                          "no 'weight_map'"),
    'shard missing': ('sharded', 'model-00002-of-00003.safetensors', lambda p: p.unlink(), "lists the shard "),
    'shard truncated': ('sharded', 'model-00002-of-00003.safetensors', lambda p: _cut(p, 100), 'not a readable safetensors'),
    'bin truncated': ('bin', 'pytorch_model.bin', lambda p: _cut(p, 0.5), 'not a readable PyTorch weights file'),
    'bin empty': ('bin', 'pytorch_model.bin', lambda p: p.write_bytes(b''), '(empty: '),
    'bin not a state dict': ('bin', 'pytorch_model.bin', lambda p: torch.save([torch.ones(1)], p), 'not a dict of tensors'),
}


@pytest.mark.parametrize('case', list(BAD_FILES))
def test_a_bad_file_is_named(tmp_path, case):
    kind, name, spoil, says = BAD_FILES[case]
    model = tiny(1, 2)
    model.save_pretrained(tmp_path, **({'max_shard_size': SHARD} if kind == 'sharded' else {}))
    if kind == 'bin':
        (tmp_path / 'model.safetensors').unlink()
        torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
    spoil(tmp_path / name)
    where = str(tmp_path / ('model.safetensors.index.json' if case == 'shard missing' else name))
    with pytest.raises(CheckpointFileError, match=re.escape(repr(where)) + '.*' + re.escape(says)) as e:
        GLAForCausalLM.from_pretrained(tmp_path)
    assert isinstance(e.value, OSError) and isinstance(e.value, ValueError)
    if name != 'config.json':
        with pytest.raises(CheckpointFileError, match=re.escape(says)):
            load_state_dict_from_folder(tmp_path)

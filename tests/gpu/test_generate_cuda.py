"""The generation benchmark on CUDA: its compiled one-token step, with and without CUDA graphs
(`torch.compile(mode='reduce-overhead')`), decodes the tokens the eager model does, in every part of a run that
reuses the compiled step: the warm-up, the timed generation, the memory run and the decode-time curve, whose prompts
are new. With CUDA graphs a replay's outputs live in the graphs' memory pool until the next replay overwrites them,
so a runner that fed them back as the next step's states failed here."""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip('needs a CUDA device', allow_module_level=True)

from myfla_gla import bench  # noqa: E402


@pytest.mark.parametrize('mode', ['default', 'reduce-overhead'])
def test_compiled_step_rows_decode_as_eager(mode):
    cfg = bench.GenConfig(layers=2, hidden=64, heads=2, vocab=100, prompt=16, new_tokens=10, batch=[1, 2],
                          contexts=[8, 24], context_steps=3, device='cuda', compile_mode=mode,
                          impls=['myfla_gla (eager)', 'myfla_gla (compiled step)'])
    rec = bench.run_generate(cfg, progress=False)
    rows = {(r['name'], r['batch']): r for r in rec['results']}
    for B in cfg.batch:
        r = rows['myfla_gla (compiled step)', B]
        assert r['status'] == 'ok', r['note']
        assert r['same_tokens'] == cfg.new_tokens, r   # every token as the eager model's
        assert r['decode_ms'] > 0 and r['peak_mib'] is not None
    curve = rec['contexts']['myfla_gla (compiled step)']
    assert [p['T'] for p in curve] == [8, 24] and all(p['decode_ms'] > 0 for p in curve), curve

import torch
from conftest import tiny_tuner

from tlkit._runtime import denormals_flushed

CLASSES = ["a", "b", "c"]


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(8, 3, 64, 64, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))


def test_denormals_flushed_during_fit_and_restored_after():
    seen = []
    for before in (False, True):
        torch.set_flush_denormal(before)
        tuner = tiny_tuner(CLASSES, epochs=1)
        hook = tuner.model.register_forward_hook(lambda *a: seen.append(denormals_flushed()))
        tuner.fit(_data())
        tuner.predict(torch.randn(2, 3, 64, 64))
        hook.remove()
        assert denormals_flushed() is before
    torch.set_flush_denormal(False)
    assert seen and all(seen)


def test_flush_denormal_can_be_turned_off():
    torch.set_flush_denormal(False)
    seen = []
    tuner = tiny_tuner(CLASSES, epochs=1, flush_denormal=False)
    tuner.model.register_forward_hook(lambda *a: seen.append(denormals_flushed()))
    tuner.fit(_data())
    assert seen and not any(seen)

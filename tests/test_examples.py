"""The runnable examples in python/ run and learn."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "python", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_finetune_tiny_learns():
    losses, acc = _load("finetune_tiny").main(["--steps", "60", "--dim", "64", "--depth", "1",
                                               "--vocab", "64", "--batch", "16", "--seq", "16"])
    assert losses[-1] < 0.5 * losses[0]

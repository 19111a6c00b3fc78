"""Benchmarks import ``lora_kernels`` from the checkout when it is not installed."""
import importlib.util
import os
import sys

if importlib.util.find_spec("lora_kernels") is None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

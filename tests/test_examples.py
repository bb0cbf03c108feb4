"""The examples run as documented."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_custom_rule_example():
    out = _run("examples/custom_rule.py")
    assert "rule unit tests passed" in out and "compiled model matches eager" in out
    assert "gelu_tanh                    fired    1" in out


def test_quickstart_tiny():
    out = _run("examples/quickstart.py", "--tiny", "--new-tokens", "6")
    assert "greedy tokens identical: True" in out


def test_onnx_export_tiny():
    out = _run("examples/onnx_export.py", "--tiny", "--new-tokens", "6")
    assert "greedy tokens identical: True" in out and "GroupQueryAttention" in out

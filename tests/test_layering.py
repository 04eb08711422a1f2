"""The import structure holds by construction (flexq_jax/DESIGN.md, "Where code lives").

Every module of the four packages is parsed (never imported) and its imports checked:
  - layers: pallas_kernels/core.py imports nothing of the project; kernels (the rest of
    pallas_kernels/, flexq_jax/cuda/bmma.py) import only the core; models/ only models/ and the kernels; the
    library (flexq_jax/) nothing of evaluation/; evaluation/ anything.
  - project modules are imported at the top of a module, never inside a function or class.
  - the module graph has no cycle.
  - every third-party package imported is declared in pyproject.toml (dependencies or an extra),
    and every declared dependency is imported somewhere.
"""

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pallas_kernels", "models", "flexq_jax", "evaluation")
# What each layer may import from the project (besides itself, for the library and evaluation).
CORE, KERNEL, MODELS, LIBRARY, EVALUATION = "core", "kernel", "models", "library", "evaluation"
MAY_IMPORT = {CORE: set(), KERNEL: {CORE}, MODELS: {CORE, KERNEL, MODELS}, LIBRARY: {CORE, KERNEL, MODELS, LIBRARY},
              EVALUATION: {CORE, KERNEL, MODELS, LIBRARY, EVALUATION}}
# Import names whose distribution is named otherwise, and imports that come with another package.
DISTRIBUTION = {"ml_dtypes": "ml-dtypes", "huggingface_hub": "huggingface-hub"}
BUNDLED = {"pyarrow": "datasets"}  # pyarrow is a dependency of datasets (only parquet users need it)
PINNED_ONLY = {"jaxlib"}  # declared to pin the version jax runs with; never imported by name


def layer(module: str) -> str:
  if module == "pallas_kernels.core":
    return CORE
  if module.startswith("pallas_kernels") or module in ("flexq_jax.cuda", "flexq_jax.cuda.bmma"):
    return KERNEL
  return {"models": MODELS, "flexq_jax": LIBRARY, "evaluation": EVALUATION}[module.split(".")[0]]


def modules() -> dict[str, Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = modules()


def imports(path: Path):
  """(imported module, line, whether at module level) for every import of the file."""
  tree = ast.parse(path.read_text(), str(path))
  top = set()
  for node in tree.body:  # module level, including under `if` / `try` at module level
    for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
      top.add(id(sub))
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno, id(node) in top
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:  # `from a import b` imports module a.b when b is one
        full = f"{node.module}.{alias.name}"
        yield (full if full in MODULES else node.module), node.lineno, id(node) in top


def project_edges():
  for module, path in MODULES.items():
    for target, line, at_top in imports(path):
      if target.split(".")[0] in PACKAGES:
        yield module, target, f"{path.relative_to(ROOT)}:{line}", at_top


def test_every_import_runs_down_the_layers():
  bad = [f"{where}: {src} ({layer(src)}) imports {dst} ({layer(dst)})" for src, dst, where, _ in project_edges()
         if layer(dst) != layer(src) and layer(dst) not in MAY_IMPORT[layer(src)]]
  assert not bad, "\n".join(bad)


def test_project_modules_are_imported_at_the_top():
  inner = [f"{where}: {dst} imported inside a function or class" for _, dst, where, at_top in project_edges()
           if not at_top]
  assert not inner, "\n".join(inner)


def test_no_import_cycles():
  graph: dict[str, set[str]] = {m: set() for m in MODULES}
  for src, dst, _, _ in project_edges():
    if dst in graph and dst != src:
      graph[src].add(dst)
  state: dict[str, int] = {}  # 1 on the stack, 2 done
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)


def _declared() -> tuple[set[str], set[str]]:
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  name = lambda spec: re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower().replace("_", "-")
  required = {name(s) for s in project["dependencies"]}
  extras = {name(s) for specs in project.get("optional-dependencies", {}).values() for s in specs}
  return required, extras


def test_third_party_imports_are_declared_and_declarations_used():
  required, extras = _declared()
  used = set()
  for path in MODULES.values():
    for target, line, _ in imports(path):
      top = target.split(".")[0]
      if top in PACKAGES or top in sys.stdlib_module_names or top == "__future__":
        continue
      dist = BUNDLED.get(top) or DISTRIBUTION.get(top, top).lower().replace("_", "-")
      used.add(dist)
      assert dist in required | extras, f"{path.relative_to(ROOT)}:{line} imports {top}, not declared in pyproject.toml"
  unused = required - used - PINNED_ONLY
  assert not unused, f"declared in pyproject.toml but imported nowhere: {sorted(unused)}"


@pytest.mark.parametrize("module", ["pallas_kernels.core", "pallas_kernels.w6a_matmul", "flexq_jax.cuda.bmma"])
def test_kernel_modules_name_their_layer(module):
  assert layer(module) in (CORE, KERNEL) and module in MODULES

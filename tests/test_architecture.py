"""The package's plan, checked from the code: imports point one way, no cycles, short modules, imports on top.

The import graph is read with `ast` from every module of idenc_jax (imports inside functions included), so
a cycle or an upward edge cannot hide in a function body.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'idenc_jax'

# What each part may import (besides itself). Data flows config -> data -> train -> checkpoint ->
# personalize / evaluate; models and diffusion sit below everything, perf and experiments above.
ALLOWED = {
    'cli': set(),
    'progress': set(),
    'xla_options': set(),
    'models': set(),
    'data': {'cli', 'progress', 'configs'},
    'diffusion': {'models'},
    'train': {'models', 'data', 'diffusion', 'xla_options'},
    # configs: a run's config.json
    'personalize': {'models', 'data', 'diffusion', 'train', 'progress', 'configs', 'xla_options'},
    'evaluate': {'models', 'data', 'diffusion', 'train', 'personalize', 'progress'},
    'perf': {'models', 'data', 'diffusion', 'train', 'personalize', 'cli', 'configs', 'xla_options'},  # latency
    'experiments': {'models', 'data', 'diffusion', 'train', 'personalize', 'evaluate', 'cli', 'progress', 'configs',
                    'xla_options'},
    'demo': {'models', 'data', 'diffusion', 'personalize', 'cli', 'progress', 'configs'},
    'main': {'cli'},   # the modes' modules are imported by name at run time
}
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = path.relative_to(ROOT).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


MODULES = _modules()


def _resolve(target: str) -> str | None:
  """The project module an import names (`from a.b import c` may name module a.b.c or a name in a.b)."""
  while target:
    if target in MODULES or target.split('.')[0] == 'configs':
      return target if target in MODULES else 'configs'
    target = target.rpartition('.')[0]
  return None


def _imports(path: pathlib.Path) -> list[tuple[str, ast.stmt, bool]]:
  """(imported project module, the statement, whether it is at the top of the module)."""
  tree = ast.parse(path.read_text())
  top = {id(node) for node in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    for name in names:
      if name.startswith(('idenc_jax', 'configs')):
        resolved = _resolve(name)
        if resolved:
          out.append((resolved, node, id(node) in top))
  return out


def _part(module: str) -> str:
  if module == 'configs':
    return 'configs'
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else 'idenc_jax'


GRAPH = {name: {m for m, _, _ in _imports(path) if m != name} for name, path in MODULES.items()}


def test_graph_sees_the_package():
  # A guard against a vacuous pass: the walk finds the modules and their edges.
  assert {'idenc_jax.main', 'idenc_jax.train.loop', 'idenc_jax.models.unet'} <= set(MODULES)
  assert 'idenc_jax.models.layers' in GRAPH['idenc_jax.models.unet']
  assert 'idenc_jax.diffusion.samplers' in GRAPH['idenc_jax.diffusion.generate']


def test_no_import_cycles():
  colour: dict[str, int] = {}   # 1: on the current path, 2: finished
  cycles = []

  def visit(node, path):
    colour[node] = 1
    for dep in sorted(GRAPH.get(node, ())):
      if dep not in GRAPH:
        continue
      if colour.get(dep) == 1:
        cycles.append(path[path.index(dep):] + [dep])
      elif dep not in colour:
        visit(dep, path + [dep])
    colour[node] = 2

  for name in sorted(GRAPH):
    if name not in colour:
      visit(name, [name])
  assert not cycles, 'import cycles: ' + '; '.join(' -> '.join(c) for c in cycles)


def test_imports_point_one_way():
  upward = []
  for name, deps in GRAPH.items():
    part = _part(name)
    for dep in deps:
      dep_part = _part(dep)
      if dep_part in (part, 'idenc_jax'):
        continue
      if dep_part not in ALLOWED.get(part, set()):
        upward.append(f'{name} -> {dep}')
  assert not upward, 'imports against the layering: ' + ', '.join(sorted(upward))


def test_every_part_has_a_rule():
  assert {_part(m) for m in MODULES} - {'idenc_jax'} <= set(ALLOWED)


@pytest.mark.parametrize('name', sorted(MODULES))
def test_module_is_short(name):
  lines = len(MODULES[name].read_text().splitlines())
  assert lines <= MAX_LINES, f'{name} has {lines} lines (> {MAX_LINES}): does it hold two jobs?'


def test_project_imports_are_at_the_top():
  hidden = [f'{MODULES[name].relative_to(ROOT)}:{node.lineno}' for name in MODULES
            for _, node, at_top in _imports(MODULES[name]) if not at_top]
  assert not hidden, 'project imports inside functions (they hide cycles): ' + ', '.join(hidden)

"""The reproduction script's tables (idenc_jax/reproduce.py) from a results dict: every row it is given
lands in the Markdown with its numbers, the paper's figures beside them."""

from idenc_jax.experiments import reproduce


def _metrics(v):
  return {'oracle_id_accuracy': v, 'oracle_chance': 0.25, 'oracle_fd': 2 * v, 'diversity': 0.1}


def test_tables_include_ablation_and_restoration_columns():
  rows = {name: {'lpips': 0.1 + i / 100, 'pixel_mse': 0.01 + i / 1000, 'oracle_id_accuracy': 0.5}
          for i, name in enumerate(['restored', 'consistent', 'consistent_wrong_identity', 'baseline'])}
  results = {
      'variants': {'diffae': _metrics(0.3), 'full': dict(_metrics(0.7), sweep=[])},
      'restoration': {'sr': {'rows': rows, 'settings': {'checkpoint_step': 300}}},
  }
  md = reproduce.tables_markdown('synthetic', results)
  assert '| DiffAE |' in md and '| + identity loss (ours) |' in md
  assert '0.135' in md and '0.119' in md          # paper Table 3 beside ours
  assert 'Table 1: super-resolution (stage 2, 300 steps' in md and '(0.118, 98.6, 0.146)' in md
  for label, m in zip(reproduce.RESTORATION_ROWS.values(),
                      [rows['consistent'], rows['restored'], rows['consistent_wrong_identity'], rows['baseline']]):
    line = next(l for l in md.splitlines() if l.startswith(f'| {label} |'))
    assert f'{m["lpips"]:.4g}'[:5] in line, line
  assert 'inpainting' not in md

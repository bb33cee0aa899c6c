"""A screenshot of the web demo after one generation, taken in a real headless Chromium.

  pip install playwright        # the Python driver; the browser is the system's Chromium
  apt-get install chromium      # (Debian/Ubuntu), or pass --chromium=/path/to/chrome
  python launch/demo_screenshot.py --out=docs/demo.png [--workdir=runs/cpu]

Starts the demo on a free localhost port (the shipped weights unless --workdir), opens it, presses Generate
with the page's defaults (the first synthetic test identity), waits for the grid, and saves a full-page PNG.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from idenc_jax import demo  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='docs/demo.png')
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--chromium', default=shutil.which('chromium') or shutil.which('chromium-browser'))
  parser.add_argument('--timeout_s', type=float, default=300)
  args = parser.parse_args()
  if not args.chromium:
    sys.exit('No Chromium found: install it (apt-get install chromium) or pass --chromium=PATH.')
  from playwright.sync_api import sync_playwright   # pip install playwright

  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
  page_app = demo.build_demo(demo.load_model(args.workdir))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  page_app.queue().launch(server_name='127.0.0.1', server_port=port, prevent_thread_lock=True, quiet=True)
  try:
    with sync_playwright() as pw:
      browser = pw.chromium.launch(executable_path=args.chromium, args=['--no-sandbox'])
      page = browser.new_page(viewport={'width': 1280, 'height': 900})
      page.goto(f'http://127.0.0.1:{port}/', wait_until='networkidle')
      page.get_by_role('button', name='Generate').click()
      page.wait_for_selector('.gallery-item img, [data-testid="gallery"] img, button.thumbnail-item img',
                             timeout=args.timeout_s * 1000)
      page.wait_for_timeout(1000)   # let the last thumbnails paint
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      page.screenshot(path=args.out, full_page=True)
      browser.close()
  finally:
    page_app.close()
  print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()

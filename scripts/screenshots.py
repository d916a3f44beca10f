"""Retake the README screenshots (docs/screenshots/*.png) from the real app.

python scripts/screenshots.py

Runs the browser tests (Playwright driving Debian's Chromium: ``apt-get install chromium``)
with ``ATOKEN_SCREENSHOTS`` set, so every tab is shot after a real upload and click, on the
bundled checkpoint ``atoken-tiny`` (``ATOKEN_TEST_MODEL``; the tests themselves use the untrained
``random-tiny``). Retake them when the bundled checkpoint changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    """Run the browser tests with the screenshot folder set; returns their exit status."""
    out = ROOT / "docs" / "screenshots"
    env = dict(os.environ, ATOKEN_SCREENSHOTS=str(out))
    env.setdefault("ATOKEN_TEST_MODEL", "atoken-tiny")
    tests = ["tests/test_app_browser.py", "tests/test_app_generate.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "browser", *tests]
    status = subprocess.call(cmd, cwd=ROOT, env=env)
    print(f"screenshots in {out}: {sorted(p.name for p in out.glob('*.png'))}")
    return status


if __name__ == "__main__":
    sys.exit(main())

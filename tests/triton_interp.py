"""Running a snippet under Triton's interpreter, shared by the kernel tests that check Triton code on the CPU.

``TRITON_INTERPRET=1`` is read when a kernel is decorated, so the snippet runs in a subprocess with the flag set; it
prints one JSON line last, which is returned.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed (pip install -e '.[test]' installs it)"


def run_interpreted(code: str, timeout: int = 300) -> Any:
    """Run ``code`` under the interpreter; the JSON value of its last printed line (its stderr on failure)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])

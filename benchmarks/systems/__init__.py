"""The systems the step benchmark compares; each runs in its own child process.

``FACTORIES`` maps a system name to ``module:function``; the function takes a ``BenchSpec`` and
returns a ``BenchSystem`` (see ``systems.base``). Modules are imported only in the child that
runs them, so a missing DeepSpeed or slideformer fails that system alone.
"""

from __future__ import annotations

FACTORIES: dict[str, str] = {
    "slideformer": "systems.slideformer_sys:make",
    "resident": "systems.resident:make",
    "zero2": "systems.deepspeed_zero:make_zero2",
    "zero3": "systems.deepspeed_zero:make_zero3",
}
"""System name -> factory, in the order the report lists them."""

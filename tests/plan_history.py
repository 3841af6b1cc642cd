"""The planner's hardware rates of sessions 1-12, fitted to those sessions' engines (the torch loss path; the CPU
AdamW before and just after session 9's kernel). Since session 13 the defaults are the current engine's rates
(``planner.Hardware``); tests that check a plan against a measurement of an earlier engine plan with these."""

from __future__ import annotations

ERA_1_12 = {"gpu_tflops": 500.0, "adam_gparams": 4.5}
"""``Hardware`` keyword overrides: the rates the planner used through session 12."""

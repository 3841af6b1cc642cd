"""The planner's hardware rates of sessions 1-12, fitted to those sessions' engines (the torch loss path; the CPU
AdamW before and just after session 9's kernel). Since session 13 the defaults are the current engine's rates
(``planner.Hardware``); tests that check a plan against a measurement of an earlier engine plan with these."""

from __future__ import annotations

ERA_1_12 = {"gpu_tflops": 500.0, "adam_gparams": 4.5}
"""``Hardware`` keyword overrides: the rates the planner used through session 12."""


def own_scratch_bytes(hf_config: object) -> int:
    """The FP32 gradient scratch of the largest decoder layer (4 B/param) that engines before session 15 kept as a
    buffer of their own; since then the overlap schedule keeps it in the vocabulary slot's idle weights where they
    hold it (``runtime/resident.py``). A measurement of such an engine is planned today with its budget that much
    smaller (counts) or its allocation that much larger (peaks)."""
    from slideformer import EngineConfig
    from slideformer.planner import Hardware, make_plan

    plan = make_plan(hf_config, seq_len=1, batch_size=1, grad_accum=1, clipping=False,
                     engine=EngineConfig(device="cuda"), hardware=Hardware(gpu_memory_bytes=1 << 50,
                                                                           host_memory_bytes=1 << 50))
    return 4 * int(plan.params["largest_layer"])


RING_KEY = "vocab slot (weights; gradient: a ring of head blocks)"


def before_15_bytes(hf_config: object, plan: object, elt: int = 2) -> int:
    """What the engine before session 15 allocated beyond today's ``plan`` of the same run (compute dtype of ``elt``
    bytes; every measured run is BF16): the gradient scratch of its own (``own_scratch_bytes``) and, where today's
    plan has the blocked head's gradient ring (``runtime/head_blocks.py``), the rest of the whole matrix's gradient it
    kept instead."""
    extra = own_scratch_bytes(hf_config)
    gpu = plan.gpu  # type: ignore[attr-defined]
    if RING_KEY in gpu:
        vocab, hidden = hf_config.vocab_size, hf_config.hidden_size  # type: ignore[attr-defined]
        extra += (2 * vocab * hidden + hidden) * elt - gpu[RING_KEY]
    return extra

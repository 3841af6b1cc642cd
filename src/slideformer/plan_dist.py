"""``slideformer plan --nproc-per-node N [--nnodes M]``: the plan of a data-parallel run (``docs/distributed.md``).

Owns how one rank's plan becomes a data-parallel one. Each rank uploads and downloads only its 1/N shard of
every streamed unit (PCIe per rank / N) and the updated layers are all-gathered and the gradients
reduce-scattered over the GPUs; each node's ranks together hold one copy of the sharded host state and
update it with all the node's cores (host state and CPU AdamW per node / nodes); every rank holds the same
GPU buffers as one process, plus one shard of reduce-scatter output. So the plan is ``make_plan`` on a
machine whose link is N times and whose CPU optimizer is M times as fast per rank, with the host terms
re-counted per node and the collectives as one more bound. Invariant: with N = 1 this is ``make_plan``
unchanged; every added number follows from the printed assumptions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from slideformer.config import EngineConfig
from slideformer.errors import ConfigError
from slideformer.planner import Hardware, Plan, make_plan

COLLECTIVE_GBS = 140.0
"""GB/s per rank of an all-gather while the rank also streams host -> GPU (NVLink, measured on 2 GPUs:
``benchmarks/results/nccl_probe_2xh200_202611.json``; 253 alone). PCIe-only or cross-node links are slower."""


def data_parallel_plan(hf_config: Any, *, world: int, nodes: int, engine: EngineConfig, hardware: Hardware,
                       collective_gbs: float = COLLECTIVE_GBS, **kwargs: Any) -> Plan:
    """The plan of ``world`` GPUs on ``nodes`` machines (``hardware``: one node and one of its GPUs)."""
    if world < 1 or nodes < 1 or world % nodes:
        raise ConfigError(f"{world} GPUs on {nodes} nodes: the GPUs must split evenly over the nodes")
    if world == 1:
        return make_plan(hf_config, engine=engine, hardware=hardware, **kwargs)
    if engine.offload != "none":
        raise ConfigError("the disk tier (engine.offload) is not supported with data-parallel training yet")
    local = world // nodes
    per_rank = dataclasses.replace(hardware, pcie_gbs=hardware.pcie_gbs * world,
                                   adam_gparams=hardware.adam_gparams * nodes,
                                   host_memory_bytes=hardware.host_memory_bytes // local)
    plan = make_plan(hf_config, engine=engine, hardware=per_rank, **kwargs)

    def per_node(terms: dict[str, int]) -> dict[str, int]:
        # The sharded training state: a node holds 1/nodes of it; per-process buffers: once per rank of the node.
        return {k: (v // nodes if k in plan.state_terms else v * local) for k, v in terms.items()}

    elt = 2 if engine.compute_dtype in ("auto", "bfloat16", "float16") else 4
    plan.host, plan.pinned = per_node(plan.host), per_node(plan.pinned)
    largest = max(plan.params["largest_layer"], plan.params["embedding"])
    plan.gpu["reduce-scatter output (one shard)"] = -(-largest // world) * elt
    resident = plan.settings["resident_layers"] * plan.params["largest_layer"]
    sharded = plan.params["total"] - resident
    # Per rank and step: the weights all-gathered for forward and backward, the gradients reduce-scattered,
    # and the resident layers' FP32 gradients all-reduced (a ring moves twice the data of one direction).
    moved = ((2 * elt + elt) * sharded + 2 * 4 * resident) * (world - 1) / world
    times = dict(plan.step_seconds)
    times["collectives"] = moved / (collective_gbs * 1e9)
    times["step"] = max(times["step"], times["collectives"])
    plan.step_seconds = times
    plan.hardware = hardware
    plan.settings.update(world=world, nodes=nodes)
    tokens = plan.settings["tokens_per_micro_batch"] * plan.settings["grad_accum"]
    plan.notes.append(
        f"data-parallel: {world} GPUs on {nodes} node(s): host RAM is per node (its {local} ranks hold "
        f"{'all' if nodes == 1 else f'1/{nodes}'} of the sharded state), GPU memory per rank; PCIe per rank and "
        f"CPU AdamW per node are the figures "
        f"above; collectives assume {collective_gbs:g} GB/s per rank; {world * tokens:,} tokens per step "
        f"(~{world * tokens / times['step']:,.0f} tokens/s predicted)")
    return plan

"""``slideformer plan --nproc-per-node N [--nnodes M]``: a data-parallel run's memory per node and rank, its
step time, and the 2-GPU measurement it is checked against."""

from __future__ import annotations

import json

import pytest
from tests.plan_history import ERA_1_12
from tests.reference import llama8b_config

from slideformer.cli import main
from slideformer.config import EngineConfig
from slideformer.errors import ConfigError
from slideformer.plan_dist import data_parallel_plan
from slideformer.planner import GIB, Hardware, make_plan

HW = Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=256 * GIB)
RUN = dict(seq_len=1024, batch_size=16, grad_accum=1, clipping=False)


def test_one_gpu_is_the_single_process_plan() -> None:
    one = make_plan(llama8b_config(), engine=EngineConfig(device="cuda"), hardware=HW, **RUN)
    same = data_parallel_plan(llama8b_config(), world=1, nodes=1, engine=EngineConfig(device="cuda"), hardware=HW,
                              **RUN)
    assert same.step_seconds == one.step_seconds and same.host == one.host and same.gpu == one.gpu


def test_memory_per_node_and_rank_and_the_transfer_terms() -> None:
    e = EngineConfig(device="cuda")
    one = make_plan(llama8b_config(), engine=e, hardware=HW, **RUN)
    two = data_parallel_plan(llama8b_config(), world=2, nodes=1, engine=e, hardware=HW, **RUN)
    multi = data_parallel_plan(llama8b_config(), world=16, nodes=2, engine=e, hardware=HW, **RUN)
    state = one.host["master weights + Adam moments"]
    # One node's ranks hold one copy of the sharded state between them; across nodes it splits.
    assert two.host["master weights + Adam moments"] == state
    assert multi.host["master weights + Adam moments"] == state // 2
    # Per-rank buffers: once per rank of the node.
    assert two.host["process baseline"] == 2 * one.host["process baseline"]
    assert multi.pinned["gradient parking pool"] == 8 * one.pinned["gradient parking pool"]
    # GPU per rank: one process's buffers plus one shard of reduce-scatter output.
    assert two.gpu_total - one.gpu_total == two.gpu["reduce-scatter output (one shard)"] > 0
    # PCIe per rank falls as 1/N; the CPU AdamW per node as 1/nodes; the collectives are one more bound.
    assert two.step_seconds["pcie"] == pytest.approx(one.step_seconds["pcie"] / 2)
    assert two.step_seconds["cpu adamw"] == pytest.approx(one.step_seconds["cpu adamw"])
    assert multi.step_seconds["cpu adamw"] == pytest.approx(one.step_seconds["cpu adamw"] / 2)
    moved = 6 * two.params["total"] / 2  # BF16: weights gathered twice + gradients scattered, half from the peer
    assert two.step_seconds["collectives"] == pytest.approx(moved / 140e9)
    assert two.settings["world"] == 2 and any("data-parallel: 2 GPUs" in n for n in two.notes)
    assert two.hardware == HW  # the report prints the machine, not the per-rank scaling


def test_matches_the_measured_two_gpu_run() -> None:
    # benchmarks/results/multi_llama3.1-8b_2xh200_202611_v4.json (2x H200, 32 cores, 256 GiB; Llama-3.1-8B
    # shape, b16 x 1024 per GPU, all layers streamed): 2.403 / 2.384 s per step and 97.8 / 106.0 GiB of host
    # RSS per node on 1 / 2 GPUs. The plan assumes the H100 box's rates (same GPU die, PCIe Gen5) of the engine that
    # ran it (session 7's: tests/plan_history.ERA_1_12).
    e = EngineConfig(device="cuda")
    hw = Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=256 * GIB, **ERA_1_12)
    one = make_plan(llama8b_config(), engine=e, hardware=hw, **RUN)
    two = data_parallel_plan(llama8b_config(), world=2, nodes=1, engine=e, hardware=hw, **RUN)
    assert one.step_seconds["step"] == pytest.approx(2.403, rel=0.10)
    assert two.step_seconds["step"] == pytest.approx(2.384, rel=0.10)
    assert one.host_total / GIB == pytest.approx(97.8, rel=0.05)
    assert two.host_total / GIB == pytest.approx(106.0, rel=0.05)


def test_invalid_layouts_are_config_errors() -> None:
    e = EngineConfig(device="cuda")
    with pytest.raises(ConfigError, match="split evenly"):
        data_parallel_plan(llama8b_config(), world=3, nodes=2, engine=e, hardware=HW, **RUN)
    with pytest.raises(ConfigError, match="disk tier"):
        data_parallel_plan(llama8b_config(), world=2, nodes=1, engine=EngineConfig(device="cuda", offload="moments",
                                                                            offload_dir="/x"), hardware=HW, **RUN)


def test_cli(tmp_path, capsys) -> None:
    model = tmp_path / "m"
    model.mkdir()
    llama8b_config().to_json_file(str(model / "config.json"))
    assert main(["plan", "--model", str(model), "--gpu-memory-gib", "80", "--host-memory-gib", "256",
                 "--batch-size", "16", "--seq-len", "1024", "--nproc-per-node", "8", "--nnodes", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["world"] == 16 and out["settings"]["nodes"] == 2
    assert "collectives" in out["step_seconds"]

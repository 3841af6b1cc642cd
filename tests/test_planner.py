"""``slideformer plan``: parameter counts match real models, byte formulas, fit decisions, CLI."""

from __future__ import annotations

import json

import pytest
from tests.plan_history import ERA_1_12
from tests.reference import llama8b_config
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from slideformer.cli import main
from slideformer.config import EngineConfig, OptimConfig
from slideformer.planner import GIB, Hardware, component_params, make_plan


@pytest.mark.parametrize(
    "cfg",
    [
        LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
        Qwen2Config(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ],
    ids=["llama-untied", "qwen2-tied-bias"],
)
def test_component_params_match_the_real_model(cfg):
    params, layers, tied = component_params(cfg)
    model = AutoModelForCausalLM.from_config(cfg)
    assert params["total"] == sum(p.numel() for p in model.parameters())
    assert layers == [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert tied == cfg.tie_word_embeddings and params["embedding"] == cfg.vocab_size * cfg.hidden_size


def _plan8b(grad_accum: int = 1, clipping: bool = False, hw: Hardware | None = None):
    return make_plan(llama8b_config(), seq_len=2048, batch_size=8, grad_accum=grad_accum, clipping=clipping,
                     engine=EngineConfig(device="cuda"),
                     hardware=hw or Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=125 * GIB))


def test_llama8b_numbers_follow_the_layout():
    plan = _plan8b()
    n = plan.params["total"]
    assert 8.0e9 < n < 8.1e9  # Llama-3.1-8B has 8.03 B parameters
    assert (
        plan.host["master weights + Adam moments"] == 12 * n
        and "gradient accumulator (fp32)" not in plan.host
    )
    # The last layer's input never leaves the GPU (memory/activations.py): 31 of 32 layers on the host.
    assert plan.pinned["activation checkpoints"] == 31 * 2048 * 8 * 4096 * 2
    layer = plan.params["largest_layer"]
    assert plan.gpu["layer slots (2 x weights+grads)"] == 2 * layer * 4
    assert plan.settings["schedule"] == "overlap" and plan.fits
    assert plan.step_seconds["step"] >= max(v for k, v in plan.step_seconds.items() if k != "step")

    clipped = _plan8b(grad_accum=4, clipping=True)
    assert clipped.host["gradient accumulator (fp32)"] == 4 * n and clipped.settings["schedule"] == "deferred"
    assert clipped.host_total - plan.host_total == 4 * n

    small = _plan8b(hw=Hardware(8 * GIB, 64 * GIB))
    assert not small.fits and "DOES NOT FIT" in small.render()


def test_plan_cli(tmp_path, capsys):
    d = tmp_path / "m"
    llama8b_config().save_pretrained(str(d))
    assert (
        main(
            [
                "plan",
                "--model",
                str(d),
                "--seq-len",
                "4096",
                "--gpu-memory-gib",
                "80",
                "--host-memory-gib",
                "125",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["settings"]["seq_len"] == 4096 and out["params"]["total"] > 8e9
    assert (
        main(["plan", "--model", str(d / "config.json"), "--host-memory-gib", "32", "--gpu-memory-gib", "24"])
        == 1
    )
    text = capsys.readouterr().out
    assert "host RAM total" in text and "does NOT fit" in text
    assert main(["plan", "--model", str(tmp_path / "none")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_resident_layers_move_optimizer_work_to_the_gpu():
    hw = Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=125 * GIB)

    def plan(resident: int):
        return make_plan(llama8b_config(), seq_len=1024, batch_size=8, grad_accum=1, clipping=False,
                         engine=EngineConfig(device="cuda", resident_layers=resident), hardware=hw)

    base, res = plan(0), plan(8)
    layer = base.params["largest_layer"]
    # The gradient scratch (4 B/param of one layer) lives in the vocabulary slot's idle weights (runtime/resident.py)
    # in the overlap schedule; the deferred one (clipping) gets a buffer of its own, beside its FP32 accumulators.
    assert res.gpu["resident layers (weights + FP32 master + moments)"] == 8 * layer * 14
    clipped = make_plan(llama8b_config(), seq_len=1024, batch_size=8, grad_accum=1, clipping=True,
                        engine=EngineConfig(device="cuda", resident_layers=8), hardware=hw)
    assert clipped.gpu["resident layers (weights + FP32 master + moments)"] == 8 * layer * 18 + layer * 4
    assert res.step_seconds["cpu adamw"] < base.step_seconds["cpu adamw"]
    assert res.step_seconds["pcie"] < base.step_seconds["pcie"]
    assert res.settings["resident_layers"] == 8


def test_disk_tier_is_planned_from_the_host_budget_and_free_space():
    def plan(host_gib: float, disk_free: int | None, offload: str = "auto"):
        hw = Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=int(host_gib * GIB), disk_free_bytes=disk_free)
        return make_plan(llama8b_config(), seq_len=1024, batch_size=8, grad_accum=1, clipping=False,
                         engine=EngineConfig(device="cuda", offload=offload, offload_dir="/nvme/sf"), hardware=hw)

    roomy = plan(125, 500 * GIB)
    n = roomy.params["total"]
    assert roomy.settings["offload"] == "none" and roomy.offload_bytes == 0 and "disk" not in roomy.step_seconds
    tight = plan(64, 500 * GIB)
    assert tight.settings["offload"] == "moments" and tight.fits
    assert tight.offload_bytes == 8 * n and tight.host["master weights (moments on disk)"] == 4 * n
    ring = tight.host["disk ring (6 pieces of moments)"]
    assert ring == 6 * 2 * 4 * (32 << 20) // 2  # 6 pieces of a 32 MiB BF16 chunk's two FP32 moments: 768 MiB
    assert tight.host_total == roomy.host_total - 8 * n + ring
    # The disk roofline: every step reads and writes 8 B/param at the disk's speed.
    hw = tight.hardware
    disk_s = 8 * n / (hw.disk_read_gbs * 1e9) + 8 * n / (hw.disk_write_gbs * 1e9)
    assert tight.step_seconds["disk"] == pytest.approx(disk_s)
    assert tight.step_seconds["step"] == tight.step_seconds["disk"]
    assert "disk tier (moments, /nvme/sf)" in tight.render()
    full = plan(64, 10 * GIB)
    assert not full.fits and "DOES NOT FIT" in full.render()


@pytest.mark.parametrize("layers,hidden,inter,heads,kv,tied,batch,resident,copy,cap,measured,placement", [
    # Steps measured on the H100 box (benchmarks/results/*_h100_202611*_bench.json), overlap schedule.
    (28, 3072, 8192, 24, 8, True, 8, 0, "none", 24, 1.021, "first"),   # Llama-3.2-3B, GPU capped at 24 GiB
    (28, 3072, 8192, 24, 8, True, 8, 8, "none", 24, 0.808, "first"),   # ... with 8 resident layers
    (28, 3072, 8192, 24, 8, True, 8, 9, "none", 24, 0.747, "first"),   # ... 9 (resident_layers=-1's pick), session 3
    (28, 3072, 8192, 24, 8, True, 8, 9, "bf16", 24, 0.702, "first"),   # ... and the BF16 upload copy
    (32, 4096, 14336, 32, 8, False, 8, 0, "none", 80, 2.395, "first"),  # Llama-3.1-8B
    (32, 4096, 14336, 32, 8, False, 32, 0, "none", 80, 4.298, "first"),
    (32, 4096, 14336, 32, 8, False, 8, 18, "none", 80, 1.520, "first"),  # ... 18 resident (-1's pick for b32)
    (32, 4096, 14336, 32, 8, False, 32, 18, "none", 80, 4.271, "first"),
    # Session 5, whole embedding update, 20 resident: first (llama3.1-8b_split_h100_202611_bench) and spread
    # over the depth (its _v2 run).
    (32, 4096, 14336, 32, 8, False, 8, 20, "none", 80, 1.398, "first"),
    (32, 4096, 14336, 32, 8, False, 8, 20, "none", 80, 1.300, "spread"),
    # Session 6 (512-token loss chunks, the optimizer's order by unit index, whole embedding update): the 3B on
    # 24 GiB with 12 resident + BF16 copy (llama3.2-3b_cap24g_edf_h100_202611_bench, Liger) and the 8B b8 with
    # 22 resident spread (llama3.1-8b_spread_h100_202611_bench).
    (28, 3072, 8192, 24, 8, True, 8, 12, "bf16", 24, 0.567, "first"),
    (32, 4096, 14336, 32, 8, False, 8, 22, "none", 80, 1.342, "spread"),
    # Session 7 (non-temporal copy stores, a chunk per optimizer turn): the 3B as above on another instance
    # (llama3.2-3b_cap24g_rows_h100_202611_bench) and the 8B with spread_top and the split update, both now 'auto'
    # (llama3.1-8b_place_h100_202611_bench).
    (28, 3072, 8192, 24, 8, True, 8, 12, "bf16", 24, 0.656, "first"),
    (32, 4096, 14336, 32, 8, False, 8, 22, "none", 80, 1.193, "spread_top"),
    # Session 8 (the optimizer consumes only chunks whose copy completed): the 8B default
    # (llama3.1-8b_ab_h100_202611_bench) and the 3B above (llama3.2-3b_cap24g_tied_h100_202611_bench).
    (32, 4096, 14336, 32, 8, False, 8, 22, "none", 80, 1.125, "spread_top"),
    (28, 3072, 8192, 24, 8, True, 8, 12, "bf16", 24, 0.565, "first"),
])
def test_predicted_step_follows_the_measured_h100_steps(layers, hidden, inter, heads, kv, tied, batch, resident,
                                                        copy, cap, measured, placement):
    """The phase model of the step within -5%..+20% of the steps sessions 1-8's engines measured, planned with the
    rates of those engines (``tests/plan_history.ERA_1_12``)."""
    cfg = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied)
    plan = make_plan(cfg, seq_len=1024, batch_size=batch, grad_accum=1, clipping=False,
                     engine=EngineConfig(device="cuda", resident_layers=resident, host_copy=copy,
                                         resident_placement=placement),
                     hardware=Hardware(gpu_memory_bytes=cap * GIB, host_memory_bytes=125 * GIB, **ERA_1_12))
    assert 0.95 <= measured / plan.step_seconds["step"] <= 1.20


@pytest.mark.parametrize("resident,weights,update,measured", [
    # Session 9 (AVX-512 CPU AdamW), Llama-3.2-3B b8 on 24 GiB, BF16 copy: the weights cast on use with 14 resident,
    # whole and split (llama3.2-3b_cap24g_cast / _split9 / _final9_h100_202611_bench; 'auto' splits there) and
    # kept with 12 (the cast run's other system).
    (14, "cast", "whole", 0.540), (14, "cast", "split", 0.526), (14, "cast", "auto", 0.544),
    (12, "keep", "auto", 0.607),
])
def test_predicted_step_follows_session_9s_cast_weights(resident, weights, update, measured):
    cfg = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                      num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)
    plan = make_plan(cfg, seq_len=1024, batch_size=8, grad_accum=1, clipping=False,
                     engine=EngineConfig(device="cuda", resident_layers=resident, host_copy="bf16",
                                         resident_weights=weights, embedding_update=update),
                     hardware=Hardware(gpu_memory_bytes=24 * GIB, host_memory_bytes=125 * GIB, **ERA_1_12))
    assert 0.95 <= measured / plan.step_seconds["step"] <= 1.20


@pytest.mark.parametrize("layers,hidden,inter,tied,batch,cap,opts,measured", [
    # Session 12's engine (cb1c6b5; the fused loss kernel, the vocabulary-blocked head), every measured configuration
    # with planner residents (benchmarks/results/performance_h100_202611.md, sessions 11-13):
    # 3B b8 on a 24 GiB cap, Liger + BF16 copy: the median of 14 default children over seven runs.
    (28, 3072, 8192, True, 8, 24, {"kernels": "liger", "host_copy": "bf16"}, 0.448),
    # ... at b16 (llama3.2-3b_cap24g_b16: session 10's engine, the head then on the torch path's chunk).
    (28, 3072, 8192, True, 16, 24, {"kernels": "liger", "host_copy": "bf16", "loss_kernel": "torch"}, 0.825),
    # 3B b8 on the whole card, all resident (llama3.2-3b_tied80_ab11).
    (28, 3072, 8192, True, 8, 78, {"kernels": "liger"}, 0.420),
    # 8B b8 on the whole card (llama3.1-8b_eff11), on a 24 GiB cap every default and with the copy
    # (llama3.1-8b_cap24g_eff13), and b16 on the cap (llama3.1-8b_cap24g_b16s11).
    (32, 4096, 14336, False, 8, 78, {}, 1.123),
    (32, 4096, 14336, False, 8, 24, {}, 1.973),
    (32, 4096, 14336, False, 8, 24, {"host_copy": "bf16"}, 1.731),
    (32, 4096, 14336, False, 16, 24, {}, 2.256),
])
def test_predicted_step_follows_this_engines_h100_steps(layers, hidden, inter, tied, batch, cap, opts, measured):
    """The default rates (``Hardware``) plan today's engine: within -5%..+10% of its measured steps."""
    cfg = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=8, head_dim=128, tie_word_embeddings=tied)
    engine = EngineConfig(device="cuda", resident_layers=-1, **{"loss_kernel": "triton", **opts})
    plan = make_plan(cfg, seq_len=1024, batch_size=batch, grad_accum=1, clipping=False, engine=engine,
                     hardware=Hardware(gpu_memory_bytes=cap * GIB, host_memory_bytes=125 * GIB))
    assert 0.95 <= measured / plan.step_seconds["step"] <= 1.10


def test_plan_suggests_faster_settings_that_fit(tmp_path, capsys):
    """A 3B model on a 24 GiB GPU with the defaults: `plan` names resident layers and the BF16 copy."""
    LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True).save_pretrained(str(tmp_path))
    args = ["plan", "--model", str(tmp_path), "--seq-len", "1024", "--batch-size", "8", "--gpu-memory-gib", "24",
            "--host-memory-gib", "125"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "suggestion: engine.resident_layers=-1" in out and "suggestion: engine.host_copy=bf16" in out
    # 44 GiB holds the 41.4 GiB plan but not the copy's 6 GiB more: only the resident layers are suggested.
    assert main([*args[:-1], "44"]) == 0
    out = capsys.readouterr().out
    assert "suggestion: engine.resident_layers=-1" in out and "host_copy=bf16" not in out


def test_masters_on_disk_are_planned_when_even_the_moments_layout_does_not_fit():
    def plan(host_gib: float, offload: str = "auto", host_copy: str = "auto"):
        hw = Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=int(host_gib * GIB), disk_free_bytes=500 * GIB)
        eng = EngineConfig(device="cuda", offload=offload, offload_dir="/nvme/sf", host_copy=host_copy)
        return make_plan(llama8b_config(), seq_len=1024, batch_size=8, grad_accum=1, clipping=False, engine=eng,
                         hardware=hw)

    moments = plan(64)
    assert moments.settings["offload"] == "moments"
    tight = plan(32)
    n, layers = tight.params["total"], tight.params["decoder_layers"]
    assert tight.settings["offload"] == "all" and tight.settings["host_copy"] == "bf16" and tight.fits
    assert tight.host["embedding + head masters (rest on disk)"] == 4 * (n - layers)
    assert tight.host["disk ring (6 pieces of masters + moments)"] == 6 * 3 * 4 * (32 << 20) // 2
    assert tight.pinned["BF16 upload copies of the masters (2 B/param)"] == 2 * (n - tight.params["embedding"])
    assert tight.offload_bytes == 8 * n + 4 * layers
    hw = tight.hardware
    moved = 8 * n + 4 * layers
    disk_s = moved / (hw.disk_read_gbs * 1e9) + moved / (hw.disk_write_gbs * 1e9)
    assert tight.step_seconds["disk"] == pytest.approx(disk_s)
    assert "disk tier (all, /nvme/sf)" in tight.render()
    assert plan(32, host_copy="none").settings["offload"] == "moments"  # no BF16 copy: the masters stay in RAM
    assert plan(128, offload="all", host_copy="bf16").settings["offload"] == "all"


def test_activation_checkpoints_on_disk_are_counted_in_space_and_traffic(tmp_path, capsys):
    def plan(acts: bool, offload: str = "none", grad_accum: int = 1):
        hw = Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=125 * GIB, disk_free_bytes=500 * GIB)
        eng = EngineConfig(device="cuda", offload=offload, offload_dir="/nvme/sf", offload_activations=acts)
        return make_plan(llama8b_config(), seq_len=1024, batch_size=8, grad_accum=grad_accum, clipping=False,
                         engine=eng, hardware=hw)

    off, on = plan(False), plan(True)
    act_file = 31 * 8 * 1024 * 4096 * 2  # every layer input but the last, BF16, of one micro-batch: 1.94 GiB
    assert on.disk["offload: activation checkpoints (one micro-batch)"] == act_file
    assert on.offload_bytes == act_file and off.offload_bytes == 0
    # Pinned: a 4-layer ring instead of all 31 inputs.
    assert off.pinned["activation checkpoints"] == 31 * 8 * 1024 * 4096 * 2
    assert on.pinned["activation checkpoints"] == 4 * 8 * 1024 * 4096 * 2
    hw = on.hardware
    per_mb = act_file / (hw.disk_read_gbs * 1e9) + act_file / (hw.disk_write_gbs * 1e9)
    assert "disk" not in off.step_seconds and on.step_seconds["disk"] == pytest.approx(per_mb)
    assert plan(True, grad_accum=3).step_seconds["disk"] == pytest.approx(3 * per_mb)  # each micro-batch
    # With the moments on disk too, the traffic adds up on the one disk.
    both, moments = plan(True, offload="moments"), plan(False, offload="moments")
    assert both.step_seconds["disk"] == pytest.approx(moments.step_seconds["disk"] + per_mb)
    assert both.offload_bytes == moments.offload_bytes + act_file
    assert "disk tier (none + activations, /nvme/sf)" in on.render()
    assert any("offload_activations" in n for n in on.notes)
    # The command line turns it on.
    model = tmp_path / "m"
    model.mkdir()
    llama8b_config().to_json_file(str(model / "config.json"))
    assert main(["plan", "--model", str(model), "--gpu-memory-gib", "80", "--host-memory-gib", "125",
                 "--offload-dir", str(tmp_path), "--offload-activations", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["offload_activations"] is True
    assert out["disk"]["offload: activation checkpoints (one micro-batch)"] > 0


def test_plan_names_the_embedding_update_auto_would_take() -> None:
    """Same-run H100 measurements (sessions 6-8, planned with those engines' rates): the split embedding update was
    faster for the untied 8B (its early part needs no download), slower for the tied 3B: 'auto' follows that, and an
    explicit choice against it gets a note."""
    llama3b = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                          num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    key = "embedding rows' gradient (split update)"

    def plan(cfg, gib: int, update: str, **engine: object) -> tuple[bool, list[str]]:
        opts = {"resident_layers": -1, "loss_kernel": "torch", **engine}  # the measured runs' loss path
        plan = make_plan(cfg, seq_len=1024, batch_size=8, grad_accum=1, clipping=False,
                         engine=EngineConfig(device="cuda", embedding_update=update, **opts),
                         hardware=Hardware(gpu_memory_bytes=gib * GIB, host_memory_bytes=125 * GIB, **ERA_1_12))
        return key in plan.gpu, [n for n in plan.notes if "'auto' would" in n]

    assert plan(llama8b_config(), 80, "auto") == (True, [])  # untied: split
    assert plan(llama8b_config(), 80, "split") == (True, [])
    split, notes = plan(llama8b_config(), 80, "whole")
    assert not split and "'auto' would split" in notes[0]
    # tied: whole, with the 12 kept layers those runs had (since session 14 the count leaves the measured allocator
    # reserve free instead of 10% of the budget, and the same card holds more)
    measured = {"resident_layers": 12, "resident_weights": "keep"}
    assert plan(llama3b, 24, "auto", host_copy="bf16", **measured) == (False, [])
    assert plan(llama3b, 24, "whole", **measured) == (False, [])
    split, notes = plan(llama3b, 24, "split", host_copy="bf16", **measured)
    assert split and "keep this tied embedding whole" in notes[0]


def test_plan_says_which_loss_path_auto_was_planned_as(monkeypatch: pytest.MonkeyPatch) -> None:
    """``engine.loss_kernel=auto`` resolves where the plan runs (session 17: a plan made without triton kept 16
    resident layers for the 3B headline where the box kept 17), so the plan says which path it assumed."""
    from slideformer.kernels import cross_entropy

    def notes() -> list[str]:
        plan = make_plan(llama8b_config(), seq_len=1024, batch_size=8, grad_accum=1, clipping=False,
                         engine=EngineConfig(device="cuda"),
                         hardware=Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=125 * GIB, **ERA_1_12))
        return [n for n in plan.notes if n.startswith("engine.loss_kernel=auto")]

    monkeypatch.setattr(cross_entropy, "triton", object())
    assert len(got := notes()) == 1 and "fused Triton loss kernel" in got[0]
    monkeypatch.setattr(cross_entropy, "triton", None)
    assert len(got := notes()) == 1 and "set loss_kernel: triton" in got[0]
    plan = make_plan(llama8b_config(), seq_len=1024, batch_size=8, grad_accum=1, clipping=False,
                     engine=EngineConfig(device="cuda", loss_kernel="torch"),
                     hardware=Hardware(gpu_memory_bytes=80 * GIB, host_memory_bytes=125 * GIB, **ERA_1_12))
    assert not [n for n in plan.notes if "loss_kernel" in n]


def test_park_backlog_is_the_host_time_a_backward_at_the_gpus_pace_leaves() -> None:
    from slideformer.plan_time import park_backlog_bytes

    hw = Hardware(gpu_memory_bytes=24 * GIB, host_memory_bytes=125 * GIB)
    # No copies: the host's busy time is its AdamW, 2.0 s; the backward is 3/4 of 1.0 s of compute.
    times = {"gpu compute": 1.0, "cpu adamw": 2.0, "pcie": 0.0}
    assert park_backlog_bytes(times, hw, host_params=1_000_000, elt=2) == int((1 - 0.75 / 2.0) * 2_000_000)
    # A GPU-bound step leaves no backlog.
    assert park_backlog_bytes({**times, "cpu adamw": 0.5}, hw, host_params=1_000_000, elt=2) == 0


def test_plan_names_the_parking_pool_a_host_bound_backward_needs() -> None:
    """Session 19: the 8B b8 on a 24 GiB cap outruns the 2 GiB pool by ~7.8 GiB; an 8 GiB pool measured 11% faster.
    The plan names that pool, says whether the host has the RAM, and is silent where the pool already holds the
    backlog or the GPU bounds the step (the 8B on the whole card, the 3B headline)."""
    def notes(cfg, cap: float, host_gib: float = 125, **opts) -> list[str]:
        engine = EngineConfig(device="cuda", resident_layers=-1, **{"loss_kernel": "triton", **opts})
        plan = make_plan(cfg, seq_len=1024, batch_size=8, grad_accum=1, clipping=False, engine=engine,
                         hardware=Hardware(gpu_memory_bytes=int(cap * GIB), host_memory_bytes=int(host_gib * GIB)))
        return [n for n in plan.notes if "parking pool" in n]

    cfg = llama8b_config()
    (note,) = notes(cfg, 24)
    assert "engine.grad_park_mib=8192 (6.0 GiB more pinned RAM, which this host has)" in note
    engine = EngineConfig(device="cuda", resident_layers=-1, loss_kernel="triton")
    hinted = make_plan(cfg, seq_len=1024, batch_size=8, grad_accum=1, clipping=False, engine=engine,
                       hardware=Hardware(gpu_memory_bytes=24 * GIB, host_memory_bytes=125 * GIB))
    assert hinted.settings["grad_park_mib_hint"] == 8192
    (note,) = notes(cfg, 24, host_gib=100)
    assert "more than this host has left" in note
    assert notes(cfg, 24, grad_park_mib=8192) == []
    assert notes(cfg, 78) == []
    cfg3b = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)
    assert notes(cfg3b, 24, kernels="liger", host_copy="bf16") == []


def test_plan_of_a_config_counts_the_resident_layers_its_run_keeps(tmp_path, capsys) -> None:
    """A config's ``engine.gpu_memory_gib`` is the engine's budget beside the CUDA context
    (``placement.engine_resident_count``); ``--gpu-memory-gib`` is a card's whole memory, the context in it. The 8B b8
    with 24 GiB: the engine kept 6 resident layers on the H100 box (session 19's runs); the config's plan now counts
    the same, a 24 GiB card one fewer."""
    from dataclasses import replace

    from slideformer.placement import resident_choice

    d = tmp_path / "m"
    llama8b_config().save_pretrained(str(d))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{path: {d}}}\ndata: {{seq_len: 1024}}\ntrain: {{batch_size: 8}}\n"
                   "engine: {resident_layers: -1, gpu_memory_gib: 24, loss_kernel: triton}\n")
    engine = EngineConfig(resident_layers=-1, gpu_memory_gib=24, loss_kernel="triton")
    run = resident_choice(llama8b_config(), tokens=8192, engine=replace(engine, device="cuda"), deferred=False,
                          gpu_budget_bytes=24 * GIB).count

    def resident(*flags: str) -> int:
        assert main(["plan", str(cfg), "--host-memory-gib", "125", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["settings"]["resident_layers"]

    assert run == 6 and resident() == run
    assert resident("--gpu-memory-gib", "24") == 5


def test_a_run_whose_backward_outruns_the_host_logs_the_pool_it_needs() -> None:
    """``build.park_hint``, the train log's hint: the plan of the engine's own run (its resident layers, micro-batch
    of ``max_tokens_per_micro_batch``) names the pool for the 8B b8 with 6 cast resident layers (the engine's count
    on a 24 GiB budget, session 19), and nothing once the pool holds the backlog, without a GPU or a known
    micro-batch, or for the 8B with 22 resident layers (GPU-bound)."""
    from types import SimpleNamespace

    from slideformer.runtime.build import park_hint

    def engine(resident: int, **opts) -> SimpleNamespace:
        cfg = EngineConfig(device="cuda", gpu_memory_gib=24, resident_layers=-1, loss_kernel="triton",
                           **{"max_tokens_per_micro_batch": 8192, **opts})
        return SimpleNamespace(cfg=cfg, hf_config=llama8b_config(), optim_cfg=OptimConfig(max_grad_norm=None),
                               ops=SimpleNamespace(is_cuda=True), offload=None, dist=None,
                               resident=SimpleNamespace(cast=True), resident_idx=list(range(resident)),
                               host_copy=False, resident_head="auto")

    hint = park_hint(engine(6))
    assert "engine.grad_park_mib=8192 (6.0 GiB more pinned RAM" in hint and "parking pool" in hint
    assert park_hint(engine(6, grad_park_mib=8192)) == ""
    assert park_hint(engine(22)) == ""
    assert park_hint(engine(6, max_tokens_per_micro_batch=0)) == ""
    cpu = engine(6)
    cpu.ops.is_cuda = False
    assert park_hint(cpu) == ""


def test_plan_takes_the_train_command_lines_overrides(tmp_path, capsys) -> None:
    """``slideformer plan`` applies train's ``--section.key=value`` overrides to its config, so a run's command line
    plans as it would run: the model path, the batch, the pool the hint names (whose note then goes away); an unknown
    key is refused with the nearest real one, as train refuses it."""
    d = tmp_path / "m"
    llama8b_config().save_pretrained(str(d))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {seq_len: 1024}\ntrain: {batch_size: 8}\n"
                   "engine: {device: cuda, resident_layers: -1, gpu_memory_gib: 24, loss_kernel: triton}\n")

    def plan(*flags: str) -> dict:
        assert main(["plan", str(cfg), "--host-memory-gib", "125", "--json", f"--model.path={d}", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    default = plan()
    assert default["settings"]["grad_park_mib_hint"] == 8192 and default["settings"]["batch_size"] == 8
    bigger = plan("--engine.grad_park_mib=8192")
    assert bigger["settings"]["grad_park_mib_hint"] == 0
    assert bigger["pinned"]["gradient parking pool"] == 8192 * 2**20
    assert plan("--train.batch_size", "16")["settings"]["batch_size"] == 16
    assert main(["plan", str(cfg), f"--model.path={d}", "--engine.grad_park_mb=8192"]) == 2
    assert "did you mean 'grad_park_mib'" in capsys.readouterr().err

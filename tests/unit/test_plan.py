"""The planner: DeepSpeed's partitioning of the model states by hand, and `python -m ds_vlm.plan` run on the
tiny models of every family from their config alone (activations traced on fake tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.models import load_4bit

from ds_vlm.memplan.cli import main
from ds_vlm.memplan.planner import model_states, persistent_numel

ROOT = Path(__file__).resolve().parents[2]


def test_model_states_follow_zero_partitioning():
    n = t = 1_000_000_000
    zero0 = model_states(n, t, 0, 8, 2)
    assert (zero0.weights, zero0.gradients, zero0.optimizer) == (2e9, 2e9, 12e9)  # bf16 weights, grads; fp32 x3
    zero2 = model_states(n, t, 2, 8, 2, {"reduce_bucket_size": 5e8})
    assert (zero2.weights, zero2.gradients, zero2.optimizer, zero2.buckets) == (2e9, 4e9 / 8, 12e9 / 8, 5e8 * 2)
    # the bucket is allocated whole whatever the model's size, twice with overlap_comm (ZeRO-1/2)
    small = model_states(1000, 1000, 2, 8, 2, {"reduce_bucket_size": 5e8, "overlap_comm": True})
    assert small.buckets == 2 * 5e8 * 2
    zero3 = model_states(n, t, 3, 8, 2, {"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e8,
                                         "stage3_prefetch_bucket_size": 5e7})
    assert zero3.weights == pytest.approx(2e9 / 8 + (1e8 + 5e7) * 2) and zero3.optimizer == 12e9 / 8
    layered = model_states(n, t, 3, 8, 2, {}, largest_module=10_000_000)  # two modules gathered at a time
    assert layered.weights == pytest.approx(2e9 / 8 + 2 * 10_000_000 * 2)
    # parameters under stage3_param_persistence_threshold stay whole on every rank
    assert persistent_numel([10, 99_999, 100_000, 5_000_000], {"stage": 3}) == 100_009
    assert persistent_numel([10], {"stage": 3, "stage3_param_persistence_threshold": 0}) == 0
    kept = model_states(n, t, 3, 8, 2, {}, largest_module=10_000_000, persistent=8_000_000)
    assert kept.weights == pytest.approx(layered.weights + 8_000_000 * 2 * 7 / 8)
    offloaded = model_states(n, t, 2, 8, 2, {"offload_optimizer": {"device": "cpu"}})
    assert offloaded.optimizer == 0
    frozen = model_states(n, 0, 2, 8, 2)  # nothing trains: no gradients, no optimizer states
    assert frozen.gradients == frozen.optimizer == 0



def test_4bit_weights_count_whole_and_take_their_stored_bytes(demo_dir):
    """QLoRA's 4-bit weights (bitsandbytes on the CPU): each counts its real number of weights (numel() of the
    packed storage is half), and the model states hold them at their stored bytes: half a byte a weight, one
    uint8 scale per block of 64, one fp32 scale per 256 of those, the NF4 code (16 fp32) and the scales' code (256
    fp32) and an fp32 offset, per layer; the other weights in fp32. The planner's own model, not quantized, is
    given the same 4-bit weights and bytes."""
    from transformers import AutoModelForImageTextToText

    from ds_vlm.config import ModelConfig
    from ds_vlm.memplan.planner import ParamCounts, four_bit_params
    from ds_vlm.models import adapter_for

    plain = sum(p.numel() for p in AutoModelForImageTextToText.from_pretrained(demo_dir / "model").parameters())
    counts = ParamCounts.of(load_4bit(demo_dir / "model", ModelConfig(path="m", lora_rank=4, lora_bits=4)))
    linears = [(64, 64), (32, 64), (32, 64), (64, 64), (192, 64), (192, 64), (64, 192)]  # q k v o gate up down
    n_4bit = [out * into for _ in range(2) for out, into in linears]  # 2 layers
    assert counts.n_params == plain and counts.n_quantized == sum(n_4bit)
    assert counts.quantized_bytes == sum(n // 2 + n // 64 + 4 * -(-n // 64 // 256) + 4 * (16 + 256 + 1)
                                         for n in n_4bit)
    states = counts.states(stage=2, world=1, bytes_per_param=4, zero={})
    assert states.weights == (plain - counts.n_quantized) * 4 + counts.quantized_bytes
    # the offline planner's model is not quantized: it finds the same weights and bytes
    model = AutoModelForImageTextToText.from_pretrained(demo_dir / "model")
    planned = ParamCounts.of(model, four_bit_params(model, adapter_for("qwen3_vl")))
    assert (planned.n_params, planned.n_quantized, planned.quantized_bytes) == \
        (counts.n_params, counts.n_quantized, counts.quantized_bytes)


def test_model_states_of_muon_and_hpz():
    """Muon: one momentum in the gradients' dtype per Muon parameter (ZeRO-1/2 stage the step's in a second
    buffer) against AdamW's two fp32 moments; hpZ: a secondary copy of the weights over a node's ranks."""
    n = t = 1_000_000_000
    m = 800_000_000  # the hidden matrices; the rest (embeddings, norms) stay on AdamW
    zero3 = model_states(n, t, 3, 16, 2, {}, muon_trained=m)
    assert zero3.optimizer == pytest.approx((4 * t + 8 * (t - m) + 2 * m) / 16)
    zero2 = model_states(n, t, 2, 16, 2, {}, muon_trained=m)
    assert zero2.optimizer == pytest.approx((4 * t + 8 * (t - m) + 2 * 2 * m) / 16)
    plain = model_states(n, t, 3, 16, 2, {})
    hpz = model_states(n, t, 3, 16, 2, {"zero_hpz_partition_size": 8})
    assert hpz.weights - plain.weights == pytest.approx(2e9 / 8)
    quantized = model_states(n, t, 3, 16, 2, {"zero_hpz_partition_size": 8, "zero_quantized_weights": True})
    assert quantized.weights - plain.weights == pytest.approx(1e9 / 8)


def test_model_states_under_expert_parallelism():
    """EP 4 over 16 ranks: each rank keeps a quarter of the experts' weights (ZeRO-2 keeps weights whole);
    their gradients and optimizer states stay 1/16 (partitioned over the 4 ranks holding the same experts)."""
    n = t = 1_000_000_000
    e = 600_000_000
    dense = model_states(n, t, 2, 16, 2, {}, experts=e)
    ep = model_states(n, t, 2, 16, 2, {}, experts=e, ep=4)
    assert dense.weights - ep.weights == pytest.approx(e * 3 / 4 * 2)
    assert (dense.gradients, dense.optimizer) == (ep.gradients, ep.optimizer)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "qwen2_5_vl", "qwen2_vl", "llava", "qwen3_5",
                                    "qwen3_5_moe", "gemma3", "gemma4", "smolvlm", "glm46v"])
def test_plan_runs_from_the_config_for_every_stage(family, family_models, tmp_path, capsys, monkeypatch):
    """The plan of each family at ZeRO-0, 2 and 3. The stage changes the model states, not the micro-batch nor its
    activations: the first plan's fake-tensor trace (seconds each, ~8 s for Qwen3.5's chunked linear attention)
    is reused by the other two, which are given the same micro-batch (checked)."""
    from ds_vlm.memplan import cli

    traced = {}

    def trace_once(config, model_config, adapter, micro, dtype, sp=1):
        key = (tuple(micro.labels.shape), int(micro.labels.sum()), micro.tokens, dtype, sp)
        if traced:
            assert key in traced, (key, list(traced))  # the same micro-batch at every stage
        else:
            traced[key] = planner_trace(config, model_config, adapter, micro, dtype, sp)
        return traced[key]

    planner_trace = cli.trace_activations
    monkeypatch.setattr(cli, "trace_activations", trace_once)
    model = family_models(family)
    peaks = {}
    for stage in (0, 2, 3):
        out = tmp_path / f"plan{stage}.json"
        rc = main(["--model", str(model), "--deepspeed", str(small_buckets(stage, tmp_path)),
                   "--world_size", "2", "--device", "cpu", "--micro_batch_size", "2", "--max_length", "512",
                   "--gpu_memory_gb", "16", "--out", str(out)])
        report = json.loads(out.read_text())
        assert rc == 0 and report["fits"], capsys.readouterr()
        assert report["peak_gb_per_rank"] > report["per_rank_gb"]["activations"] > 0
        assert report["max_tokens_per_batch_that_fits"] > 512
        assert report["worst_micro_batch"]["image_tokens"] > 0
        by_part = report["activations_by_part_gb"]  # what made the activations alive at their peak
        assert by_part["language tower"] > 0 and by_part["vision tower"] > 0, by_part
        peaks[stage] = report["per_rank_gb"]
    assert peaks[3]["weights"] != peaks[2]["weights"] == peaks[0]["weights"]  # ZeRO-3 partitions the weights
    if not family.endswith("_moe"):  # the tiny MoE's fused experts, gathered two modules at a time, outweigh 1/2 of it
        assert peaks[3]["weights"] < peaks[2]["weights"]
    assert peaks[2]["optimizer_states"] < peaks[0]["optimizer_states"]
    assert "fits" in capsys.readouterr().out


def small_buckets(stage: int, tmp_path: Path) -> Path:
    """ds_configs/zeroN.json with buckets for a tiny model (the default 5e8 elements are 2 GB in fp32) and,
    under ZeRO-3, every parameter partitioned (a tiny model's are all under the persistence threshold)."""
    config = json.loads((ROOT / "ds_configs" / f"zero{stage}.json").read_text())
    if stage:
        config["zero_optimization"].update(reduce_bucket_size=1e5, stage3_param_persistence_threshold=0)
    path = tmp_path / f"zero{stage}_small.json"
    path.write_text(json.dumps(config))
    return path


def test_a_plan_that_does_not_fit_says_what_would(family_models, tmp_path, capsys):
    model = family_models("qwen3_vl")
    rc = main(["--model", str(model), "--deepspeed", str(small_buckets(2, tmp_path)), "--world_size", "2",
               "--device", "cpu", "--micro_batch_size", "8", "--max_length", "4096", "--gpu_memory_gb", "0.05",
               "--out", str(tmp_path / "plan.json")])
    report = json.loads((tmp_path / "plan.json").read_text())
    assert rc == 1 and not report["fits"]
    changes = {alt["change"].split(" ")[0]: alt for alt in report["would_fit"]}
    assert "--max_tokens_per_batch" in changes and changes["--max_tokens_per_batch"]["fits"]
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_traced_activations_match_the_profilers_measurement(demo_dir):
    """One row of python -m benchmarks.plan_accuracy: the real forward and backward of 8 demo records with
    images and checkpointing, measured by torch.profiler's memory timeline, against the planner's trace of the
    same micro-batch on fake tensors (no shared code): within 10%."""
    from benchmarks.plan_accuracy import TARGET, compare

    records = [json.loads(line) for line in (demo_dir / "data" / "train.jsonl").read_text().splitlines()[:8]]
    for record in records:
        record["images"] = [str(demo_dir / "data" / p) for p in record["images"]]
    row = compare(str(demo_dir / "model"), records, {"gradient_checkpointing": True}, packing=False)
    assert row["measured_mb"] > 1 and abs(row["ratio"] - 1) <= TARGET, row


def test_sequence_parallelism_is_traced_per_rank_slice(family_models, tmp_path):
    """--sequence_parallel 2: one rank's slice traced (its tokens, the all-to-all's buffers, the whole vision
    tower), not the whole trace halved: less than the whole, more than half of it minus nothing at all."""
    model = family_models("qwen3_vl")
    acts = {}
    for sp in (1, 2):
        out = tmp_path / f"sp{sp}.json"
        main(["--model", str(model), "--deepspeed", str(small_buckets(2, tmp_path)), "--world_size", "2",
              "--device", "cpu", "--micro_batch_size", "4", "--max_length", "512", "--gpu_memory_gb", "16",
              "--sequence_parallel", str(sp), "--out", str(out)])
        acts[sp] = json.loads(out.read_text())
    whole, rank = acts[1]["per_rank_gb"]["activations"], acts[2]["per_rank_gb"]["activations"]
    assert 0.3 * whole < rank < 0.9 * whole, (whole, rank)
    assert acts[2]["step_flops_per_rank"] == pytest.approx(acts[1]["step_flops_per_rank"] / 2)


def test_the_step_time_takes_the_gpu_checks_measured_mfu(tmp_path):
    from ds_vlm.memplan.cli import DEFAULT_MFU, mfu_to_assume

    check = tmp_path / "gpu_check.json"
    check.write_text(json.dumps({"stages": [{"name": "sweep_2b", "detail": {"rows": [
        {"tokens": 8000, "status": "ok", "mfu": 0.30}, {"tokens": 64000, "status": "ok", "mfu": 0.42},
        {"tokens": 128000, "status": "out of memory"}]}}]}))
    assert mfu_to_assume(0.0, str(check), 60000)[0] == 0.42
    assert mfu_to_assume(0.0, str(check), 9000)[0] == 0.30
    assert mfu_to_assume(0.5, str(check), 9000) == (0.5, "--mfu")
    assert mfu_to_assume(0.0, "", 9000)[0] == DEFAULT_MFU

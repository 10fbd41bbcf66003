"""The planner's step-time floor (gpt2_jax.plan.step_time): its arithmetic on synthetic plans, the bytes it divides
(collective_sends, hbm_traffic) on small HLO texts, and the chips' tables. The real compile's check is in
test_plan.py (test_step_time_of_a_tpu_compile), beside the compiles it shares."""

import pytest

from gpt2_jax.metrics import PEAK_BF16_FLOPS
from gpt2_jax.plan import hlo, parse_target
from gpt2_jax.plan.hardware import CHIP_BANDWIDTH, ChipBandwidth, chip_of
from gpt2_jax.plan.record import Plan
from gpt2_jax.plan.step_time import describe, plan_step_time, step_time

BW = ChipBandwidth(hbm=1e12, link=2e11, link_name="ICI", source="test")


def synthetic(**kw) -> Plan:
    p = Plan("none", 64, True, 1, 2, memory={"argument": 1, "output": 0, "alias": 0, "temp": 1, "code": 0},
             flops_6n=8e15, flops_per_step=9e15, collective_sends={"all-reduce": 3e10, "all-gather": 1e10},
             bytes_accessed=5e9, hbm_bytes=6e11)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_step_time_arithmetic_on_a_synthetic_plan():
    st = step_time(synthetic(), chips=8, peak=1e14, bandwidth=BW)
    compute, comm, memory = 8e15 / (8 * 1e14), 4e10 / 2e11, 6e11 / 1e12  # 10 s, 0.2 s, 0.6 s
    assert (st["compute_s"], st["comm_s"], st["memory_s"]) == (compute, comm, memory)
    assert st["floor_s"] == max(compute, comm, memory) and st["floor_no_overlap_s"] == compute + comm + memory
    assert st["mfu_ceiling"] == 1.0 and st["bound"] == "compute"
    assert st["mfu_ceiling_no_overlap"] == pytest.approx(compute / (compute + comm + memory), rel=1e-15)
    assert st["compute_xla_s"] == 9e15 / (8 * 1e14)  # shown, not in the ceilings
    assert st["comm_bytes_per_chip"] == 4e10 and st["memory_bytes_per_chip"] == 6e11


def test_step_time_communication_bound():
    st = step_time(synthetic(flops_6n=8e13, hbm_bytes=1.5e11), chips=8, peak=1e14, bandwidth=BW)
    assert (st["compute_s"], st["comm_s"], st["memory_s"]) == (0.1, 0.2, 0.15)
    assert st["bound"] == "communication" and st["floor_s"] == 0.2
    assert st["mfu_ceiling"] == pytest.approx(0.1 / 0.2, rel=1e-15)
    assert st["mfu_ceiling_no_overlap"] == pytest.approx(0.1 / (0.1 + 0.2 + 0.15), rel=1e-15)
    assert 0 < st["mfu_ceiling_no_overlap"] < st["mfu_ceiling"] <= 1


def test_step_time_without_bytes_accessed_has_no_memory_floor():
    """A GPU compile: the compiler reports no bytes accessed, so there is no memory-traffic time, and the ceilings
    come from compute and communication alone."""
    st = step_time(synthetic(bytes_accessed=None, hbm_bytes=None, flops_6n=8e13), chips=8, peak=1e14, bandwidth=BW)
    assert st["memory_s"] is None and st["memory_bytes_per_chip"] is None
    assert st["floor_no_overlap_s"] == pytest.approx(0.3, rel=1e-15)
    assert st["mfu_ceiling_no_overlap"] == pytest.approx(1 / 3, rel=1e-15)


def test_step_time_on_one_chip_has_no_communication():
    st = step_time(synthetic(collective_sends={}, bytes_accessed=None, hbm_bytes=None), chips=1, peak=1e14,
                   bandwidth=BW)
    assert st["comm_s"] == 0.0 and st["compute_s"] == 80.0 and st["mfu_ceiling"] == st["mfu_ceiling_no_overlap"] == 1
    assert any("no communication" in line for line in describe(st))


def test_step_time_needs_a_peak_a_bandwidth_and_a_compile():
    assert step_time(synthetic(), chips=8, peak=None, bandwidth=BW) is None  # a CPU: no peak
    assert step_time(synthetic(), chips=8, peak=1e14, bandwidth=None) is None
    assert step_time(synthetic(memory={}), chips=8, peak=1e14, bandwidth=BW) is None  # refused: nothing compiled
    assert describe(None) == []


def test_step_time_report_names_the_floor_and_its_sources():
    lines = describe(step_time(synthetic(), chips=8, peak=1e14, bandwidth=BW))
    assert lines[0].startswith("step-time FLOOR (the step cannot be faster than this")
    assert "MFU ceiling 100.0% with overlap" in "\n".join(lines)
    assert lines[-1].startswith("  sources: peak dense bf16 FLOP/s") and lines[-1].endswith("test")


@pytest.mark.parametrize("target, kind, peak, hbm, link", [
    ("h100", "NVIDIA H100 80GB HBM3", 989e12, 3.35e12, 450e9),
    ("h200", "NVIDIA H200", 989e12, 4.8e12, 450e9),
    ("a100", "NVIDIA A100-SXM4-80GB", 312e12, 2.039e12, 300e9),
    ("v4-8", "TPU v4", 275e12, 1.2e12, 300e9),
    ("v5e-8", "TPU v5 lite", 197e12, 819e9, 200e9),
    ("v5p-8", "TPU v5", 459e12, 2.765e12, 600e9),
    ("v6e-8", "TPU v6 lite", 918e12, 1.638e12, 400e9),
])
def test_step_time_tables_per_target(target, kind, peak, hbm, link):
    """The peaks come from metrics' table (one copy), the bandwidths from hardware's; a target and the same chip
    attached (--target=local) find the same row. Link figures are per direction: half the bidirectional ones."""
    spec = parse_target(target)
    chip = chip_of(spec, kind)
    assert chip_of(parse_target("local"), kind) == chip
    assert (CHIP_BANDWIDTH[chip].hbm, CHIP_BANDWIDTH[chip].link) == (hbm, link)
    st = plan_step_time(synthetic(), chip, kind, 8)
    assert st["peak_flops_per_chip"] == peak and peak in PEAK_BF16_FLOPS.values()
    assert st["compute_s"] == 8e15 / (8 * peak) and st["comm_s"] == 4e10 / link and st["memory_s"] == 6e11 / hbm


def test_step_time_unknown_chips():
    assert chip_of(parse_target("local"), "cpu") == "" and chip_of(parse_target("local"), "NVIDIA H100 PCIe") == ""
    assert plan_step_time(synthetic(), "", "cpu", 1) is None


def test_step_time_collective_sends_by_group():
    """Each device's bytes sent: the ring algorithms' factors for the group size, written in each of XLA's forms
    (explicit groups, iota, mesh axes), an async pair's groups read off its -start, loop trips counted."""
    hlo_text = """HloModule m, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = bf16[16,4]{1,0} all-gather(bf16[2,4]{1,0} %x), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}
  %ars = f32[8]{0} all-reduce-start(f32[8]{0} %y), channel_id=4, replica_groups={{0,1,2,3},{4,5,6,7}}, to_apply=%add
  %ard = f32[8]{0} all-reduce-done(f32[8]{0} %ars)
}

%cond.1 (p: (s32[], f32[8])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main.2 (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]{0}) while((s32[], f32[8]{0}) %t), condition=%cond.1, body=%body.1, backend_config={"known_trip_count":{"n":"12"}}
  %rs = f32[4]{0} reduce-scatter(f32[8]{0} %z), channel_id=5, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %cp = bf16[10]{0} collective-permute(bf16[10]{0} %v), channel_id=6, source_target_pairs={{0,1},{1,0}}
  %one = f32[6]{0} all-reduce(f32[6]{0} %u), channel_id=7, replica_groups={{0},{1},{2},{3},{4},{5},{6},{7}}, to_apply=%add
}
"""  # noqa: E501 -- HLO as XLA prints it, one instruction a line
    assert hlo.collective_sends(hlo_text) == {
        "all-gather": 12 * 16 * 4 * 2 * 7 / 8,  # groups of 8, in a loop of 12
        "all-reduce": 12 * 8 * 4 * 2 * 3 / 4 + 0.0,  # groups of 4 (from the -start); a group of one sends nothing
        "reduce-scatter": 4 * 4 * 3,  # the 4 devices of axis_1: each sends 3 shards
        "collective-permute": 10 * 2,
    }
    assert hlo.collectives(hlo_text)["all-reduce"] == {"count": 13, "bytes": 12 * 8 * 4 + 6 * 4}  # unchanged


def test_step_time_hbm_traffic_counts_loop_trips_slices_and_memory_spaces():
    """Per instruction outside fusions: operands and result in HBM. A fusion that slices a stacked operand reads
    the slice; one that updates a buffer in place writes the update; buffers in memory space S(1) (on-chip) and
    the loop's own bookkeeping count nothing; the loop body counts once per trip (and once in the second
    figure, as XLA's cost analysis counts it)."""
    hlo_text = """HloModule m

%slice_fusion (param_0: f32[12,256], param_1: s32[]) -> f32[1,256] {
  %param_0 = f32[12,256]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[1,256]{1,0} dynamic-slice(%param_0, %param_1, %c), dynamic_slice_sizes={1,256}
}

%update_fusion (param_0: f32[12,256], param_1: f32[1,256], param_2: s32[]) -> f32[12,256] {
  %param_0 = f32[12,256]{1,0} parameter(0)
  %param_1 = f32[1,256]{1,0} parameter(1)
  %param_2 = s32[] parameter(2)
  %c = s32[] constant(0)
  %n = f32[1,256]{1,0} negate(%param_1)
  ROOT %dus = f32[12,256]{1,0} dynamic-update-slice(%param_0, %n, %param_2, %c)
}

%body.1 (p: (s32[], f32[12,256], f32[12,256])) -> (s32[], f32[12,256], f32[12,256]) {
  %p = (s32[], f32[12,256]{1,0}, f32[12,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[12,256]{1,0} get-tuple-element(%p), index=1
  %g = f32[12,256]{1,0} get-tuple-element(%p), index=2
  %layer = f32[1,256]{1,0:S(1)} fusion(%w, %i), kind=kLoop, calls=%slice_fusion
  %h = f32[1,256]{1,0} exponential(%layer)
  %g2 = f32[12,256]{1,0} fusion(%g, %h, %i), kind=kLoop, calls=%update_fusion
  ROOT %t = (s32[], f32[12,256]{1,0}, f32[12,256]{1,0}) tuple(%i, %w, %g2)
}

%cond.1 (p: (s32[], f32[12,256], f32[12,256])) -> pred[] {
  %p = (s32[], f32[12,256]{1,0}, f32[12,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[12,256], b: f32[12,256]) -> f32[12,256] {
  %a = f32[12,256]{1,0} parameter(0)
  %b = f32[12,256]{1,0} parameter(1)
  %z = s32[] constant(0)
  %t = (s32[], f32[12,256]{1,0}, f32[12,256]{1,0}) tuple(%z, %a, %b)
  %loop = (s32[], f32[12,256]{1,0}, f32[12,256]{1,0}) while(%t), condition=%cond.1, body=%body.1
  %out = f32[12,256]{1,0} get-tuple-element(%loop), index=2
  ROOT %sum = f32[12,256]{1,0} add(%out, %a)
}
"""
    row = 256 * 4  # one layer's f32[1,256]
    # slice: reads a row and the s32 index, writes to S(1); exp: reads S(1), writes a row; update: reads the row and
    # the index, writes a row in place. The loop's condition (scalars) is not counted.
    body = (row + 4) + row + (2 * row + 4)
    entry = 3 * 12 * row  # the add: two operands and its result
    assert hlo.hbm_traffic(hlo_text) == (12 * body + entry, body + entry)

"""Multi-slice planning: `--slices N` compiles for N TPU slices joined by the data-centre network
(DCN), and the plan charges the cross-slice gradient all-reduce at the network's bandwidth.

The bytes crossing the DCN are read from the compiled HLO (libtpu marks them as "megascale"
host transfers); the compiler's step time comes from one slice's share, because libtpu's cost
model gives none across slices. Two processes joined as two "slices" (dcn_data=2) train like
one: tests/test_multihost.py.
"""

from __future__ import annotations

import types

import pytest
from test_compile import MICRO, needs_libtpu

from matrixmagic.configs import ConfigError
from matrixmagic.train.cli import main
from matrixmagic.train.cli.compile import slice_assignments
from matrixmagic.train.planning import chips, plan
from matrixmagic.train.planning.loops import dcn_send_bytes, loop_corrected_cost
from matrixmagic.train.planning.search import slice_groups

# A send to the other slice in the entry (bf16[2,4]: 16 bytes) and one in a loop body that runs
# 3 times (f32[8]: 32 bytes), in the form libtpu prints them; a send that is not a DCN transfer.
HLO = """HloModule dcn

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %after-all = token[] after-all()
  %send = (f32[8]{0:T(256)}, u32[], token[]) send(%x, %after-all), channel_id=1, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]) tuple(%next, %x)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8], b: bf16[2,4]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %b = bf16[2,4]{1,0} parameter(1)
  %after-all.1 = token[] after-all()
  %send.1 = (bf16[2,4]{1,0:T(2,128)(2,1)}, u32[], token[]) send(%b, %after-all.1), channel_id=2, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %send.2 = (f32[64]{0}, u32[], token[]) send(%a, %after-all.1), channel_id=3, is_host_transfer=true
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]) tuple(%zero, %a)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_dcn_bytes_are_read_from_the_hlo_with_loops_counted():
    assert dcn_send_bytes(HLO) == {"dcn bytes": 16 + 32}  # each send once; the plain send is not DCN
    assert loop_corrected_cost(HLO, dcn_send_bytes, keys=("dcn bytes",)) == {"dcn bytes": 16 + 3 * 32}


def test_dcn_time_is_a_ring_all_reduce_at_the_chip_bandwidth():
    target = chips.with_slices(chips.parse_target("v5p-8"), 4)
    assert (target.chips, target.slices, target.dcn_bits_per_s) == (16, 4, 50e9)
    config = types.SimpleNamespace()  # the measured bytes need no config
    # 2 (S - 1) / S of the bytes, in bits, at 50 Gbit/s: 1 GB -> 1.5 x 8e9 / 50e9 s
    assert plan.dcn_seconds(config, target, 1e9) == pytest.approx(1.5 * 8e9 / 50e9)
    assert plan.dcn_seconds(config, chips.parse_target("v5p-8"), 1e9) is None  # one slice: no DCN
    assert chips.with_slices(chips.parse_target("v4-8"), 2, 100).dcn_bits_per_s == 100e9


def test_slices_give_the_data_axis_to_the_dcn():
    assert slice_assignments("fsdp=-1,tensor=8", {}, 2) == {"mesh.dcn_data": 2, "mesh.data": 2}
    assert slice_assignments("data=4,fsdp=-1", {}, 2) == {"mesh.dcn_data": 2}  # the user's data axis
    assert slice_assignments(None, {}, 2) == {"mesh.dcn_data": 2}  # data=-1 fills, a multiple of 2
    assert slice_assignments("fsdp=-1", {}, 1) == {}
    with pytest.raises(ConfigError, match="--slices 2 and mesh.dcn_data=4 disagree"):
        slice_assignments("fsdp=-1", {"mesh.dcn_data": 4}, 2)
    devices = [types.SimpleNamespace(slice_index=i // 2) for i in range(4)]
    assert [len(g) for g in slice_groups(devices)] == [2, 2]


@pytest.mark.parametrize("args, words", [
    (["--topology", "cpu-8", "--slices", "2"], "--slices 2 is for TPU multi-slice"),
    (["--topology", "h100x64", "--slices", "2"], "GPU clusters have no slices"),
    (["--topology", "v4-8", "--slices", "2"], "give it with --dcn-gbps"),
    (["--topology", "v5p-8", "--slices", "0"], "--slices 0 is invalid"),
    (["--topology", "v5p-8", "--slices", "2", "--dcn-gbps", "0"], "--dcn-gbps 0.0 is invalid"),
    (["--topology", "v5p-8", "--dcn-gbps", "50"], "--dcn-gbps only matters with --slices"),
    (["--topology", "v5p-8", "--slices", "2", "--mesh", "fsdp=-1,dcn_data=4"], "disagree"),
])
def test_bad_slice_flags_are_clear_errors(args, words, capsys):
    for command in ("plan", "compile"):
        assert main([command, "--preset", "gpt-tiny", *args]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


@needs_libtpu
def test_two_slices_compile_with_dcn_bytes_and_the_compiler_time(capsys):
    args = ["compile", "--preset", "gpt-tiny", "--topology", "v5e-4", "--slices", "2", "--mesh", "fsdp=-1,tensor=2",
            "--batch", "8"]
    assert main(args + [f"--set={a}" for a in MICRO]) == 0
    out = capsys.readouterr().out
    assert "8 v5e chip(s) in 2 slices of v5e:2x2" in out and "25 Gbps per chip" in out
    assert "data=2 stage=1 fsdp=2 context=1 tensor=2 (dcn_data=2" in out
    dcn = next(line for line in out.splitlines() if line.strip().startswith("DCN"))
    seconds = float(dcn.split()[1]) * {"s/step:": 1, "ms/step:": 1e-3, "us/step:": 1e-6}[dcn.split()[2]]
    # At most every gradient byte of the model crosses, at least one bias' worth
    grads = 4 * plan.closed_form_params(plan.get_preset("gpt-tiny").model.replace(
        d_model=32, num_heads=2, d_ff=64, num_layers=2, vocab_size=128))["model"]
    assert 0 < seconds <= grads * 8 / 25e9
    estimate = next(line for line in out.splitlines() if "compiler's own estimate" in line)
    assert "+ DCN" in estimate and "-" not in estimate.split(":")[1]  # libtpu's own is negative across slices


def test_the_search_considers_stages_and_context_splits_and_says_why():
    """Candidates include pipeline stages (with 4 microbatches per stage) and, for long sequences
    only, context splits; the search's summary names each kind's best against the best without."""
    from functools import partial

    from matrixmagic.train.cli import build_parser
    from matrixmagic.train.cli.compile import config_for
    from matrixmagic.train.planning import search

    def candidates(*sets):
        args = build_parser().parse_args(["plan", "--preset", "gpt-tiny", "--topology", "cpu-8", "--batch", "8",
                                          *[f"--set={s}" for s in (*MICRO[:-2], "model.max_len=8192", *sets)]])
        return search.candidate_configs(partial(config_for, args, 8, "cpu"), 8)

    short = candidates("data.seq_len=64")
    assert {c.mesh.stage for c in short} == {1, 2}  # 2 layers: 4 stages do not divide them
    assert {c.mesh.context for c in short} == {1}  # a 64-token sequence is not split
    # the most pipeline microbatches per stage (4, 2, 1) the step splits into: 8 rows over fsdp=2
    # (tensor=2) take 4, over fsdp=4 (tensor=1) 2
    assert {(c.mesh.tensor, c.mesh.pipeline_microbatches) for c in short
            if c.mesh.stage == 2 and c.microbatches == 1} == {(2, 4), (1, 2)}
    long = candidates("data.seq_len=8192")
    assert {c.mesh.context for c in long} == {1, 2, 4, 8}
    rows = [(c, plan.estimate(c, 8)) for c in long]
    lines = search.split_lines(rows, rows, 8, 1e12)
    assert lines[0].startswith("  stage splits:") and "bubble" in lines[0]
    assert lines[1].startswith("  context splits:") and "for the best without" in lines[1]
    # the bubble stretches a pipelined layout's analytic time by 1 / (1 - (S - 1) / (M + S - 1))
    staged = next(c for c in short if c.mesh.stage == 2 and c.mesh.pipeline_microbatches == 2)
    est = plan.estimate(staged, 8)
    assert search.analytic_seconds(staged, est, 8, 1e12) == pytest.approx(
        est.executed_flops / 8e12 / (1 - 1 / (2 + 1)))
    assert "none considered (data.seq_len=64 is under 8,192" in search.split_lines(
        [(c, plan.estimate(c, 8)) for c in short], [], 8, 1e12)[1]

"""Rounding refinement end to end on small models: learning, export, seeds, the CLI."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.cli import main  # noqa: E402
from onnxq.config import CalibrationMethod, Granularity  # noqa: E402
from onnxq.prepare import fuse  # noqa: E402
from onnxq.quant.plan import plan_quantization  # noqa: E402
from onnxq.refine.blocks import partition  # noqa: E402
from onnxq.refine.mirror import Mirror  # noqa: E402
from tests.conftest import needs_shared  # noqa: E402
from tests.refine.common import FAST, assert_same_as_qdq, reference_run  # noqa: E402


@pytest.fixture(scope="module")
def refined(small_model, calibration_data):
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, **FAST)
    return onnxq.quantize(small_model, calibration_data, config)


def test_exported_model_equals_the_mirror_hard_quantized(refined, calibration_data):
    assert_same_as_qdq(refined.refinement.mirror, refined.model, calibration_data[:8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")
def test_refinement_on_cuda_exports_what_its_mirror_computes(small_model, calibration_data):
    """`--device cuda` learns on the GPU and exports the same standard QDQ model: onnxruntime's
    output of it equals the learned mirror's, brought back to the CPU. Skipped where torch sees
    no GPU, as on CI; `onnxq quantize --device cuda` refined MobileNetV2 on a lent H200."""
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, device="cuda", **FAST)
    result = onnxq.quantize(small_model, calibration_data, config)
    mirror = result.refinement.mirror.to_device(torch.device("cpu"))
    assert_same_as_qdq(mirror, result.model, calibration_data[:8])


def test_integers_are_within_one_step_of_nearest_and_inside_their_width(refined):
    from onnxq.quant.weights import QuantizedWeight

    mirror = refined.refinement.mirror
    flips = 0
    for name, quantized in refined.refinement.weights.items():
        assert isinstance(quantized, QuantizedWeight)
        scale, zero = quantized.element_params()
        weight = mirror.constants[name].numpy()
        nearest = np.clip(np.rint(weight / scale) + zero, quantized.target.qmin, quantized.target.qmax)
        integers = quantized.integers.astype(np.int64)
        assert np.abs(integers - nearest).max() <= 1
        assert integers.min() >= quantized.target.qmin and integers.max() <= quantized.target.qmax
        flips += int((integers != nearest).sum())
    assert flips > 0  # learning changed some rounding


def test_refinement_lowers_every_refined_units_loss(refined):
    units = [u for u in refined.refinement.units if not u.skipped]
    assert units
    for unit in units:
        assert unit.after <= unit.before
    assert any(u.after < u.before for u in units)
    assert any("refined" in note for note in refined.notes)
    assert not refined.refinement.mirror.affine_weights  # QPRep is on by default: nothing merged here
    assert not any(note.startswith("QPRep") for note in refined.notes)


def test_the_same_seed_gives_the_same_model(small_model, calibration_data, refined):
    again = onnxq.quantize(
        small_model, calibration_data, onnxq.QuantConfig(weight_bits=4, activation_bits=4, **FAST)
    )
    assert again.model.SerializeToString() == refined.model.SerializeToString()


def test_a_time_budget_that_does_not_bind_learns_the_same_model(small_model, calibration_data, refined):
    """The budget only bounds the iterations: where it does not bind, the learning is the same."""
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, time_budget=1e6, **FAST)
    budgeted = onnxq.quantize(small_model, calibration_data, config)
    iterations = [u.iterations for u in budgeted.refinement.units]
    assert iterations == [u.iterations for u in refined.refinement.units]
    assert budgeted.model.graph == refined.model.graph  # the metadata records the budget


@given(
    left=st.floats(-10.0, 1e4),
    pace=st.floats(1e-4, 100.0),
    done=st.integers(0, 10),
    total=st.integers(0, 1000),
)
def test_a_budget_gives_a_unit_what_the_time_left_allows(left, pace, done, total):
    """Those done, plus what the time left buys at the timed pace; never above the count asked."""
    from onnxq.refine.unit_learning import iterations_within

    got = iterations_within(left, pace, done, total)
    assert done <= got <= max(done, total)
    assert (got - done) * pace <= max(left, 0.0) * (1 + 1e-9)  # the extra ones fit in the time left
    if left >= pace * (total - done + 1):
        assert got == max(done, total)  # time enough for every iteration asked
    elif got < total:
        assert (got - done + 1) * pace >= left * (1 - 1e-9)  # one more would not have fitted
    assert iterations_within(left + pace, pace, done, total) >= got  # more time, never fewer


def test_pd_remainder_recomputed_block_by_block_learns_the_same(monkeypatch, small_model, calibration_data):
    """Over the memory limit, pd's float remainder keeps only its block cuts for the backward pass
    and recomputes the rest: the same gradients, so the same learned model."""
    import onnxq.refine.unit_learning as unit_learning

    # a budget no pass reaches: the remainder's size, faked below, does not chunk the batch
    config = onnxq.QuantConfig(
        weight_bits=4, activation_bits=4, refine_loss="pd", refine_memory_gb=1e12, **FAST
    )
    whole = onnxq.quantize(small_model, calibration_data, config)

    segments = []

    def counted(function, *args, **kwargs):
        segments.append(args[1:])
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(unit_learning.UnitJob, "_remainder_bytes", lambda self, env, samples, batch: 1e15)
    monkeypatch.setattr(unit_learning, "checkpoint", counted)
    again = onnxq.quantize(small_model, calibration_data, config)
    assert segments  # the remainder did run in recomputed blocks
    assert again.model.SerializeToString() == whole.model.SerializeToString()


def test_pd_remainder_memory_is_estimated_per_batch(small_model, calibration_data):
    """The estimate grows with the batch: what decides recomputation is the batch's memory."""
    import onnxq.refine.unit_learning as unit_learning

    sizes = {}
    original = unit_learning.UnitJob._remainder_bytes

    def recorded(self, env, samples, batch):
        sizes.setdefault(batch, original(self, env, samples, batch))
        return sizes[batch]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unit_learning.UnitJob, "_remainder_bytes", recorded)
        for batch in (4, 16):
            settings = {**FAST, "refine_batch": batch, "refine_loss": "pd"}
            config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, **settings)
            onnxq.quantize(small_model, calibration_data, config)
    assert 0 < sizes[4] < sizes[16] <= 4 * sizes[4]


@pytest.mark.parametrize("loss", ["mae", "pd"])
def test_every_loss_and_unit_runs(small_model, calibration_data, loss):
    config = onnxq.QuantConfig(
        weight_bits=4,
        activation_bits=8,
        calibration=CalibrationMethod.MSE,
        granularity=Granularity.parse("group:4"),
        refine_loss=loss,
        refine_unit="layer" if loss == "mae" else "window:2",
        **{**FAST, "refine_iters": 15},
    )
    result = onnxq.quantize(small_model, calibration_data, config)
    assert_same_as_qdq(result.refinement.mirror, result.model, calibration_data[:8])
    assert len(result.refinement.units) >= 1


def test_unit_outputs_run_in_parts_equal_one_run_over_all_samples(small_model, monkeypatch):
    """_run_all writes each part into one preallocated tensor; the last part is shorter."""
    from onnxq.refine import reconstruct

    model = fuse(small_model).model
    plan = plan_quantization(onnxq.io.to_ir(model).graph, onnxq.QuantConfig())
    mirror = Mirror(model)
    unit = partition(mirror, set(plan.layers), "block")[1]
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((23, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        env = mirror.run({"input": x}, 0, unit.begin, quantized=False, keep=unit.inputs)
        whole = mirror.run({k: env[k] for k in unit.inputs}, unit.begin, unit.end, quantized=False)
        monkeypatch.setattr(reconstruct, "RUN_BATCH", 5)  # parts of 5, 5, 5, 5 and 3 samples
        parts = reconstruct._run_all(mirror, unit, reconstruct.Batches(env, 23), quantized=False)
    assert parts.count == 23
    for name in unit.outputs:
        torch.testing.assert_close(parts.values[name], whole[name], rtol=1e-6, atol=1e-6)


def test_mirror_equals_onnxruntime_on_shared_models():
    """Float to 1e-4 relative and quantized (W4A8 nearest rounding) up to rounding-boundary ties."""
    for name, shape in (("resnet20_cifar10_bn", (4, 3, 32, 32)), ("mobilenet_v2", (2, 3, 224, 224))):
        path = needs_shared("models", f"{name}.onnx")
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        model = fuse(onnx.load(path)).model
        with torch.no_grad():
            got = Mirror(model)({"input": torch.from_numpy(x)}, quantized=False)[0].numpy()
        want = reference_run(model, x)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
        config = onnxq.QuantConfig(weight_bits=4, **{**FAST, "refine_iters": 1})
        result = onnxq.quantize(model, x, config)
        assert_same_as_qdq(result.refinement.mirror, result.model, x)


def test_cli_refine_and_the_missing_torch_error(tmp_path, small_model_path, calibration_data, monkeypatch):
    data = tmp_path / "calib.npy"
    np.save(data, calibration_data)
    out = tmp_path / "q.onnx"
    args = ["quantize", str(small_model_path), "--calib", str(data), "-o", str(out), "--refine"]
    args += ["--refine-iters", "5", "--no-speed-check", "--w-bits", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "refined" in result.output and out.exists()
    out.unlink()

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "pip install 'onnxq[refine]'" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_bad_refine_settings_are_one_line_errors(monkeypatch, small_model, calibration_data):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(onnxq.OnnxqError, match="no CUDA device"):
        onnxq.quantize(small_model, calibration_data, onnxq.QuantConfig(refine=True, device="cuda"))
    with pytest.raises(onnxq.OnnxqError, match="refine unit"):
        onnxq.QuantConfig(refine=True, refine_unit="blocks")
    with pytest.raises(onnxq.OnnxqError, match="qdrop"):
        onnxq.QuantConfig(refine=True, qdrop=1.5)


def test_pd_without_class_scores_says_it_learned_with_mse():
    from tests.conftest import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    model = export(net, torch.zeros(1, 3, 8, 8), outputs=("features",))
    data = np.random.default_rng(0).standard_normal((24, 3, 8, 8)).astype(np.float32)
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, refine_loss="pd", **FAST)
    result = onnxq.quantize(model, data, config)
    assert any(n.startswith("refined ") and "(mse loss)" in n for n in result.notes)
    assert any("pd needs class scores" in n for n in result.notes)


def test_refinement_that_leaves_the_outputs_further_from_float_is_undone(small_model, calibration_data):
    """40 iterations on a random network learn little: the check measures the search's model
    beside the refined one and saves the search's, exactly as it is without --refine (at W4A8
    refinement starts from the integers GPTQ chose, which the search alone keeps)."""
    checked = dict(FAST, refine_check=True, weight_bits=4)
    result = onnxq.quantize(small_model, calibration_data, onnxq.QuantConfig(**checked))
    (note,) = [note for note in result.notes if note.startswith("refinement undone:")]
    # 48 samples are too few to hold any back: the check ran on those refinement learned on
    assert "on 16 samples refinement learned on (too few to hold any back)" in note, note
    assert result.refinement is None
    searched = {k: v for k, v in checked.items() if not k.startswith("refine")}
    alone = onnxq.quantize(small_model, calibration_data, onnxq.QuantConfig(**searched))
    assert _weights(result.model) == _weights(alone.model)


def _weights(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.raw_data or numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


@settings(max_examples=30, deadline=None)
@given(refined=st.floats(-10.0, 60.0), searched=st.floats(-10.0, 60.0), held_back=st.booleans())
def test_the_refined_model_stays_unless_the_search_is_clearly_closer_to_float(refined, searched, held_back):
    from onnxq import fidelity
    from onnxq.tune.refinement import MIN_GAIN_DB, keep_refinement

    def measured(float_model, quantized, samples, bits):
        sqnr = refined if quantized == "refined" else searched
        return fidelity.Fidelity(4, True, [fidelity.OutputFidelity("out", sqnr, 0.9, None)], 20.0)

    candidates = [SimpleNamespace(model=name) for name in ("refined", "searched")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "measure", measured)
        kept, (note,) = keep_refinement(None, *candidates, [], onnxq.QuantConfig(), held_back)
    assert kept == (searched < refined + MIN_GAIN_DB)
    assert note.startswith("refinement kept" if kept else "refinement undone")
    assert ("held-back samples" in note) == held_back  # in-sample figures flatter refinement: said


def test_a_model_exported_with_its_batch_of_one_baked_in_refines():
    """A static export writes view(1, -1) as Reshape(x, [1, 64]); the mirror learns on batches
    of many samples, so that Reshape keeps the batch it is given (the export still runs as
    exported). It stopped with "shape '[1, 64]' is invalid for input of size ..."."""
    import torch
    from torch import nn

    from tests.conftest import export

    class Baked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(64, 5)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x)).view(1, 64))

    torch.manual_seed(0)
    model = export(Baked(), torch.zeros(1, 3, 4, 4), dynamic_batch=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    data = np.random.default_rng(0).standard_normal((24, 3, 4, 4)).astype(np.float32)
    config = onnxq.QuantConfig(weight_bits=4, refine=True, refine_iters=5, speed_check=False)
    result = onnxq.quantize(model, data, config)
    assert result.refinement is not None and result.fidelity.min_sqnr > 10


@pytest.mark.parametrize("unit", ["block", "layer"])
def test_a_static_dynamo_export_of_a_vision_transformer_refines_every_unit(tmp_path, unit):
    """torch's dynamo exporter, given a batch of one and no dynamic shapes, bakes that batch into
    the class token's expansion (a [1, 1, d] constant) and into attention's Reshapes (the batch
    third); its blocks hold LayerNormalization and Gelu's Erf. --refine stopped with an internal
    error there, and before that ran every transformer block in onnxruntime, unrefined. Its MLP
    reads [tokens, features] (the batch of one folded into rows): `layer` units must not start
    there (they stopped with "cannot join tensor 'transpose_1'")."""
    import torch
    from torch import nn

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, 4)
            self.token = nn.Parameter(torch.randn(1, 1, 16) * 0.02)
            self.block = nn.TransformerEncoderLayer(
                16, 2, 32, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 5)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = self.block(torch.cat([self.token.expand(x.shape[0], -1, -1), x], 1))
            return self.head(self.norm(x[:, 0]))

    torch.manual_seed(0)
    path = tmp_path / "vit.onnx"
    torch.onnx.export(
        TinyViT().eval(), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=True, external_data=False
    )
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    data = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    config = onnxq.QuantConfig(
        weight_bits=4, refine=True, refine_iters=3, refine_unit=unit, speed_check=False
    )
    result = onnxq.quantize(model, data, config)
    units = result.refinement.units
    assert len(units) > 1 and not [unit.skipped for unit in units if unit.skipped]
    assert result.fidelity.min_sqnr > 10


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 8))
def test_a_seeded_rounding_starts_on_its_seed_and_may_move_one_step_towards_the_weight(seed, bits):
    from onnxq.refine.quantizers import RoundingWeight

    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(6, 5)).astype(np.float32)
    scale = np.full((6, 5), 2 * np.abs(weight).max() / (2**bits - 1), np.float32)
    zero = np.zeros((6, 5), np.float32)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    nearest = np.rint(weight / scale)
    start = np.clip(nearest + rng.integers(-2, 3, size=nearest.shape), qmin, qmax).astype(np.int64)
    rounding = RoundingWeight(weight, scale, zero, qmin, qmax, seed=start)
    np.testing.assert_array_equal(rounding.integers(), start)
    with torch.no_grad():
        rounding.logits.neg_()  # every weight takes its other choice
    above = start > weight / scale
    expected = np.clip(np.where(above, start - 1, start + 1), qmin, qmax)
    np.testing.assert_array_equal(rounding.integers(), expected)


def test_refinement_after_gptq_starts_from_its_integers(small_model, calibration_data, monkeypatch):
    """--refine --weight-rounding gptq: AdaRound starts on GPTQ's integers and ends within a step."""
    from onnxq.refine import quantizers, unit_learning

    # h starts 0.005 from the flip, so 40 iterations move some weights on any CPU's float kernels
    # (0.45 moved some on AVX2 and none on an AVX-512 EPYC, where 0.48 moved 5 and 0.495 moved 17)
    monkeypatch.setattr(quantizers, "SEEDED_REST", 0.495)
    # What was learned is kept even where a unit's loss ended no lower: on an AVX2 EPYC without
    # VNNI all three units went back to GPTQ's integers, and nothing was left to check
    monkeypatch.setattr(unit_learning.UnitJob, "_restore", lambda self, state: None)
    widths = dict(weight_bits=3, speed_check=False, fidelity_fallback=False, equalize=False)
    gptq = onnxq.quantize(small_model, calibration_data, onnxq.QuantConfig(**widths, weight_rounding="gptq"))
    config = onnxq.QuantConfig(**{**widths, **FAST}, weight_rounding="gptq")
    seeded = onnxq.quantize(small_model, calibration_data, config)
    assert_same_as_qdq(seeded.refinement.mirror, seeded.model, calibration_data[:8])
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in gptq.model.graph.initializer}
    moved = 0
    for name, quantized in seeded.refinement.weights.items():
        start = stored[f"{name}_quantized"].astype(np.int64)
        assert np.abs(quantized.integers.astype(np.int64) - start).max() <= 1
        moved += int((quantized.integers != start).sum())
    assert moved > 0


def test_a_segmentation_head_ending_in_argmax_learns_towards_the_logits_it_reads():
    """A model whose only output is ArgMax over classes (a segmentation mask, int64): its last
    unit has no float output, so it learns towards the logits the ArgMax reads. Before, its loss
    had no gradient and refinement stopped with a torch error."""
    from torch import nn

    from tests.conftest import export

    class Segmenter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(torch.relu(self.body(x))).argmax(1)

    torch.manual_seed(0)
    model = export(Segmenter(), torch.zeros(1, 3, 12, 12), outputs=("mask",))
    data = np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32)
    config = onnxq.QuantConfig(weight_bits=4, first_last_8bit=False, **{**FAST, "refine_iters": 5})
    result = onnxq.quantize(model, data, config)
    units = result.refinement.units
    assert units and not [u.skipped for u in units if u.skipped]
    assert all(u.iterations == 5 and np.isfinite(u.before) for u in units)
    mask = reference_run(result.model, data)
    assert mask.dtype == np.int64 and mask.shape == (24, 12, 12)

"""Refinement's memory plan (onnxq/refine/memory_plan.py): the samples held within
--refine-memory, and a batch learned in chunks where one pass would not fit."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import onnxq  # noqa: E402
from onnxq.prepare import fuse  # noqa: E402
from onnxq.quant.plan import plan_quantization  # noqa: E402
from onnxq.refine.blocks import partition  # noqa: E402
from onnxq.refine.memory_plan import chunk_within, samples_within, saved_bytes  # noqa: E402
from onnxq.refine.mirror import Mirror  # noqa: E402
from onnxq.refine.reconstruct import learned_tensors  # noqa: E402
from tests.refine.common import FAST  # noqa: E402


@given(
    once=st.floats(0, 1e9),
    each=st.floats(1, 1e9),
    step=st.sampled_from([1, 2, 4]),
    runs=st.integers(1, 16),
    budget=st.floats(1, 1e10),
)
def test_a_chunk_is_as_many_whole_runs_as_the_budget_holds(once, each, step, runs, budget):
    batch = step * runs
    chunk = chunk_within(once + each, once + 2 * each, step, batch, budget)
    assert step <= chunk <= batch and chunk % step == 0
    kept = once + each * chunk / step
    if chunk == batch:
        assert kept <= budget * (1 + 1e-9) or chunk == step
    else:
        assert chunk == step or kept <= budget * (1 + 1e-9)  # one run at least, else what fits
        assert once + each * (chunk / step + 1) > budget * (1 - 1e-9)  # one more run would not fit


def test_samples_held_are_the_first_that_fit_the_budget(small_model, calibration_data):
    """The data, and at the unit whose cuts hold the most per sample its inputs and targets
    twice; a budget of 10.5 such samples holds 10, a large one all 48."""
    model = fuse(small_model).model
    plan = plan_quantization(onnxq.io.to_ir(model).graph, onnxq.QuantConfig(weight_bits=4))
    mirror = Mirror(model)
    units = partition(mirror, set(plan.layers), "block")
    learned = {i: learned_tensors(mirror, unit) for i, unit in enumerate(units)}
    data = {mirror.graph_inputs[0]: torch.from_numpy(calibration_data)}
    with torch.no_grad():
        every = [*mirror.graph_inputs, *(name for node in mirror.nodes for name in node.outputs)]
        env = mirror.run(dict(data), 0, len(mirror.nodes), quantized=False, keep=every)
    per_sample = {name: value[0].numel() * value.element_size() for name, value in env.items()}
    held = per_sample[mirror.graph_inputs[0]] + max(
        2 * sum(per_sample[n] for n in unit.inputs) + 2 * sum(per_sample[n] for n in learned[i])
        for i, unit in enumerate(units)
    )
    assert samples_within(mirror, units, data, learned, held * 10.5) == 10
    assert samples_within(mirror, units, data, learned, held * 1000) == len(calibration_data)
    assert samples_within(mirror, units, data, learned, 1.0) == 1


def test_refinement_over_its_memory_learns_on_fewer_samples_and_says_so(small_model, calibration_data):
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, **{**FAST, "refine_memory_gb": 2e-4})
    result = onnxq.quantize(small_model, calibration_data, config)
    held, given = result.refinement.samples
    assert 1 <= held < given == len(calibration_data)
    assert any(f"learned on the first {held} of {given} samples" in line for line in result.notes)


def _first_pass_gradients(monkeypatch, model, data, **settings) -> list[dict]:
    """Per unit: the gradients of one learning iteration (no step taken), the batch and chunk
    it learned in, and the bytes a pass on `chunk` and on `chunk + 1` samples keeps for backward."""

    import onnxq.refine.unit_learning as unit_learning
    from onnxq.refine import export, fused

    seen = []

    def first_pass(job, seconds, progress):
        with job._learning():
            job._batch_backward(torch.zeros(()))
            with fused.compiled_kernels(False):
                kept = [
                    saved_bytes(functools.partial(job._unit_pass, n))[0] for n in (job.chunk, job.chunk + 1)
                ]
        gradients = [p.grad.clone() for p in job._learned() if p.grad is not None]
        seen.append(dict(gradients=gradients, batch=job.batch, chunk=job.chunk, kept=kept))
        for parameter in job._learned():
            parameter.grad = None
        return 0

    monkeypatch.setattr(unit_learning.UnitJob, "_learn", first_pass)
    # every sample held, whatever the budget: the batches drawn are the same in both runs
    monkeypatch.setattr(
        export, "samples_within", lambda mirror, units, data, learned, budget: len(next(iter(data.values())))
    )
    config = onnxq.QuantConfig(weight_bits=4, activation_bits=4, **{**FAST, "qdrop": 0.0, **settings})
    result = onnxq.quantize(model, data, config)
    return seen, result.notes


@pytest.mark.parametrize("loss", ["mse", "pd"])
def test_a_batch_learned_in_chunks_gets_the_whole_batch_gradients(
    monkeypatch, small_model, calibration_data, loss
):
    """Over --refine-memory a batch learns in chunks whose weighted losses add up to the batch's:
    the same gradients (to float summation order), each chunk's activations within the budget."""
    whole, _ = _first_pass_gradients(monkeypatch, small_model, calibration_data, refine_loss=loss)
    budget = max(unit["kept"][0] for unit in whole) // 3  # the largest unit's batch needs 3 times it
    chunked, notes = _first_pass_gradients(
        monkeypatch, small_model, calibration_data, refine_loss=loss, refine_memory_gb=budget / 1e9
    )
    assert all(unit["chunk"] == unit["batch"] == 16 for unit in whole)
    assert any(unit["chunk"] < unit["batch"] for unit in chunked)
    assert any("in chunks of" in line for line in notes)
    for plain, split in zip(whole, chunked, strict=True):
        at_chunk, one_more = split["kept"]
        assert at_chunk <= budget  # pd's float remainder, kept too, counts against the budget
        if loss == "mse" and split["chunk"] < split["batch"]:
            assert one_more > budget  # as many samples as fit, and no more
        for a, b in zip(plain["gradients"], split["gradients"], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_refine_memory_must_be_positive(small_model, calibration_data):
    with pytest.raises(onnxq.OnnxqError, match="refine memory must be positive"):
        onnxq.QuantConfig(refine=True, refine_memory_gb=0)

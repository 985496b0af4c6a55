"""The digits benchmark of ``benchmarks/quality/digits.py``: its split, its scores and the ``curves.py`` task built on it."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
import curves  # noqa: E402
import digits  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return digits.digit_data()


@pytest.fixture(scope="module")
def classifier(data):
    return digits.train_classifier(data, steps=300)


def test_every_fourth_image_of_each_digit_is_held_out_and_no_image_is_in_both_splits(data):
    from sklearn.datasets import load_digits

    raw = load_digits()
    assert data["train_x"].shape[0] + data["held_x"].shape[0] == raw.images.shape[0]
    for digit in range(digits.CLASSES):
        count = int((raw.target == digit).sum())
        assert int((data["held_y"] == digit).sum()) == -(-count // digits.HELD_OUT_EVERY)
    first_of_each = torch.stack([
        torch.tensor(raw.images[(raw.target == digit).nonzero()[0][0]], dtype=torch.float32) / 8 - 1
        for digit in range(digits.CLASSES)])
    assert torch.equal(data["held_x"][torch.stack([(data["held_y"] == d).nonzero()[0, 0] for d in range(10)]), 0],
                       first_of_each)
    train, held = data["train_x"].flatten(1), data["held_x"].flatten(1)
    assert torch.cdist(held, train).min() > 0  # load_digits has no duplicate image across the split
    assert data["train_x"].min() == -1 and data["train_x"].max() == 1


def test_classifier_reads_held_out_digits_and_its_features_are_the_fd_space(classifier, data):
    model, accuracy = classifier
    assert accuracy > 0.9
    assert model.features(data["held_x"]).shape == (data["held_x"].shape[0], 64)


def test_evaluator_ranks_training_digits_above_noise_and_blur_and_reads_their_labels(classifier, data):
    model, _ = classifier
    evaluator = digits.Evaluator(data, model, count=1000, seed=0)
    assert evaluator.labels.shape == (1000,) and torch.equal(evaluator.labels[:454], data["held_y"])
    floor = evaluator.floor()
    blurred = torch.nn.functional.avg_pool2d(evaluator.floor_samples, 3, stride=1, padding=1)
    noise = evaluator.score(torch.rand(1000, 1, 8, 8) * 2 - 1)
    assert floor["fd"] < evaluator.score(blurred)["fd"] < noise["fd"]
    assert floor["class_acc"] > 0.9 and noise["class_acc"] < 0.3
    assert floor["diversity"] == pytest.approx(1.0, abs=0.05)
    wrong_labels = evaluator.score(evaluator.floor_samples.roll(1, dims=0))  # each digit scored as its neighbour's
    assert wrong_labels["fd"] == pytest.approx(floor["fd"], rel=1e-4)  # the same sample set, relabelled
    assert floor["class_logp"] > -0.2 and wrong_labels["class_logp"] < -2.0


def test_curves_quick_run_on_digits_writes_the_reference_and_a_method(tmp_path):
    threads = torch.get_num_threads()
    try:
        curves.main(argv=["--task", "digits", "--quick", "--methods", "TwinFlow w 0", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread per process
    reference = json.loads((tmp_path / "digits_seed0_reference_quick.json").read_text())
    method = json.loads((tmp_path / "digits_seed0_twinflow-w-0_quick.json").read_text())
    assert set(reference["data"]) == {"fd", "diversity", "class_acc", "class_logp"}
    assert "classifier_acc" in reference["notes"]
    assert {"raw/50", "power/50-cfg2", "power/50-cfg1.5", "power/50-cfg1.25", "power/50-cfg3"} <= set(reference["curve"]["8"])
    assert set(method["curve"]) == {"2", "4", "8", "12", "16", "24"}
    assert method["curve"]["24"]["power/1"]["fd"] > 0

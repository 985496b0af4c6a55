"""A training state saved mid-run and resumed repeats the uninterrupted run bit for bit on CPU."""

import random

import pytest
import torch
from core_models import TinyVelocityNet, labelled_training_steps

import twinloss
from twinloss.checkpoint import load_training_state, save_training_state

SHAPE = (3,)
BATCH = 8


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyVelocityNet(SHAPE, hidden=16, dropout=0.2)  # dropout draws from the global torch RNG
    loss_fn = twinloss.TwinFlowLoss(teacher=twinloss.EMATeacher(target_decay=0.9), guidance_scale=0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, loss_fn, optimizer


def _steps(count: int, model, loss_fn, optimizer, loss_generator: torch.Generator) -> list[float]:
    """``count`` training steps; data comes from the global torch RNG, noise from ``loss_generator``."""
    return labelled_training_steps(count, model, loss_fn, optimizer, loss_generator, shape=SHAPE, batch=BATCH)


def _start(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    random.seed(seed)
    return torch.Generator().manual_seed(seed + 1)


def test_resumed_run_gives_the_same_losses_as_the_uninterrupted_one(tmp_path) -> None:
    model, loss_fn, optimizer = _setup()
    generator = _start()
    uninterrupted = _steps(6, model, loss_fn, optimizer, generator)

    model, loss_fn, optimizer = _setup()
    generator = _start()
    first_half = _steps(3, model, loss_fn, optimizer, generator)
    save_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                        generators={"loss": generator}, step=3)

    # A new process: other initial weights, other RNG states, a fresh teacher.
    model, loss_fn, optimizer = _setup(seed=7)
    generator = _start(seed=7)
    step = load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                               generators={"loss": generator})
    assert step == 3 and loss_fn.teacher.num_updates == 3
    assert first_half + _steps(3, model, loss_fn, optimizer, generator) == uninterrupted


def test_each_random_state_matters_for_the_resumed_losses(tmp_path) -> None:
    model, loss_fn, optimizer = _setup()
    generator = _start()
    _steps(2, model, loss_fn, optimizer, generator)
    save_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn, generators={"loss": generator})
    expected = _steps(2, model, loss_fn, optimizer, generator)

    def resumed(disturb) -> list[float]:
        model, loss_fn, optimizer = _setup(seed=7)
        generator = torch.Generator()
        load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                            generators={"loss": generator})
        disturb(generator)
        return _steps(2, model, loss_fn, optimizer, generator)

    assert resumed(lambda g: None) == expected
    assert resumed(lambda g: g.manual_seed(99)) != expected
    assert resumed(lambda g: torch.manual_seed(99)) != expected


def test_pythons_random_state_is_restored(tmp_path) -> None:
    # (The test run's type checker draws from ``random`` too, so the training loop above does not use it.)
    model, loss_fn, optimizer = _setup()
    random.seed(5)
    save_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn)
    expected = [random.random() for _ in range(3)]
    random.seed(6)
    load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn)
    assert [random.random() for _ in range(3)] == expected


def test_loading_a_mismatched_state_raises_naming_what_differs(tmp_path) -> None:
    model, loss_fn, optimizer = _setup()
    save_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                        generators={"loss": torch.Generator()})
    other_model = TinyVelocityNet(SHAPE, hidden=16)
    other_model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"model: .*missing \['extra.bias', 'extra.weight'\]"):
        load_training_state(tmp_path / "state.pt", model=other_model, optimizer=optimizer, loss_fn=loss_fn,
                            generators={"loss": torch.Generator()})
    with pytest.raises(ValueError, match=r"generators: the checkpoint holds \['loss'\], the call passes \['data', 'loss'\]"):
        load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                            generators={"loss": torch.Generator(), "data": torch.Generator()})
    online = twinloss.TwinFlowLoss()
    with pytest.raises(ValueError, match=r"loss_fn: .*unexpected \['teacher._extra_state'\]"):
        load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=online,
                            generators={"loss": torch.Generator()})
    gpu_state = torch.load(tmp_path / "state.pt", weights_only=True)
    gpu_state["rng"]["cuda.0"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(gpu_state, tmp_path / "gpu_state.pt")
    if torch.cuda.device_count() != 1:
        with pytest.raises(ValueError, match="rng: the checkpoint holds the CUDA RNG of 1 devices"):
            load_training_state(tmp_path / "gpu_state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                                generators={"loss": torch.Generator()})
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a twinloss training state"):
        load_training_state(tmp_path / "other.pt", model=model, optimizer=optimizer, loss_fn=loss_fn)


def test_a_teacher_refusing_its_saved_average_leaves_every_other_teacher_and_the_model_unchanged(tmp_path) -> None:
    def two_teachers(rcgm_decay: float) -> twinloss.TwinFlowLoss:
        return twinloss.TwinFlowLoss(guidance_teacher=twinloss.EMATeacher(target_decay=0.9),
                                     rcgm_teacher=twinloss.EMATeacher(target_decay=rcgm_decay), guidance_scale=0.5)

    model, _, optimizer = _setup()
    loss_fn = two_teachers(0.9)
    _steps(2, model, loss_fn, optimizer, _start())
    save_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn)

    model, _, optimizer = _setup(seed=7)
    loss_fn = two_teachers(0.99)  # the RCGM teacher targets another decay: its saved average is refused
    _steps(1, model, loss_fn, optimizer, _start(seed=7))
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    guidance_before = {k: v.clone() for k, v in loss_fn.guidance_teacher.shadow.items()}
    with pytest.raises(ValueError, match=r"targets decay 0.9, this teacher 0.99"):
        load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn)
    # the guidance teacher comes first in the loss's state, so a load that checked as it went would have moved it
    torch.testing.assert_close(loss_fn.guidance_teacher.shadow, guidance_before, rtol=0, atol=0)
    assert loss_fn.guidance_teacher.num_updates == 1
    torch.testing.assert_close(model.state_dict(), model_before, rtol=0, atol=0)


def test_a_refused_load_leaves_model_optimizer_loss_and_rng_unchanged(tmp_path) -> None:
    model, loss_fn, optimizer = _setup()
    generator = _start()
    _steps(2, model, loss_fn, optimizer, generator)
    save_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                        generators={"loss": generator})

    model, loss_fn, optimizer = _setup(seed=7)
    _steps(1, model, loss_fn, optimizer, _start(seed=7))  # optimizer and teacher hold state of their own
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in loss_fn.teacher.shadow.items()}
    optimizer_before = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    rng_before = torch.get_rng_state()

    def assert_unchanged() -> None:
        torch.testing.assert_close(model.state_dict(), model_before, rtol=0, atol=0)
        torch.testing.assert_close(loss_fn.teacher.shadow, teacher_before, rtol=0, atol=0)
        assert loss_fn.teacher.num_updates == 1
        torch.testing.assert_close(optimizer.state_dict()["state"], optimizer_before, rtol=0, atol=0)
        assert torch.equal(torch.get_rng_state(), rng_before)

    with pytest.raises(ValueError, match=r"generators: the checkpoint holds \['loss'\], the call passes \['data'\]"):
        load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                            generators={"data": torch.Generator()})
    assert_unchanged()
    parameters = list(model.parameters())
    other_optimizer = torch.optim.AdamW([{"params": parameters[:1]}, {"params": parameters[1:]}])
    with pytest.raises(ValueError, match=r"optimizer: the checkpoint holds parameter groups of sizes"):
        load_training_state(tmp_path / "state.pt", model=model, optimizer=other_optimizer, loss_fn=loss_fn,
                            generators={"loss": torch.Generator()})
    assert_unchanged()
    wider = torch.load(tmp_path / "state.pt", weights_only=True)
    name = next(iter(wider["model"]))
    wider["model"][name] = torch.zeros(*wider["model"][name].shape[:-1], wider["model"][name].shape[-1] + 1)
    torch.save(wider, tmp_path / "wider.pt")
    with pytest.raises(ValueError, match=rf"model: the checkpoint holds tensors of other shapes: {name} \(5, 9\), here \(5, 8\)"):
        load_training_state(tmp_path / "wider.pt", model=model, optimizer=optimizer, loss_fn=loss_fn,
                            generators={"loss": torch.Generator()})
    assert_unchanged()

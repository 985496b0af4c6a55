"""``twinloss demo --quick`` end to end: files, JSON keys, a readable PNG."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from twinloss_demo.cli import DEMO_EXTRA_MODULES, main
from twinloss_demo.demo import evaluate_samples

METHODS = (
    "flow_matching_multi_step", "flow_matching_1nfe", "twinflow_1nfe", "twinflow_2nfe", "twinflow_1nfe_weight_average",
    "data_second_draw",
)
DEMO_PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "demo"


def _run_fresh_python(script: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``script`` in a new interpreter that finds ``twinloss_demo`` installed or not (as pytest's pythonpath does)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DEMO_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)


FIGURES = ("sliced_wasserstein", "mmd_rbf", "diversity_ratio", "mode_coverage", "off_mode_fraction")


def _check_output(out: Path) -> dict:
    report = json.loads((out / "metrics.json").read_text())
    assert set(report) >= {"config", "dataset", "results", "metrics", "timing_s"}
    assert set(report["results"]) == set(METHODS)
    seeds = report["config"]["eval_seeds"]
    for name in METHODS:
        row = report["results"][name]
        assert set(row) == {"nfe", *FIGURES}
        for figure in FIGURES:
            values = torch.tensor(row[figure]["per_seed"], dtype=torch.float64)
            assert values.shape == (seeds,)
            assert figure == "mmd_rbf" or bool((values >= 0).all())  # the unbiased MMD may dip below 0
            assert row[figure]["mean"] == pytest.approx(float(values.mean()))
            assert row[figure]["std"] == pytest.approx(float(values.std()))
    assert report["results"]["twinflow_1nfe"]["nfe"] == 1
    assert report["results"]["flow_matching_multi_step"]["nfe"] == report["config"]["multi_steps"]
    with Image.open(out / "demo.png") as image:
        assert image.format == "PNG" and image.width > 4 * image.height // 2
    return report


def test_demo_quick_in_process(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "out"), "--seed", "1", "--no-progress"]) == 0
    report = _check_output(tmp_path / "out")
    assert report["config"]["seed"] == 1
    assert "twinflow_1nfe" in capsys.readouterr().out


def test_demo_command_line_quick(tmp_path):
    """The ``twinloss`` script's entry point in a fresh process, as the README's ``.[demo]`` install has it.

    That install has no numpy (the test environment does, through diffusers), so the
    process blocks numpy before torch loads: anything that reaches for it fails here.
    """
    out = tmp_path / "demo-output"
    script = (
        "import sys; sys.modules['numpy'] = None; from twinloss_demo.cli import main; "
        f"sys.exit(main(['demo', '--quick', '--steps', '8', '--pretrain-steps', '8', '--out', {str(out)!r}]))"
    )
    done = _run_fresh_python(script, timeout=120)
    assert done.returncode == 0, done.stderr
    report = _check_output(out)
    assert report["config"]["finetune_steps"] == 8


def test_console_script_points_at_the_demo_package_and_the_demo_extra_holds_its_imports():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["twinloss"] == "twinloss_demo.cli:main"
    assert "demo" in project["tool"]["setuptools"]["packages"]["find"]["where"]
    extra = {requirement.split(">")[0].split("=")[0].strip().lower() for requirement in project["project"]["optional-dependencies"]["demo"]}
    assert set(DEMO_EXTRA_MODULES.values()) <= extra


def test_the_core_library_holds_no_application_code():
    import twinloss
    from twinloss import toy

    package = Path(twinloss.__file__).parent
    assert not (package / "cli.py").exists() and not (package / "demo.py").exists()
    assert not hasattr(toy, "train")


@pytest.mark.parametrize("blocked", ["tqdm", "PIL"])
def test_demo_without_the_extra_names_the_extra_and_exits_1(tmp_path, blocked):
    """A core install without ``[demo]``: a message naming the extra, no traceback, no output written."""
    out = tmp_path / "demo-output"
    script = (
        f"import sys; sys.modules[{blocked!r}] = None; from twinloss_demo.cli import main; "
        f"sys.exit(main(['demo', '--quick', '--out', {str(out)!r}]))"
    )
    done = _run_fresh_python(script, timeout=60)
    assert done.returncode == 1
    assert "twinloss[demo]" in done.stderr and DEMO_EXTRA_MODULES[blocked] in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_demo_rejects_bad_options(tmp_path, capsys):
    assert main(["demo", "--quick", "--steps", "-1", "--out", str(tmp_path)]) == 2
    assert "finetune_steps" in capsys.readouterr().err


def test_evaluate_samples_refuses_unequal_sample_sizes():
    points = torch.zeros(32, 2)
    with pytest.raises(ValueError, match="samples and held_out must be the same size"):
        evaluate_samples(points, torch.zeros(33, 2), torch.zeros(8, 2))


def test_training_loop_takes_one_step_per_batch_and_updates_the_teacher_after_each():
    from twinloss import TwinFlowLoss, toy
    from twinloss.teachers import OnlineTeacher
    from twinloss_demo.training import train

    class CountingTeacher(OnlineTeacher):
        updates = 0

        def update(self, model) -> None:
            type(self).updates += 1

    torch.manual_seed(0)
    model = toy.TimeMLP((2,), width=8, depth=1, frequencies=2)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    losses = train(
        model, TwinFlowLoss.plain_flow_matching(),
        lambda g: (toy.ring_mixture(8, generator=g).x, None, None),
        steps=3, lr=1e-2, generator=torch.Generator().manual_seed(0), teacher=CountingTeacher(),
        progress=lambda step, loss: seen.append((step, loss)),
    )
    assert len(losses) == 3 and [step for step, _ in seen] == [0, 1, 2]
    assert [loss for _, loss in seen] == losses
    assert CountingTeacher.updates == 3
    assert not torch.equal(before[0], next(model.parameters()))  # the optimizer stepped

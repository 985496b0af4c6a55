r"""What limits 1-NFE quality without guidance: the loss's own knobs, on the curves protocol (issue 12).

Every variant is ``BenchmarkLoss(guidance_scale=0, ...)`` with one
constructor argument changed from its default, fine-tuned from the same
pretrained weights on the same batches as the default methods of
``curves.py`` (its results sit beside theirs in ``results/curves``):

* ``order 4``: the RCGM chain integrates the teacher in 4 Euler jumps
  instead of 2 (``estimate_order``), a more accurate any-step target;
* ``estimate step 0.05``: the RCGM finite difference :math:`d` five times
  larger (``estimate_step``);
* ``one-step share 0.4``: 40 % of each batch in the ``one_step`` group
  (20 % in each of the others) instead of 25 %;
* ``no time weight``: unit weights instead of
  :math:`1 + \tan((1 - (t - r)) \pi / 2.5)`;
* ``l2 base``: the base distance is l2 instead of Barron
  (:math:`\alpha = 1`, :math:`c = 10^{-3}`);
* ``logit-normal t``: :math:`t \sim` logit-normal(0, 1) instead of Beta(1, 1);
* ``EMA teacher 0.99``: the guidance and RCGM passes use an EMA of the
  online weights (warmed up to 0.99) instead of the online model.

Two protocol settings of ``curves.py`` answer the other half of the
question, with the flow-matching reference re-run under the same setting:
``--width 256`` / ``--width 512`` (network capacity) and ``--lr 3e-4`` (the
step size the weight average smooths over).

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/levers.py --task patches --seed 0 --skip-fm          # every variant
    python benchmarks/quality/levers.py --task patches --seed 0 --skip-fm --methods "order 4"
    python benchmarks/quality/curves.py --task patches --seed 0 --width 512 --methods "w 0"
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402

import twinloss  # noqa: E402
from twinloss import BetaTime, EMATeacher, GroupShares, L2Distance, LogitNormalTime  # noqa: E402


def unguided(**changed) -> BenchmarkLoss:
    """``TwinFlowLoss`` without guidance, with ``changed`` constructor arguments.

    The batch is split into equal quarters unless ``changed`` names ``shares``, and the rectification draws
    the uniform ``s``: the defaults without guidance when these variants ran (since the tenth round of issue
    12 the partition is a fake share of 1/8, since the twelfth a conditioned batch draws ``s`` towards the data).
    """
    return BenchmarkLoss(guidance_scale=0.0, **({"shares": GroupShares(), "rectify_time": BetaTime()} | changed))


def with_ema_teacher(pretrained) -> tuple[BenchmarkLoss, twinloss.Teacher]:
    """Unguided loss whose no-grad passes read an EMA (0.99) of the online weights; the protocol updates it."""
    teacher = EMATeacher(0.99)
    return unguided(teacher=teacher), teacher


VARIANTS: dict[str, curves.MethodFactory] = {
    "TwinFlow w 0, order 4": lambda pretrained: unguided(estimate_order=4),
    "TwinFlow w 0, estimate step 0.05": lambda pretrained: unguided(estimate_step=0.05),
    "TwinFlow w 0, one-step share 0.4": lambda pretrained: unguided(shares=GroupShares(0.4, 0.2, 0.2, 0.2)),
    "TwinFlow w 0, no time weight": lambda pretrained: unguided(time_weight=None),
    "TwinFlow w 0, l2 base": lambda pretrained: unguided(distance=L2Distance()),
    "TwinFlow w 0, logit-normal t": lambda pretrained: unguided(time_distribution=LogitNormalTime()),
    "TwinFlow w 0, EMA teacher 0.99": with_ema_teacher,
}


if __name__ == "__main__":
    curves.METHODS.clear()  # only the variants; the default methods are curves.py's own runs
    curves.main(extra_methods=VARIANTS)

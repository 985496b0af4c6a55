r"""Where the rectification reads the gap: the law of its re-noising time ``s`` (issue 12, seventh round).

Step 7 re-noises the one-step samples to ``y = s z + (1 - s) x_hat`` and
pushes them along :math:`\Delta v = F(y, -s, -s) - F(y, s, s)`. The default
Barron distance turns each row's gap into a unit direction, so every row
pushes equally hard whatever its ``s``. Near noise (``s -> 1``) both fields
carry ``y`` towards the same mean and their gap is small: normalised, it is
mostly the fake field's fitting noise. Near the data (``s -> 0``) the gap
resolves detail, where a small network's real field is least accurate. The
authors draw ``s`` uniformly. Each variant here is the default loss with
only ``rectify_time`` (and the guidance scale) changed, on ``curves.py``'s
pretrained weights and batches (its results sit beside theirs in
``results/curves``; the RCGM-only counterpart is ``curves.py``'s own). The
laws:

* ``s uniform``: ``BetaTime(1, 1)``, the authors' draw (the default without
  guidance until the twelfth round, and still on a batch without a
  conditioning; with guidance, the default of the first seven rounds);
* ``s mid``: ``LogitNormalTime(0, 1)``, most rows in the middle (the default
  with guidance since the eighth round: ``curves.py``'s ``TwinFlow
  defaults``, so it has no guided variant here);
* ``s noisy``: ``ShiftedTime(3)``, the resolution shift towards noise;
* ``s clean``: ``ShiftedTime(1/3)``, towards the data (median ``s`` 1/4);
* ``s cleaner``: ``ShiftedTime(1/9)``, further towards the data (median 1/10);
* ``s ends``: ``BetaTime(1/2, 1/2)`` (arcsine), rows at both ends and few in
  the middle, where the gap is least repeatable.

Each law runs with the equal quarters, the default partition when the
seventh round ran them (the unguided ``s uniform`` with the quarters is
``balance.py``'s ``TwinFlow w 0, equal quarters``). Since the tenth round
the partition without guidance is a fake share of 1/8, and two variants
run with it:

* ``s clean, fake share 1/8``: the two changes that each helped without
  guidance. Since the twelfth round it is the unguided default on a batch
  with a conditioning (:func:`twinloss.loss.default_rectify_time`), so on
  the class-conditional tasks its runs are ``curves.py``'s ``TwinFlow w 0``;
  on the unconditional shapes it is a variant;
* ``s uniform, fake share 1/8``: without guidance the unguided default of
  the tenth and eleventh rounds; on the class-conditional tasks their
  ``TwinFlow w 0`` runs are stored under this name, and on shapes it is
  ``curves.py``'s ``TwinFlow w 0``. With guidance it holds ``balance.py``'s
  ``TwinFlow defaults, fake share 1/8`` runs made before the eighth round's
  guided law (1x = 1000, width 512).

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/rectify_time.py --task patches --seed 0 --skip-fm      # every variant
    python benchmarks/quality/rectify_time.py --task digits --seed 0 --skip-fm --methods "TwinFlow w 0, s mid"
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402
from balance import BALANCES, GUIDANCE  # noqa: E402

from twinloss import BetaTime, GroupShares, LogitNormalTime, ShiftedTime, TimeDistribution  # noqa: E402

RECTIFY_TIMES: dict[str, TimeDistribution] = {
    "s uniform": BetaTime(1.0, 1.0),
    "s mid": LogitNormalTime(0.0, 1.0),
    "s noisy": ShiftedTime(3.0),
    "s clean": ShiftedTime(1 / 3),
    "s cleaner": ShiftedTime(1 / 9),
    "s ends": BetaTime(0.5, 0.5),
}
"""The laws of the rectification's ``s`` compared."""

RUN_ELSEWHERE: dict[str, str] = {"w 0": "s uniform", "defaults": "s mid"}
"""The law whose equal-quarters run at each guidance setting is another script's method (``balance.py``'s
``TwinFlow w 0, equal quarters``, ``curves.py``'s ``TwinFlow defaults``), so it has no variant here."""


def variant(rectify_time: TimeDistribution, guidance_scale: float, shares: GroupShares) -> curves.MethodFactory:
    """A method factory: the default loss with ``rectify_time``, ``guidance_scale`` and ``shares``."""
    return lambda pretrained: BenchmarkLoss(guidance_scale=guidance_scale, rectify_time=rectify_time, shares=shares)


VARIANTS: dict[str, curves.MethodFactory] = {
    f"TwinFlow {setting}, {name}": variant(law, scale, BALANCES["equal quarters"])
    for name, law in RECTIFY_TIMES.items()
    for setting, scale in GUIDANCE.items()
    if name != RUN_ELSEWHERE[setting]
} | {
    f"TwinFlow {setting}, s clean, fake share 1/8": variant(RECTIFY_TIMES["s clean"], scale, BALANCES["fake share 1/8"])
    for setting, scale in GUIDANCE.items()
} | {
    f"TwinFlow {setting}, s uniform, fake share 1/8": variant(RECTIFY_TIMES["s uniform"], scale, BALANCES["fake share 1/8"])
    for setting, scale in GUIDANCE.items()
}


if __name__ == "__main__":
    curves.METHODS.clear()  # only the variants; the default methods are curves.py's own runs
    curves.main(extra_methods=VARIANTS)

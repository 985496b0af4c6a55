r"""How many rows the twin terms get: the paper's balance ``lambda`` on the curves protocol (issue 12, sixth round).

The equal quarters of :class:`twinloss.GroupShares` (the default with
guidance) split each batch so that the twin groups (``one_step`` and ``fake``) get half of it:
``lambda = 1/2``. The paper's ablation of ``lambda`` peaks near 1/3. On a
small network the fake rows (the flow of the model's own one-step samples at
negative times) share every weight with the real field, so they are also
the rows that compete with the base terms for capacity. Each variant is a
``BenchmarkLoss`` with other ``shares``, with guidance off (``w 0``)
and at the default guidance (``defaults``), on the same pretrained weights
and batches as ``curves.py``'s methods (its results sit beside theirs in
``results/curves``; the RCGM-only counterpart of every variant is
``curves.py``'s own, which has no twin rows):

* ``twin share 1/3``: ``GroupShares.from_twin_share(1/3)``, the paper's
  optimum: ``one_step`` and ``fake`` 1/6 each, ``multi_step`` and
  ``any_step`` 1/3 each;
* ``fake share 1/8``: only the fake group shrinks, to 1/8, and the three
  real groups share the rest equally (7/24 each): the rectification keeps
  its one-step rows, the fake field gets half the rows;
* ``fake share 1/16`` (tenth round): the same with a quarter of the fake
  rows (the real groups 5/16 each);
* ``equal quarters``: ``GroupShares()``, the default with guidance and,
  before the tenth round, without it.

Since the tenth round the fake share of 1/8 is the default partition without
guidance (:func:`twinloss.loss.default_shares`), so ``TwinFlow w 0`` of
``curves.py`` is that partition and ``TwinFlow w 0, equal quarters`` is the
variant; the runs stored before the tenth round under those two names were
renamed to match (the losses are the same).

The tenth round also lightens the rectification on top of the fake share of
1/8 (``TwinFlow w 0, fake share 1/8, rectify weight 0.25``, half the default
weight): fewer fake rows make the fake field slower to follow the
generator, a lighter weight makes the push on the generator smaller.

    export PYTHONPATH=$PWD/src:$PWD/adapters:$PWD/demo OMP_NUM_THREADS=1
    python benchmarks/quality/balance.py --task patches --seed 0 --skip-fm          # every variant
    python benchmarks/quality/balance.py --task digits --seed 0 --skip-fm --methods "twin share 1/3"

Guided runs stored before the eighth round of issue 12 used the
rectification's uniform ``s``, the default then; the default with guidance
is now ``LogitNormalTime(0, 1)``. Pass ``rectify_time=BetaTime()`` to
reproduce them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import curves  # noqa: E402
from common import BenchmarkLoss  # noqa: E402

from twinloss import BetaTime, GroupShares  # noqa: E402
from twinloss.loss import RELEASED_GUIDANCE, default_shares  # noqa: E402

BALANCES: dict[str, GroupShares] = {
    "twin share 1/3": GroupShares.from_twin_share(1 / 3),
    # written out rather than twinloss.loss.UNGUIDED_SHARES: a stored run's partition must not follow a later default
    "fake share 1/8": GroupShares(one_step=7 / 24, multi_step=7 / 24, any_step=7 / 24, fake=1 / 8),
    "fake share 1/16": GroupShares(one_step=5 / 16, multi_step=5 / 16, any_step=5 / 16, fake=1 / 16),
    "equal quarters": GroupShares(),
}
"""The group partitions compared; the one that is the default at a guidance setting is ``curves.py``'s run there."""

GUIDANCE: dict[str, float] = {"w 0": 0.0, "defaults": 0.5}
"""Each partition runs with guidance off and at the default scale, as issue 12's checks ask."""


GUIDED_UNIFORM_S = ("twin share 1/3",)
"""Guided partitions whose every stored run predates the eighth round's guided law of ``s`` (logit-normal):
they write out the uniform ``s`` they ran with. The guided fake share of 1/8 ran both ways: with the uniform
law at 1x = 1000 and width 512 (stored as ``rectify_time.py``'s ``TwinFlow defaults, s uniform, fake share
1/8``) and with the guided default at the issue's budget (stored here)."""


def variant(
    shares: GroupShares, guidance_scale: float, rectify_weight: float = 0.5, *, uniform_s: bool
) -> curves.MethodFactory:
    """A method factory: the default loss with ``shares``, ``guidance_scale`` and ``rectify_weight``, and with
    the authors' uniform ``s`` written out if ``uniform_s`` (the law the stored runs used: without guidance the
    default until the twelfth round; with it, :data:`GUIDED_UNIFORM_S`), else the default law."""
    rectify_time = BetaTime() if uniform_s else None
    return lambda pretrained: BenchmarkLoss(guidance_scale=guidance_scale, shares=shares, rectify_weight=rectify_weight,
                                           rectify_time=rectify_time)


VARIANTS: dict[str, curves.MethodFactory] = {
    f"TwinFlow {setting}, {balance}": variant(shares, scale, uniform_s=scale == 0 or balance in GUIDED_UNIFORM_S)
    for balance, shares in BALANCES.items()
    for setting, scale in GUIDANCE.items()
    if shares != default_shares(scale, RELEASED_GUIDANCE["guidance_interval"])
}
VARIANTS["TwinFlow w 0, fake share 1/8, rectify weight 0.25"] = variant(
    BALANCES["fake share 1/8"], 0.0, 0.25, uniform_s=True)


if __name__ == "__main__":
    curves.METHODS.clear()  # only the variants; the default methods are curves.py's own runs
    curves.main(extra_methods=VARIANTS)

r"""Which rows of a batch train what: the four TwinFlow groups and their times.

The released recipe splits each mini-batch into contiguous groups
(docs/method.md, section 2), in this order:

============== ======================================== =====================
group          times ``(t, r)``                         trains
============== ======================================== =====================
``one_step``   ``(1, 0)``                               the 1-NFE generator
``multi_step`` ``r = t - u t g``, ``g = 0.05``          instantaneous velocity
``any_step``   ``r = t - u t``                          any-jump average velocity
``fake``       ``(-t, -t)``                             the twin (fake) field
============== ======================================== =====================

with ``t`` from a :class:`~twinloss.time_distributions.TimeDistribution` and
``u ~ U(0, 1)``. The rows of ``x`` are taken in that order: the first
``counts["one_step"]`` rows form the one-step group, and so on.

The fake rows hold the model's own one-jump samples, so the data in the
batch's fake rows is never read, only their conditioning. With
``fake_rows="added"`` every row of ``x`` is a real row and the fake rows
are appended after them (:class:`TrajectorySampler`).
"""

import functools
import itertools
import math
from dataclasses import dataclass, fields

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from twinloss.time_distributions import BetaTime, TimeDistribution

__all__ = ["FAKE_ROWS", "GROUPS", "GroupShares", "Trajectory", "TrajectorySampler", "contiguous_groups"]

GROUPS = ("one_step", "multi_step", "any_step", "fake")
FAKE_ROWS = ("from_batch", "added")
"""Where the fake group's rows come from: the batch's last rows (the authors' recipe), or rows added after it."""
REMAINDER_DIGITS = 9
"""Decimals to which :meth:`GroupShares.counts` compares remainders: closer ones are ties."""


@dataclass(frozen=True)
class GroupShares:
    """Fractions of each batch given to the four groups (*default* equal).

    Shares must be non-negative and sum to 1. Rows are assigned by
    largest-remainder rounding of ``share * batch_size``, equal remainders
    going first to the group with the smaller share (a row is a larger part
    of its quota), then in the order of :data:`GROUPS`; a group with a
    positive share that would receive no row is an error
    (:meth:`counts` raises), never a silent drop.

    The paper's balance ``lambda`` (the weight of the TwinFlow terms against
    the any-step base) is :meth:`from_twin_share`.
    """

    one_step: float = 0.25
    multi_step: float = 0.25
    any_step: float = 0.25
    fake: float = 0.25

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"shares.{f.name} must be a finite number >= 0, got {value!r}")
        total = sum(getattr(self, name) for name in GROUPS)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"group shares must sum to 1, got {total} from {self}")

    @classmethod
    def from_twin_share(cls, twin_share: float) -> "GroupShares":
        """``twin_share`` of the rows to the TwinFlow groups (``one_step``, ``fake``).

        The rest is split evenly between ``multi_step`` and ``any_step``; the
        default equal shares are ``twin_share = 0.5``; the paper's ablation
        peaks near ``1/3``.
        """
        if not (0.0 <= twin_share <= 1.0):
            raise ValueError(f"twin_share must lie in [0, 1], got {twin_share}")
        half_twin, half_base = twin_share / 2, (1 - twin_share) / 2
        return cls(one_step=half_twin, multi_step=half_base, any_step=half_base, fake=half_twin)

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in GROUPS}

    def without_fake(self) -> "GroupShares":
        """The real groups' shares scaled to sum to 1, fake 0: how ``fake_rows="added"`` splits the data rows.

        Raises:
            ValueError: if the fake group has every row (no real share to scale).
        """
        real = 1.0 - self.fake
        if real <= 0:
            raise ValueError(f"shares {self.as_dict()} give the real groups no row")
        return GroupShares(
            one_step=self.one_step / real, multi_step=self.multi_step / real, any_step=self.any_step / real, fake=0.0
        )

    def min_batch_size(self) -> int:
        r"""The smallest batch from which on every batch gives each positive group a row.

        Rounding is not monotone in the batch size (``(1, 5, 5, 5) / 16``
        works at 4 rows, not at 5), so this is the start of the range where
        every size works, found in two parts:

        1. a closed form, in O(number of groups): with ``P`` positive groups,
           a group whose quota ``share * N`` exceeds ``(P - 1) / P`` always
           gets a row (to lose the largest-remainder draw it would need at
           least as many groups ahead of it as there are leftover rows, and
           those rows sum its own remainder with the ones ahead, each at least
           as large), so every ``N`` from
           :math:`N_0 = \max_i \lfloor (P - 1) / (P s_i) \rfloor + 1` works;
        2. a walk down from :math:`N_0` while the next smaller size works
           too, which ends within a few sizes for the shares we tried (the
           walk is capped at ``MAX_SIZE_WALK`` sizes; shares that reach the
           cap, several groups below about 1e-4, get the size the walk
           reached: every batch from it on works, a smaller one may too).
        """
        return _min_batch_size(self)

    def _round(self, batch_size: int) -> dict[str, int]:
        """Largest-remainder (Hamilton) rounding of ``share * batch_size``; ties to the smaller share.

        Remainders are compared to :data:`REMAINDER_DIGITS` decimals, so that a tie of the exact quotas is
        a tie here too (the float ``7/24`` is a little above ``7/24``, and ``54 * 7/24`` would otherwise
        beat ``54 / 8`` by float rounding alone).
        """
        shares = self.as_dict()
        exact = {name: share * batch_size for name, share in shares.items()}
        counts = {name: math.floor(value) for name, value in exact.items()}
        remainder = {name: round(exact[name] - counts[name], REMAINDER_DIGITS) for name in GROUPS}
        by_remainder = sorted(GROUPS, key=lambda n: (-remainder[n], shares[n], GROUPS.index(n)))
        for name in by_remainder[: batch_size - sum(counts.values())]:
            counts[name] += 1
        return counts

    def _starved(self, counts: dict[str, int]) -> list[str]:
        return [name for name in GROUPS if getattr(self, name) > 0 and counts[name] == 0]

    def counts(self, batch_size: int) -> dict[str, int]:
        """Rows per group for a batch of ``batch_size`` (largest-remainder rounding).

        Raises:
            ValueError: if a group with a positive share would get no row.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        counts = self._round(batch_size)
        starved = self._starved(counts)
        if starved:
            raise ValueError(
                f"batch_size={batch_size} is too small for group shares {self.as_dict()}: "
                f"group(s) {starved} would get no row; use a batch of at least "
                f"{self.min_batch_size()} or set their share to 0"
            )
        return counts


def contiguous_groups(counts: dict[str, int]) -> dict[str, slice]:
    """The rows of each group: contiguous, in the order of :data:`GROUPS`, ``counts[name]`` rows each."""
    groups, start = {}, 0
    for name in GROUPS:
        groups[name] = slice(start, start + counts[name])
        start += counts[name]
    return groups


@dataclass(frozen=True)
class Trajectory:
    """Signed times per row and the contiguous rows of each group.

    ``t`` and ``r`` are negative on the ``fake`` rows (the twin trajectory).
    """

    t: Float[Tensor, " batch"]
    r: Float[Tensor, " batch"]
    groups: dict[str, slice]

    def size(self, group: str) -> int:
        rows = self.groups[group]
        return rows.stop - rows.start

    def rows(self, *names: str) -> slice | Int[Tensor, " rows"]:
        """The rows of the named groups in ascending order, whatever order the groups have in the batch.

        A slice (a view when indexing) when those rows are contiguous, else
        an index tensor built on the device (no host sync); either indexes a
        tensor's first dim and assigns into it.

        Raises:
            ValueError: naming an unknown group.
        """
        unknown = [name for name in names if name not in self.groups]
        if unknown:
            raise ValueError(f"names must be groups among {sorted(self.groups)}, got {unknown}")
        ranges = sorted((self.groups[name].start, self.groups[name].stop) for name in names)
        ranges = [(start, stop) for start, stop in ranges if stop > start]
        if not ranges:
            return slice(0, 0)
        if all(stop == next_start for (_, stop), (next_start, _) in itertools.pairwise(ranges)):
            return slice(ranges[0][0], ranges[-1][1])
        device = self.t.device
        return torch.cat([torch.arange(start, stop, dtype=torch.long, device=device) for start, stop in ranges])

    def count(self, *names: str) -> int:
        """Rows in the named groups."""
        return sum(self.size(name) for name in names)


class TrajectorySampler(nn.Module):
    r"""Draws ``(t, r)`` for every row of a batch, group by group.

    Args:
        time_distribution: law of ``t`` (*default* ``Beta(1, 1)``, uniform).
        shares: the group partition (*default* equal shares).
        multi_step_gap: ``g`` in ``r = t - u t g`` for ``multi_step`` rows
            (*default* 0.05); ``0`` gives ``r = t`` exactly.
        fake_rows: where the fake rows come from, for a batch of ``B`` rows
            of ``x``:

            * ``"from_batch"`` (*default*, the authors' recipe): the shares
              partition the ``B`` rows, and the last ``shares.fake`` of them
              are the fake group, whose data the loss replaces by samples;
            * ``"added"``: the real groups split the ``B`` rows in the
              proportions of their shares (:meth:`GroupShares.without_fake`),
              and :math:`n = \lfloor B f / (1 - f) + 1/2 \rfloor` fake rows
              (``f = shares.fake``) follow them, so the trajectory has
              ``B + n`` rows in about the shares' proportions. Needs
              ``0 < shares.fake < 1``.
    """

    def __init__(
        self,
        time_distribution: TimeDistribution | None = None,
        shares: GroupShares | None = None,
        multi_step_gap: float = 0.05,
        fake_rows: str = "from_batch",
    ) -> None:
        super().__init__()
        if not (0.0 <= multi_step_gap <= 1.0):
            raise ValueError(f"multi_step_gap must lie in [0, 1], got {multi_step_gap}")
        if fake_rows not in FAKE_ROWS:
            raise ValueError(f"fake_rows must be one of {FAKE_ROWS}, got {fake_rows!r}")
        self.time_distribution = time_distribution if time_distribution is not None else BetaTime()
        self.shares = shares if shares is not None else GroupShares()
        if fake_rows == "added" and not 0 < self.shares.fake < 1:
            raise ValueError(
                f"fake_rows='added' appends the fake group's rows to the batch, which needs 0 < shares.fake < 1, "
                f"got shares {self.shares.as_dict()}"
            )
        self.multi_step_gap = float(multi_step_gap)
        self.fake_rows = fake_rows

    def added_rows(self, batch_size: int) -> int:
        r"""Fake rows appended to ``batch_size`` rows of ``x``: :math:`\lfloor B f / (1 - f) + 1/2 \rfloor` when
        ``fake_rows="added"``, else 0."""
        if self.fake_rows == "from_batch":
            return 0
        fake = self.shares.fake
        return math.floor(batch_size * fake / (1 - fake) + 0.5)

    def counts(self, batch_size: int) -> dict[str, int]:
        """Rows per group for ``batch_size`` rows of ``x`` (with ``fake_rows="added"`` the fake rows come on top).

        Raises:
            ValueError: if a group with a positive share would get no row.
        """
        if self.fake_rows == "from_batch":
            return self.shares.counts(batch_size)
        added = self.added_rows(batch_size)
        if added == 0:
            raise ValueError(
                f"batch_size={batch_size} is too small to add a fake row at shares.fake={self.shares.fake}; use a "
                f"batch of at least {self.min_batch_size()}"
            )
        return {**self.shares.without_fake().counts(batch_size), "fake": added}

    def min_batch_size(self) -> int:
        """The smallest ``x`` batch from which on every batch gives each positive group a row."""
        if self.fake_rows == "from_batch":
            return self.shares.min_batch_size()
        fake = self.shares.fake
        batch = max(1, math.ceil((1 - fake) / (2 * fake)))  # the closed form, then a step either way for rounding
        while batch > 1 and self.added_rows(batch - 1) > 0:
            batch -= 1
        while self.added_rows(batch) == 0:
            batch += 1
        return max(batch, self.shares.without_fake().min_batch_size())

    def forward(
        self,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> Trajectory:
        counts = self.counts(batch_size)
        groups = contiguous_groups(counts)
        rows = sum(counts.values())  # batch_size, plus the added fake rows

        t = self.time_distribution(rows, device=device, dtype=dtype, generator=generator)
        u = torch.rand(rows, device=device, dtype=dtype, generator=generator)
        gap = torch.zeros(rows, device=device, dtype=dtype)
        gap[groups["multi_step"]] = self.multi_step_gap
        gap[groups["any_step"]] = 1.0
        r = t - u * t * gap  # fake rows: gap 0, so r = t

        one_step = groups["one_step"]
        t = torch.cat([torch.ones_like(t[one_step]), t[one_step.stop :]])
        r = torch.cat([torch.zeros_like(r[one_step]), r[one_step.stop :]])
        sign = torch.ones(rows, device=device, dtype=dtype)
        sign[groups["fake"]] = -1.0
        return Trajectory(t=sign * t, r=sign * r, groups=groups)


MAX_SIZE_WALK = 1024
"""Most batch sizes :meth:`GroupShares.min_batch_size` checks below its closed-form bound."""


@functools.lru_cache(maxsize=64)
def _min_batch_size(shares: GroupShares) -> int:
    """:meth:`GroupShares.min_batch_size`, cached: the loss checks it every step, and shares are frozen."""
    positive = [share for share in shares.as_dict().values() if share > 0]
    count = len(positive)
    # the closed form, widened by a few ulps so float rounding of the bound never lands below it
    batch = max(math.floor((count - 1) / (count * share) * (1 + 1e-15)) + 1 for share in positive)
    for _ in range(MAX_SIZE_WALK):
        if batch == 1 or shares._starved(shares._round(batch - 1)):
            break
        batch -= 1
    return batch

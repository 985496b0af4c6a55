r"""The authors' released training configurations, one preset per file.

Each file in ``src/configs/`` of the authors' repository (inclusionAI/TwinFlow)
is a :class:`Preset` named by the file's stem, and
``TwinFlowLoss.from_preset(name, ...)`` builds the loss it describes. The
``method:`` block of a file maps to the loss as follows:

======================== ====================================================
their key                here
======================== ====================================================
``enhanced_ratio``       ``guidance_scale``
``enhanced_range``       ``guidance_interval``
``estimate_order``       ``estimate_order``
``dist_match_cof``       ``rectify_weight``
``use_image_free``       ``image_free``
``time_dist_ctrl``       ``[a, b, scale]``: ``t ~ scale * Beta(a, b)``
                         (:class:`~twinloss.time_distributions.BetaTime`;
                         every file has ``[1, 1, 1]``)
``loss_func_type``       ``BarronDistance(alpha)`` (``c = 1e-3``, their default)
``consistc_ratio``       ``1``: ``r = t - u t`` on any-step rows, as here
``ema_decay_rate``       the teachers (see :func:`loss_arguments`)
======================== ====================================================

Numbers their code fixes rather than reads, and which the constructor's
defaults already equal: RCGM step 0.01, residual and rectification clamps 1,
multi-step gap ``min(0.05, consistc_ratio) = 0.05``, the tangent weight
with divisor 2.5. Two they fix which a constructor's default follows the
guidance scale for, so a preset passes them: equal group shares
(``shares=GroupShares()``; the default without guidance is a fake share of
1/8) and the rectification's uniform time ``s``
(``rectify_time=BetaTime()``; the default follows the guidance and the
conditioning). The
sampler settings of each file (``sample:``) are not loss arguments and are
not part of a preset.
"""

from dataclasses import dataclass
from typing import Any, Literal

from twinloss.averaging import ProfiledAverage
from twinloss.distances import BarronDistance
from twinloss.teachers import MovingAverageTeacher, OnlineTeacher, Teacher
from twinloss.time_distributions import BetaTime
from twinloss.trajectory import GroupShares

__all__ = ["PRESETS", "Preset", "PresetName", "loss_arguments"]

PresetName = Literal[
    "openuni_full",
    "openuni_full_imgfree",
    "openuni_lora_1order",
    "openuni_lora_2order",
    "qwenimage_full",
    "qwenimage_lora_1order",
    "qwenimage_lora_2order",
    "sd35_full",
    "sd35_lora_1order",
    "sd35_lora_2order",
]


@dataclass(frozen=True)
class Preset:
    """The loss numbers of one released configuration file.

    Attributes:
        config: the file, relative to the authors' repository root.
        lora: whether the file trains LoRA adapters (``method_type: TwinFlow_LoRA``).
        guidance_scale: ``enhanced_ratio``.
        guidance_interval: ``enhanced_range``.
        estimate_order: ``estimate_order``.
        ema_decay: ``ema_decay_rate``: 0 online teacher, in (0, 1) an
            average, 1 fixed base weights for guidance.
        rectify_weight: ``dist_match_cof``.
        image_free: ``use_image_free`` (absent means False).
        time_dist_ctrl: ``time_dist_ctrl`` ``(a, b, scale)``.
        barron_alpha: ``loss_func_type.alpha`` (type ``barron_reweighting``).
        consistency_ratio: ``consistc_ratio``.
    """

    config: str
    lora: bool
    guidance_scale: float
    estimate_order: int
    ema_decay: float
    rectify_weight: float
    image_free: bool = False
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    time_dist_ctrl: tuple[float, float, float] = (1.0, 1.0, 1.0)
    barron_alpha: float = 1.0
    consistency_ratio: float = 1.0


# Read by hand from each file's ``method:`` block. Every file also has enhanced_range [0, 1],
# time_dist_ctrl [1, 1, 1], barron_reweighting with alpha 1 and consistc_ratio 1 (the Preset defaults).
# stem: (folder, enhanced_ratio, estimate_order, ema_decay_rate, dist_match_cof, use_image_free)
_FILES: dict[str, tuple[str, float, int, float, float, bool]] = {
    "openuni_full": ("openuni_task", 0.8, 2, 0.999, 0.75, False),
    "openuni_full_imgfree": ("openuni_task", 4.0, 2, 1.0, 0.75, True),
    "openuni_lora_1order": ("openuni_task", 0.8, 1, 0.0, 0.75, False),
    "openuni_lora_2order": ("openuni_task", 0.8, 2, 0.99, 0.75, False),
    "qwenimage_full": ("qwenimage_task", 0.8, 2, 0.0, 0.5, False),
    "qwenimage_lora_1order": ("qwenimage_task", 4.0, 1, 1.0, 0.5, False),
    "qwenimage_lora_2order": ("qwenimage_task", 0.8, 2, 0.99, 0.5, False),
    "sd35_full": ("sd_task", 0.8, 2, 0.99, 0.5, False),
    "sd35_lora_1order": ("sd_task", 0.8, 1, 0.0, 0.5, False),
    "sd35_lora_2order": ("sd_task", 0.8, 2, 0.99, 0.5, False),
}

PRESETS: dict[str, Preset] = {
    stem: Preset(
        config=f"src/configs/{folder}/{stem}.yaml", lora="_lora_" in stem, guidance_scale=scale,
        estimate_order=order, ema_decay=decay, rectify_weight=rectify, image_free=image_free,
    )
    for stem, (folder, scale, order, decay, rectify, image_free) in _FILES.items()
}


def _teachers(
    name: str, preset: Preset, teacher: Teacher | None, guidance_teacher: Teacher | None
) -> dict[str, Teacher]:
    """The teacher arguments ``ema_decay_rate`` implies, from what the caller passed.

    The authors' ``update_ema`` and ``training_step``: decay 0 evaluates both
    passes with the online model; a decay in (0, 1) both with the average;
    decay 1 the guidance pass with the fixed model and the RCGM chain with
    the online one (``model_4_rcgm = self.mod if emd != 1 else model``).
    """
    decay = preset.ema_decay
    for argument, value in (("teacher", teacher), ("guidance_teacher", guidance_teacher)):
        if isinstance(value, ProfiledAverage):  # an EMA teacher's storage with a decay profile instead of target_decay
            if decay == 0.0:
                wanted = "no teacher"
            elif decay < 1.0:
                wanted = f"a moving-average teacher with target_decay {decay} (e.g. twinloss.EMATeacher({decay}))"
            else:
                wanted = "guidance_teacher= with fixed (pretrained) weights (e.g. twinloss.FrozenTeacher(model))"
            raise ValueError(
                f"{argument} is a {type(value).__name__}, a weight average for sampling (which weights to sample "
                f"from, twinloss.averaging), not a teacher (who evaluates the targets); preset {name!r} needs {wanted}"
            )
    if decay == 0.0:
        for argument, value in (("teacher", teacher), ("guidance_teacher", guidance_teacher)):
            if value is not None:
                raise ValueError(
                    f"{argument} is given, but preset {name!r} (ema_decay_rate 0) evaluates every pass "
                    "with the online model; pass no teacher"
                )
        return {}
    if decay < 1.0:
        if guidance_teacher is not None:
            raise ValueError(
                f"guidance_teacher is given, but preset {name!r} uses one average (decay {decay}) for both "
                "passes; pass it as teacher="
            )
        if not isinstance(teacher, MovingAverageTeacher) or teacher.target_decay != decay:
            got = "nothing" if teacher is None else (
                f"{type(teacher).__name__}"
                + (f" with target_decay {teacher.target_decay}" if isinstance(teacher, MovingAverageTeacher) else "")
            )
            kind = "twinloss_adapters.lora.LoRAEMATeacher" if preset.lora else "twinloss.EMATeacher"
            raise ValueError(
                f"teacher must be a moving average with target_decay {decay} for preset {name!r} "
                f"(e.g. {kind}({decay}); ShardedEMATeacher under FSDP), got {got}"
            )
        return {"teacher": teacher}
    if teacher is not None:
        raise ValueError(
            f"teacher is given, but preset {name!r} (ema_decay_rate 1) uses fixed weights for guidance only "
            "and the online model for RCGM; pass guidance_teacher="
        )
    if guidance_teacher is None or isinstance(guidance_teacher, (OnlineTeacher, MovingAverageTeacher)):
        got = "nothing" if guidance_teacher is None else type(guidance_teacher).__name__
        kind = "twinloss_adapters.lora.BaseModelTeacher()" if preset.lora else "twinloss.FrozenTeacher(model)"
        raise ValueError(
            f"guidance_teacher must hold fixed (pretrained) weights for preset {name!r}, e.g. {kind}; got {got}"
        )
    return {"guidance_teacher": guidance_teacher}


def loss_arguments(
    name: PresetName, *, teacher: Teacher | None = None, guidance_teacher: Teacher | None = None
) -> dict[str, Any]:
    """The :class:`~twinloss.TwinFlowLoss` arguments of preset ``name``.

    Raises:
        ValueError: naming ``name`` if unknown, or ``teacher`` /
            ``guidance_teacher`` if the preset's teacher is missing, of the
            wrong kind or not needed.
    """
    if name not in PRESETS:
        raise ValueError(f"name must be one of {sorted(PRESETS)}, got {name!r}")
    preset = PRESETS[name]
    a, b, scale = preset.time_dist_ctrl
    if scale != 1.0 or preset.consistency_ratio != 1.0:
        raise ValueError(
            f"preset {name!r} has time scale {scale} and consistc_ratio {preset.consistency_ratio}; "
            "only 1 is expressible"
        )
    return dict(
        shares=GroupShares(),  # their prepare_inputs weighs the four groups equally, whatever the guidance
        time_distribution=BetaTime(a, b),
        distance=BarronDistance(alpha=preset.barron_alpha),
        guidance_scale=preset.guidance_scale,
        guidance_interval=preset.guidance_interval,
        estimate_order=preset.estimate_order,
        rectify_weight=preset.rectify_weight,
        rectify_time=BetaTime(),  # their s ~ U(0, 1), whatever the guidance scale
        image_free=preset.image_free,
        **_teachers(name, preset, teacher, guidance_teacher),
    )

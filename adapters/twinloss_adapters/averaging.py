"""Weight averaging for sampling under LoRA: the average kept as a second peft adapter.

:class:`LoRAWeightAverage` is :class:`twinloss.WeightAverage` for a model
trained with :func:`twinloss_adapters.lora.add_lora`: it averages only the
trained adapter (LoRA matrices and the ``modules_to_save`` copies, i.e. the
TwinFlow embeddings) into a second adapter on the same frozen base, so the
average costs one extra LoRA, not one extra model. It reuses the storage of
:class:`twinloss_adapters.lora.LoRAEMATeacher` with a
:class:`twinloss.DecayProfile` instead of the teacher's warm-up, and uses
its own adapter name, so it can live beside an EMA teacher::

    average = LoRAWeightAverage(twinloss.ConstantDecay(0.999))
    ...; optimizer.step(); average.update(peft_model)
    sampler(average.sampling_model(peft_model), noise, cond=cond)

Save it with ``average.state_dict()``; a resumed run calls
``average.attach(peft_model)`` (or simply ``update``) and
``load_state_dict`` in either order.
"""

from twinloss.averaging import DecayProfile, ProfiledAverage
from twinloss_adapters.lora import LoRAEMATeacher

__all__ = ["LoRAWeightAverage"]


class LoRAWeightAverage(ProfiledAverage, LoRAEMATeacher):
    """A weight average of the trained LoRA adapter, kept as adapter ``average_adapter``.

    Args:
        profile: the decay per update (*default* ``ConstantDecay(0.999)``; a
            number ``b`` means ``ConstantDecay(b)``).
        average_adapter: peft name of the averaged adapter (*default*
            ``"twinflow_average"``; the EMA teacher's is ``"twinflow_ema"``).
    """

    def __init__(self, profile: DecayProfile | float | None = None, *, average_adapter: str = "twinflow_average") -> None:
        super().__init__(profile, ema_adapter=average_adapter)

"""Adapters that bind stock diffusers transformers to the twinloss model protocol.

Each backbone module (``sana``, ``openuni``, ``qwen_image``, ``qwen_image_edit``,
``flux``, ``sd3``, ``wan``, ``ltx_video``, ``hunyuan_video``, ``z_image``; new:
``lumina2``, ``hidream``, ``flux2``, ``flux_kontext``, ``chroma``, ``anyflow``,
``ace_step``, ``hunyuan_video15``, ``hunyuan_video_i2v``, ``ltx2``, ``ltx_condition``,
``stable_audio``) exposes
``adapt(transformer, ...)``, returning an
``nn.Module`` with ``model(x_t, t, r, **cond) -> velocity``, and ``unadapt``.
``twinloss_adapters.lora`` adds LoRA training through peft and the two
memory-free LoRA teachers; ``twinloss_adapters.releases`` loads the authors'
released checkpoints (``time_embedding="twinflow_release"``). Backbone modules import diffusers lazily: importing
this package needs only torch.
"""

from twinloss_adapters.conventions import Capabilities, TimeConvention
from twinloss_adapters.time_embedding import TwinTimeEmbedding, inject_time_embedding

__all__ = ["Capabilities", "TimeConvention", "TwinTimeEmbedding", "inject_time_embedding"]

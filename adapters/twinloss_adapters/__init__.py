"""Adapters that bind stock diffusers transformers to the twinloss model protocol.

Each backbone module (``sana``, ``openuni``, ``qwen_image``, ``flux``, ``sd3``,
``wan``, ``ltx_video``, ``hunyuan_video``) exposes ``adapt(transformer, ...)``, returning an
``nn.Module`` with ``model(x_t, t, r, **cond) -> velocity``, and ``unadapt``.
``twinloss_adapters.lora`` adds LoRA training through peft and the two
memory-free LoRA teachers. Backbone modules import diffusers lazily: importing
this package needs only torch.
"""

from twinloss_adapters.conventions import Capabilities, TimeConvention
from twinloss_adapters.time_embedding import TwinTimeEmbedding, inject_time_embedding

__all__ = ["Capabilities", "TimeConvention", "TwinTimeEmbedding", "inject_time_embedding"]

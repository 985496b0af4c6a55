r"""Qwen-Image-Edit, -Edit-2509 and -Edit-2511 (``QwenImageTransformer2DModel``) as a twinloss model.

``QwenImageEditPipeline`` (Edit) and ``QwenImageEditPlusPipeline`` (2509,
2511) pack the noisy target latent and each reference-image latent into 2x2
patches, concatenate them along the tokens, pass
``img_shapes = [[(1, H/2, W/2), (1, h_1/2, w_1/2), ...]] * B`` (target first,
one entry per reference: the rotary positions of each image) and
``timestep = t`` in ``[0, 1]``, and keep only the first ``H W / 4`` output
tokens: the velocity of the target. This adapter does exactly that; the
reference latents are conditioning, like the prompt.

Edit-2511 is built with ``zero_cond_t=True``: the class embeds two timesteps,
``t`` for the target tokens and 0 for the reference tokens, and modulates each
token with its own. The TwinFlow embedding then enters the target half only:
the reference half gets ``Delta e(0, 0) = 0`` (no jump, not a twin row), so the
reference tokens stay "clean images at time 0" as in the stock model.

Conditioning (batch-leading):

* ``encoder_hidden_states`` ``[B, L, joint_attention_dim]``, required;
* ``encoder_hidden_states_mask`` ``[B, L]``, optional;
* ``reference_latents`` ``[B, C, h, w]``: the VAE latent of the (first) input
  image, normalised as the pipeline does (``(z - latents_mean) / latents_std``,
  frame axis squeezed), required;
* ``reference_latents_2``, ``reference_latents_3``: further input images
  (Edit-2509 / 2511 take up to three), optional, in order.
"""

import os
from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from twinloss_adapters.base import pipeline_from_pretrained, unadapt
from twinloss_adapters.packing import pack_image_patches, unpack_image_patches
from twinloss_adapters.qwen_image import UNSUPPORTED_FLAGS, QwenImageAdapter

__all__ = ["QwenImageEditAdapter", "adapt", "from_pretrained", "unadapt"]

REFERENCE_KEYS = ("reference_latents", "reference_latents_2", "reference_latents_3")


class QwenImageEditAdapter(QwenImageAdapter):
    """Qwen-Image-Edit behind the protocol; target and reference latents ``[B, C, H, W]``."""

    required_cond = ("encoder_hidden_states", "reference_latents")
    optional_cond = ("encoder_hidden_states_mask", *REFERENCE_KEYS[1:])
    rejected_flags = tuple(flag for flag in UNSUPPORTED_FLAGS if flag != "zero_cond_t")

    def __init__(self, transformer: object, *, target_time: bool = True, sign: bool = True) -> None:
        super().__init__(transformer, target_time=target_time, sign=sign)
        self.zero_cond_t = bool(getattr(transformer.config, "zero_cond_t", False))
        self._signed_times: tuple[Tensor, Tensor] | None = None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, subfolder: str | None = None, **kwargs: object
    ) -> "QwenImageEditAdapter":
        """The strict load of :meth:`AdaptedTransformer.from_pretrained`: the edit model has no TwinFlow release.

        Raises:
            ValueError: see :func:`twinloss_adapters.persistence.load_adapted`.
        """
        from twinloss_adapters.persistence import load_adapted

        return load_adapted(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    def forward(
        self, x_t: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], **cond: Tensor
    ) -> Tensor:
        """As :meth:`AdaptedTransformer.forward`; returns the velocity of the target tokens only."""
        self._signed_times = (t, r)  # zero_cond_t models embed a second, zero, time for the references
        try:
            return super().forward(x_t, t, r, **cond)
        finally:
            self._signed_times = None

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        super().check_cond(cond, batch_size)
        present = [key for key in REFERENCE_KEYS if key in cond]
        if present != list(REFERENCE_KEYS[: len(present)]):
            raise ValueError(f"cond has reference latents {present}; give them in order {list(REFERENCE_KEYS)}")
        patch = self.transformer.config.patch_size
        for key in present:
            reference = cond[key]
            if reference.ndim != 4 or reference.shape[1] != self.latent_channels:
                raise ValueError(
                    f"cond[{key!r}] must be an unpacked latent [B, {self.latent_channels}, h, w], "
                    f"got {tuple(reference.shape)}"
                )
            if reference.shape[2] % patch or reference.shape[3] % patch:
                raise ValueError(
                    f"cond[{key!r}] height and width must be multiples of {patch}, got {tuple(reference.shape)}"
                )

    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        patch = self.transformer.config.patch_size
        batch_size, _, height, width = x_t.shape
        references = [cond[key].to(x_t.dtype) for key in REFERENCE_KEYS if key in cond]
        target_tokens = pack_image_patches(x_t, patch)
        image_shapes = [(1, height // patch, width // patch)] + [
            (1, reference.shape[2] // patch, reference.shape[3] // patch) for reference in references
        ]

        def call() -> Tensor:
            return self.transformer(
                hidden_states=torch.cat([target_tokens, *(pack_image_patches(ref, patch) for ref in references)], 1),
                encoder_hidden_states=cond["encoder_hidden_states"],
                encoder_hidden_states_mask=cond.get("encoder_hidden_states_mask"),
                timestep=timestep,
                img_shapes=[image_shapes] * batch_size,
                return_dict=False,
            )[0]

        if self.zero_cond_t and self.injection is not None:
            t, r = self._signed_times
            # The class embeds [t; 0]: rows B..2B are the references' time 0, where Delta e(0, 0) = 0.
            with self.injection.times(torch.cat([t, torch.zeros_like(t)]), torch.cat([r, torch.zeros_like(r)])):
                tokens = call()
        else:
            tokens = call()
        return unpack_image_patches(tokens[:, : target_tokens.shape[1]], height, width, patch)


def adapt(transformer: object, *, target_time: bool = True, sign: bool = True) -> QwenImageEditAdapter:
    """Adapt a Qwen-Image-Edit ``QwenImageTransformer2DModel`` (Edit, 2509, or 2511 with ``zero_cond_t``) in place.

    Raises:
        ValueError: if ``transformer`` is not a ``QwenImageTransformer2DModel``,
            is a layered variant, or is already adapted.
    """
    return QwenImageEditAdapter(transformer, target_time=target_time, sign=sign)


from_pretrained = pipeline_from_pretrained(QwenImageEditAdapter)

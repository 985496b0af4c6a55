"""The adapted-model base class shared by every backbone adapter.

An :class:`AdaptedTransformer` wraps a stock diffusers transformer (adapted in
place: the TwinFlow time embedding is registered on it and its time embedder is
hooked) and exposes the twinloss protocol

    ``adapted(x_t, t, r, **cond) -> F(x_t, t, r)``.

A backbone module subclasses it with four things: the time convention, the
conditioning keys, a latent-shape check and the stock call (packing included).
"""

import abc
from collections.abc import Mapping

import torch
from jaxtyping import Float
from torch import Tensor, nn

from twinloss_adapters.conventions import Capabilities, TimeConvention
from twinloss_adapters.time_embedding import (
    DEFAULT_MODULE_NAME,
    TimeEmbeddingInjection,
    find_injection,
    inject_time_embedding,
)

__all__ = ["AdaptedTransformer", "check_backbone_class", "check_video_latent", "unadapt", "unadapt_transformer"]


def check_backbone_class(transformer: object, expected: type, *, argument: str = "transformer") -> None:
    """Raise ValueError unless ``transformer`` is an instance of the stock class ``expected``."""
    if hasattr(transformer, "get_base_model"):  # a peft PeftModel (diffusers models have no such method)
        raise ValueError(
            f"{argument} is a peft PeftModel; adapt the bare {expected.__name__} first, "
            "then wrap it with twinloss_adapters.lora.add_lora"
        )
    if not isinstance(transformer, expected):
        raise ValueError(f"{argument} must be a diffusers {expected.__name__}, got {type(transformer).__name__}")


def check_video_latent(x_t: Tensor, channels: int, patch: tuple[int, int, int], backbone: str) -> None:
    """Raise ValueError naming ``x_t`` unless it is ``[B, channels, F, H, W]`` with ``(F, H, W)`` divisible by ``patch``.

    ``patch`` is the backbone's ``(temporal, height, width)`` patch size; ``backbone`` names it in the message.
    """
    if x_t.ndim != 5 or x_t.shape[1] != channels:
        raise ValueError(f"x_t must be a video latent [B, {channels}, F, H, W] for this {backbone} model, got {tuple(x_t.shape)}")
    frames, height, width = x_t.shape[2:]
    patch_t, patch_h, patch_w = patch
    if frames % patch_t:
        raise ValueError(f"x_t has {frames} latent frames; expected a multiple of the temporal patch {patch_t}")
    if height % patch_h or width % patch_w:
        raise ValueError(f"x_t height and width must be multiples of the patch ({patch_h}, {patch_w}), got {(height, width)}")


class AdaptedTransformer(nn.Module, abc.ABC):
    """A diffusers transformer seen through the twinloss model protocol.

    Subclasses set the class attributes and implement :meth:`check_latent`
    and :meth:`run_backbone`.

    Attributes:
        required_cond: conditioning keys every call must carry.
        optional_cond: conditioning keys a call may carry.
        cond_widths: the last dim each text-like key must have (read from
            the transformer's config by the backbone); such a key must also
            be floating-point.
        cond_masks: mask key -> the ``[B, L, D]`` key it masks; the mask
            must be ``[B, L]``.
    """

    required_cond: tuple[str, ...] = ()
    optional_cond: tuple[str, ...] = ()
    cond_widths: Mapping[str, int] = {}  # cond key -> its last dim from the config (text width)
    cond_masks: Mapping[str, str] = {}  # mask key -> the cond key whose length it masks

    def __init__(
        self,
        transformer: nn.Module,
        *,
        time_convention: TimeConvention,
        embedder_path: str,
        embedding_dim: int,
        target_time: bool = True,
        sign: bool = True,
        guidance_inputs: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.time_convention = time_convention
        self.capabilities = Capabilities(target_time=target_time, sign=sign, guidance_inputs=guidance_inputs)
        self.injection: TimeEmbeddingInjection | None = None
        if target_time or sign:
            self.injection = inject_time_embedding(
                transformer, embedder_path, embedding_dim, target_time=target_time, sign=sign
            )

    # --- what a backbone defines ------------------------------------------------

    @abc.abstractmethod
    def check_latent(self, x_t: Tensor) -> None:
        """Raise ValueError naming ``x_t`` if its shape does not fit the backbone."""

    @abc.abstractmethod
    def run_backbone(self, x_t: Tensor, timestep: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Call the stock transformer in its own units; return its raw prediction shaped like ``x_t``."""

    # --- the protocol -----------------------------------------------------------

    def forward(
        self,
        x_t: Tensor,
        t: Float[Tensor, " batch"],
        r: Float[Tensor, " batch"],
        **cond: Tensor,
    ) -> Tensor:
        """Return the average velocity ``F(x_t, t, r)`` (twinloss units, shape of ``x_t``).

        Args:
            x_t: the interpolant ``|t| z + (1 - |t|) x``.
            t: signed current times ``[B]``; negative on the twin trajectory.
            r: signed target times ``[B]``, ``|r| <= |t|``.
            **cond: batch-leading conditioning tensors (see ``required_cond``,
                ``optional_cond`` and ``capabilities.guidance_inputs``).

        Raises:
            ValueError: for a missing or unknown ``cond`` key, a ``cond``
                tensor without the batch dimension, times outside the protocol
                or beyond the declared capabilities, or a latent of the wrong shape.
        """
        batch_size = x_t.shape[0] if x_t.ndim else 0
        if t.shape != (batch_size,):
            raise ValueError(f"t must have shape [B] = [{batch_size}], got {tuple(t.shape)}")
        self.capabilities.check_times(t, r)
        self.check_cond(cond, batch_size)
        self.check_latent(x_t)
        # Full precision for the timestep: each backbone casts it where its own code does.
        timestep = self.time_convention.to_backbone(t.to(torch.promote_types(t.dtype, torch.float32)))
        if self.injection is None:
            prediction = self.run_backbone(x_t, timestep, cond)
        else:
            with self.injection.times(t, r):
                prediction = self.run_backbone(x_t, timestep, cond)
        return self.time_convention.to_twinloss_velocity(prediction)

    def check_cond(self, cond: Mapping[str, Tensor], batch_size: int) -> None:
        """Validate conditioning keys and batch dimensions.

        Raises:
            ValueError: naming ``cond[key]`` for a missing, unknown or
                mis-shaped entry; unknown guidance inputs name the capability.
        """
        accepted = set(self.required_cond) | set(self.optional_cond) | set(self.capabilities.guidance_inputs)
        missing = [key for key in self.required_cond + self.capabilities.guidance_inputs if key not in cond]
        if missing:
            raise ValueError(
                f"cond is missing {missing} required by {type(self).__name__}; "
                f"it accepts {sorted(accepted)}"
            )
        unknown = sorted(set(cond) - accepted)
        if unknown:
            hint = ""
            if "guidance" in unknown and not self.capabilities.guidance_inputs:
                hint = " (this backbone was built without guidance embeddings: it takes no 'guidance')"
            raise ValueError(
                f"cond has keys {unknown} that {type(self).__name__} does not accept{hint}; "
                f"it accepts {sorted(accepted)}"
            )
        for key, value in cond.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"cond[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
            if value.ndim == 0 or value.shape[0] != batch_size:
                raise ValueError(
                    f"cond[{key!r}] must lead with the batch dimension {batch_size}, got {tuple(value.shape)}"
                )
        for key, width in self.cond_widths.items():
            value = cond.get(key)
            if value is not None and (not value.is_floating_point() or value.shape[-1] != width):
                raise ValueError(
                    f"cond[{key!r}] must be floating-point with last dim {width} (from the transformer's config), "
                    f"got {value.dtype} of shape {tuple(value.shape)}"
                )
        for mask_key, masked in self.cond_masks.items():
            mask, text = cond.get(mask_key), cond.get(masked)
            if mask is None or text is None:
                continue
            length = text.shape[1] if text.ndim > 2 else None
            if mask.ndim != 2 or mask.shape[1] != length:
                raise ValueError(
                    f"cond[{mask_key!r}] must be [B, L] with L = {length} (the length of cond[{masked!r}] "
                    f"{tuple(text.shape)}), got shape {tuple(mask.shape)}"
                )

    # --- extras and un-adaptation -------------------------------------------------

    def extra_state_dict(self) -> dict[str, Tensor]:
        """Only the parameters this adapter added (keys as in ``self.state_dict()``)."""
        prefixes = self.extra_prefixes()
        return {key: value for key, value in self.state_dict().items() if key.startswith(prefixes)}

    def extra_prefixes(self) -> tuple[str, ...]:
        """State-dict key prefixes of the adapter's own modules."""
        return (f"transformer.{DEFAULT_MODULE_NAME}.",)

    def load_extra_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what :meth:`extra_state_dict` saved.

        Raises:
            ValueError: if ``state`` lacks keys or carries keys of other modules.
        """
        expected = set(self.extra_state_dict())
        unexpected = sorted(set(state) - expected)
        missing = sorted(expected - set(state))
        if unexpected or missing:
            raise ValueError(f"state does not match this adapter's extras: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(dict(state), strict=False)

    def unadapt(self) -> nn.Module:
        """Remove the hook and the added modules; return the stock transformer."""
        return unadapt_transformer(self.transformer)


def unadapt_transformer(transformer: nn.Module) -> nn.Module:
    """Remove a TwinFlow injection from ``transformer`` (a no-op if it has none)."""
    injection = find_injection(transformer)
    if injection is not None:
        injection.remove()
    return transformer


def unadapt(adapted: object) -> nn.Module:
    """Undo a backbone's ``adapt``: return the stock transformer with its original behaviour.

    Accepts the adapted model or the adapted transformer itself.

    Raises:
        ValueError: if ``adapted`` is neither.
    """
    if isinstance(adapted, AdaptedTransformer):
        return unadapt_transformer(adapted.transformer)
    if isinstance(adapted, nn.Module) and find_injection(adapted) is not None:
        return unadapt_transformer(adapted)
    raise ValueError(
        f"adapted must be a model returned by adapt() or an adapted transformer, got {type(adapted).__name__}"
    )

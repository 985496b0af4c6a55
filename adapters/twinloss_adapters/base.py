"""The adapted-model base class shared by every backbone adapter.

An :class:`AdaptedTransformer` wraps a stock diffusers transformer (adapted in
place: the TwinFlow time embedding is registered on it and its time embedder is
hooked) and exposes the twinloss protocol

    ``adapted(x_t, t, r, **cond) -> F(x_t, t, r)``.

A backbone module subclasses it with four things: the time convention, the
conditioning keys, a latent-shape check and the stock call (packing included).
"""

import abc
import inspect
import os
from collections.abc import Callable, Mapping

from jaxtyping import Float
from torch import Tensor, nn

from twinloss.protocol import check_conditioning
from twinloss._tensors import at_least_float32
from twinloss_adapters.conventions import Capabilities, TimeConvention
from twinloss_adapters.flow_map import FlowMapCall, find_flow_map_call
from twinloss_adapters.time_embedding import (
    ReleasedTimeEmbedding,
    TimeEmbeddingInjection,
    find_injection,
    inject_released_time_embedding,
    inject_time_embedding,
)

__all__ = [
    "RELEASE_TIME_EMBEDDING",
    "TIME_EMBEDDINGS",
    "TWINFLOW_TIME_EMBEDDING",
    "AdaptedTransformer",
    "check_backbone_class",
    "check_image_latent",
    "check_latent_condition",
    "check_time_embedding_kind",
    "check_velocity_channels",
    "check_video_latent",
    "latent_concat_channels",
    "pipeline_from_pretrained",
    "unadapt",
    "unadapt_transformer",
]

TWINFLOW_TIME_EMBEDDING = "twinflow"
"""twinloss's own time embedding (:class:`~twinloss_adapters.time_embedding.TwinTimeEmbedding`)."""
RELEASE_TIME_EMBEDDING = "twinflow_release"
"""The time embedding of the authors' released checkpoint of that backbone."""
TIME_EMBEDDINGS = (TWINFLOW_TIME_EMBEDDING, RELEASE_TIME_EMBEDDING)


def check_time_embedding_kind(time_embedding: str) -> None:
    """Raise ValueError naming ``time_embedding`` unless it is one of :data:`TIME_EMBEDDINGS`."""
    if time_embedding not in TIME_EMBEDDINGS:
        raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {time_embedding!r}")


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


def check_image_latent(x_t: Tensor, channels: int, patch: int, backbone: str, *, layout: str = "") -> None:
    """Raise ValueError naming ``x_t`` unless it is ``[B, channels, H, W]`` with ``H`` and ``W`` divisible by ``patch``.

    ``backbone`` names the model in the message; ``layout`` adds a note on the expected latent
    (e.g. ``" (unpacked latents)"`` where the adapter packs patches itself).
    """
    if x_t.ndim != 4 or x_t.shape[1] != channels:
        raise ValueError(f"x_t must be [B, {channels}, H, W]{layout} for this {backbone} model, got {tuple(x_t.shape)}")
    if x_t.shape[2] % patch or x_t.shape[3] % patch:
        raise ValueError(f"x_t height and width must be multiples of {patch} (the patch size), got {tuple(x_t.shape)}")


def check_velocity_channels(in_channels: int, out_channels: int) -> None:
    """Raise ValueError naming ``transformer`` unless it predicts as many channels as it takes (a velocity of ``x_t``)."""
    if out_channels != in_channels:
        raise ValueError(
            f"transformer predicts {out_channels} channels for {in_channels} input channels; "
            "a velocity must have the latent's shape"
        )


def latent_concat_channels(in_channels: int, out_channels: int | None, pipeline: str) -> tuple[int, int]:
    """``(latent, condition)`` channel counts of a model fed ``[x_t, condition latents, mask]`` along channels.

    Such a model (HunyuanVideo I2V's ``latent_concat``, HunyuanVideo 1.5)
    predicts the ``C = out_channels`` latent channels from ``in_channels = 2 C + 1``:
    ``x_t``, the condition latents and a one-channel mask.

    Raises:
        ValueError: naming the channel counts unless ``in_channels = 2 * out_channels + 1``;
            ``pipeline`` names who needs that layout.
    """
    latent = out_channels or in_channels
    condition = in_channels - latent
    if condition != latent + 1:
        raise ValueError(
            f"transformer takes {in_channels} channels and predicts {latent}; {pipeline} needs "
            "in_channels = 2 * out_channels + 1 (latents, condition latents, mask)"
        )
    return latent, condition


def check_latent_condition(condition: Tensor, channels: int, x_t: Tensor | None = None) -> None:
    """Raise ValueError naming ``cond['latent_condition']`` unless it is ``[B, channels, *x_t.shape[2:]]``.

    ``x_t`` may be omitted to check only the channels (before the latent itself is checked).
    """
    if condition.ndim != 5 or condition.shape[1] != channels:
        raise ValueError(f"cond['latent_condition'] must be [B, {channels}, F, H, W], got {tuple(condition.shape)}")
    if x_t is not None and condition.shape[2:] != x_t.shape[2:]:
        raise ValueError(
            f"cond['latent_condition'] spans {tuple(condition.shape[2:])} but x_t spans {tuple(x_t.shape[2:])}"
        )


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
    native_target_time: bool = False
    """The stock transformer takes the target time itself (AnyFlow's ``r_timestep``): it keeps that input,
    no module is added to embed ``r`` (``target_time`` then only says whether ``r != t`` is accepted), and no
    :class:`~twinloss_adapters.flow_map.FlowMapCall` is installed over it."""
    construction_arguments: dict[str, object]

    def __new__(cls, *args: object, **kwargs: object) -> "AdaptedTransformer":
        """Record the constructor's keyword arguments (``construction_arguments``), so a save can rebuild the adapter."""
        instance = super().__new__(cls)
        if args or kwargs:  # copy.deepcopy and pickle call __new__ bare and restore __dict__ themselves
            bound = inspect.signature(cls.__init__).bind(instance, *args, **kwargs)
            bound.apply_defaults()
            recorded = {name: value for name, value in bound.arguments.items() if name not in ("self", "transformer")}
            object.__setattr__(instance, "construction_arguments", recorded)
        return instance
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
        release: ReleasedTimeEmbedding | None = None,
        per_token_time: bool = False,
    ) -> None:
        super().__init__()
        if release is not None and not target_time:
            raise ValueError(
                "target_time=False cannot be honoured with time_embedding='twinflow_release': "
                "the released embedding always embeds the target time"
            )
        if release is not None and embedder_path != release.embedder_path:
            raise ValueError(f"embedder_path {embedder_path!r} differs from the release's {release.embedder_path!r}")
        if release is not None and per_token_time:
            raise ValueError(
                "per_token_time=True cannot be honoured with time_embedding='twinflow_release': "
                "the released embeddings add one embedding per batch row"
            )
        if release is not None and self.native_target_time:
            raise ValueError(
                f"time_embedding='twinflow_release' cannot be honoured by {type(self).__name__}: "
                "its backbone embeds the target time itself"
            )
        self.transformer = transformer
        self.time_convention = time_convention
        self.capabilities = Capabilities(target_time=target_time, sign=sign, guidance_inputs=guidance_inputs)
        self.time_embedding_kind = TWINFLOW_TIME_EMBEDDING if release is None else RELEASE_TIME_EMBEDDING
        embeds_target_time = target_time and not self.native_target_time  # a native r goes to the backbone's input
        self.injection: TimeEmbeddingInjection | None = None
        if release is not None:
            self.injection = inject_released_time_embedding(transformer, release, embedding_dim, sign=sign)
        elif embeds_target_time or sign:
            self.injection = inject_time_embedding(
                transformer, embedder_path, embedding_dim, target_time=embeds_target_time, sign=sign,
                per_token=per_token_time,
            )
        # diffusers' flow-map keyword: transformer(..., timestep=, r_timestep=) in the pipeline's units,
        # unless the stock transformer already has that input
        self.flow_map_call: FlowMapCall | None = (
            None if self.native_target_time else FlowMapCall(transformer, self.injection, time_convention, self.capabilities)
        )
        # A pipeline saves its transformer with transformer.save_pretrained: make that save the adapter's
        # too, or options that change no weights (LTX-Video's frame_rate) would reload at their defaults.
        transformer.save_pretrained = self._save_as_pipeline_component

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
        self.check_call(x_t, t, r, cond)
        return self.velocity(x_t, t, r, cond)

    def velocity(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """:meth:`forward` for inputs that :meth:`check_call` accepted: the stock call with the twin times injected."""
        # Full precision for the timestep: each backbone casts it where its own code does.
        timestep = self.time_convention.to_backbone(t.to(at_least_float32(t.dtype)))
        if self.injection is None:
            prediction = self.run_backbone_to(x_t, timestep, r, cond)
        else:
            with self.injection.times(*self.injection_times(x_t, t, r, cond)):
                prediction = self.run_backbone_to(x_t, timestep, r, cond)
        return self.time_convention.to_twinloss_velocity(prediction)

    def check_call(self, x_t: Tensor, t: Tensor, r: Tensor, cond: Mapping[str, Tensor]) -> None:
        """Raise the ``ValueError`` of :meth:`forward` for times, ``cond`` or a latent it cannot take."""
        batch_size = x_t.shape[0] if x_t.ndim else 0
        if t.shape != (batch_size,):
            raise ValueError(f"t must have shape [B] = [{batch_size}], got {tuple(t.shape)}")
        self.capabilities.check_times(t, r)
        self.check_cond(cond, batch_size)
        self.check_latent(x_t)

    def injection_times(
        self, x_t: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], cond: Mapping[str, Tensor]
    ) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
        """The ``(t, r)`` the time-embedding injection sees: one pair per row, ``(t, r)`` itself.

        A backbone fed per-token timesteps (Wan 2.2 TI2V) returns one pair per
        token, batch-major ``[B * L]``, for its per-token injection.
        """
        return t, r

    def run_backbone_to(
        self, x_t: Tensor, timestep: Tensor, r: Float[Tensor, " batch"], cond: Mapping[str, Tensor]
    ) -> Tensor:
        """The stock call for a jump to ``r``: :meth:`run_backbone`, ``r`` reaching the model through the injection.

        A native flow-map adapter (:class:`~twinloss_adapters.native_flow_map.FlowMapAdapter`)
        hands ``r`` to the backbone's own target-time input instead.
        """
        return self.run_backbone(x_t, timestep, cond)

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
        check_conditioning(cond, batch_size, name="cond")  # tensors leading with the batch
        for key, width in self.cond_widths.items():
            value = cond.get(key)
            if value is not None and (not value.is_floating_point() or value.shape[-1] != width):
                raise ValueError(
                    f"cond[{key!r}] must be floating-point with last dim {width} (from the model's config), "
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

    # --- saving and loading (twinloss_adapters.persistence) ------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: object) -> None:
        """Save the transformer with its twin weights and a ``twinloss_config.json``; see ``docs/saving.md``.

        ``kwargs`` go to the stock ``save_pretrained`` (``variant``,
        ``max_shard_size``, ``is_main_process``, ...). Reload with
        ``type(self).from_pretrained(save_directory)``.
        """
        from twinloss_adapters.persistence import save_adapted

        save_adapted(self, save_directory, **kwargs)

    def _save_as_pipeline_component(
        self,
        save_directory: str | os.PathLike,
        *,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str = "10GB",
        **kwargs: object,
    ) -> None:
        """The adapted transformer's own ``save_pretrained``: :meth:`save_pretrained` of this adapter.

        ``pipe.save_pretrained`` calls each component's ``save_pretrained``
        with the arguments its signature names (``safe_serialization``,
        ``variant``, ``max_shard_size``), so they are named here.
        """
        self.save_pretrained(
            save_directory, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size,
            **kwargs,
        )

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *, subfolder: str | None = None, **kwargs: object
    ) -> "AdaptedTransformer":
        """Load a stock or twinloss checkpoint, adapt it and restore every twin weight, strictly.

        Args:
            pretrained_model_name_or_path: a directory or Hub repository.
            subfolder: e.g. ``"transformer"`` inside a pipeline repository.
            **kwargs: the adapter's own arguments (``target_time``, ``sign``,
                ``connector``, ...; a saved option may not be contradicted) and
                the stock ``from_pretrained``'s (``torch_dtype``, ``variant``, ...).

        Raises:
            ValueError: see :func:`twinloss_adapters.persistence.load_adapted`.
        """
        from twinloss_adapters.persistence import load_adapted

        return load_adapted(cls, pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    # --- extras and un-adaptation -------------------------------------------------

    def extra_state_dict(self) -> dict[str, Tensor]:
        """Only the parameters this adapter added (keys as in ``self.state_dict()``)."""
        prefixes = self.extra_prefixes()
        return {key: value for key, value in self.state_dict().items() if key.startswith(prefixes)}

    def extra_prefixes(self) -> tuple[str, ...]:
        """State-dict key prefixes of the adapter's own modules (none without an injection)."""
        if self.injection is None:
            return ()
        return tuple(f"transformer.{name}." for name in self.injection.module_names)

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


def pipeline_from_pretrained(adapter_class: type[AdaptedTransformer]) -> Callable[..., AdaptedTransformer]:
    """A backbone module's ``from_pretrained``: ``adapter_class.from_pretrained`` with ``subfolder="transformer"``.

    A pipeline repository keeps the transformer in its ``transformer`` folder;
    ``AdapterClass.from_pretrained`` follows diffusers' model convention
    (``subfolder=None``). See ``docs/saving.md``.
    """

    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike, *, subfolder: str | None = "transformer", **kwargs: object
    ) -> AdaptedTransformer:
        return adapter_class.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    from_pretrained.__doc__ = (
        f"``{adapter_class.__name__}.from_pretrained`` with a pipeline repository's ``subfolder`` default; "
        "see ``docs/saving.md``."
    )
    from_pretrained.__qualname__ = "from_pretrained"
    from_pretrained.__module__ = adapter_class.__module__
    return from_pretrained


def unadapt_transformer(transformer: nn.Module) -> nn.Module:
    """Remove a TwinFlow injection and the ``r_timestep`` hooks from ``transformer`` (a no-op if it has none)."""
    transformer.__dict__.pop("save_pretrained", None)  # back to the stock class's save
    flow_map_call = find_flow_map_call(transformer)
    if flow_map_call is not None:
        flow_map_call.remove()
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
    if isinstance(adapted, nn.Module) and (find_injection(adapted) or find_flow_map_call(adapted)) is not None:
        return unadapt_transformer(adapted)
    raise ValueError(
        f"adapted must be a model returned by adapt() or an adapted transformer, got {type(adapted).__name__}"
    )

r"""Give any time-embedding module the target time ``r`` and the sign of ``t``.

A diffusion transformer maps its timestep to an embedding ``e(t)`` (a
``TimestepEmbedding`` MLP in every diffusers backbone), and every modulation
(adaLN shift/scale/gate) is computed *from* that embedding. Adding to ``e(t)``
therefore reaches every block, which is what TwinFlow needs: the network must
know where a jump ends and which trajectory (real or twin) it is on.

:func:`inject_time_embedding` hooks such a module and adds

.. math::
    \Delta e(t, r) = (|t| - |r|)\, \mathrm{MLP}(\gamma(|r|))
    \;+\; \mathbb{1}[t < 0]\, s,

where :math:`\gamma` is a sinusoidal feature map, the MLP's last layer starts
at zero and ``s`` (the sign embedding) starts at zero. Both terms are
therefore silent at creation, and the first one stays silent whenever
``r = t`` (the gate is the jump length). Gradients still reach both at
initialisation: ``d Delta / d W_last = (|t| - |r|) * hidden`` and
``d Delta / d s = 1[t < 0]``.

The times reach the hook through :meth:`TimeEmbeddingInjection.times`, a
context the adapter opens around the backbone call. Outside that context
(e.g. the stock diffusers pipeline calling the transformer directly) the hook
adds nothing, so the stock behaviour at ``r = t, t > 0`` is kept.

The authors' released checkpoints embed the two times differently: each adds
a *second copy of the stock embedder* (:class:`ReleasedTimeEmbedding`,
:func:`inject_released_time_embedding`) whose output, gated by the jump, is
added to the stock embedding. :func:`qwen_image_release_delta` and
:func:`z_image_release_delta` are their two formulas.
"""

import contextlib
import copy
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "PerTokenTimeEmbeddingInjection",
    "ReleasedTimeEmbedding",
    "TimeEmbeddingInjection",
    "TwinTimeEmbedding",
    "find_injection",
    "inject_released_time_embedding",
    "inject_time_embedding",
    "qwen_image_release",
    "qwen_image_release_delta",
    "sinusoidal_features",
    "z_image_release",
    "z_image_release_delta",
]

DEFAULT_MODULE_NAME = "twinflow_time_embedding"
QWEN_IMAGE_RELEASE_NAME = "time_text_embed_2"
"""Attribute and checkpoint key prefix of TwinFlow-Qwen-Image-v1.0's second time embedder."""
Z_IMAGE_RELEASE_NAME = "t_embedder_2"
"""Attribute and checkpoint key prefix of TwinFlow-Z-Image-Turbo-exp's second time embedder."""
INJECTION_ATTRIBUTE = "_twinflow_time_injection"

TimeDelta = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
"""``(module, t, r, embedding) -> addition``: how one registered module adds to the
stock time embedding ``embedding [B, D]`` for signed times ``t, r [B]``."""


def twin_delta(module: nn.Module, t: Tensor, r: Tensor, embedding: Tensor) -> Tensor:
    """The :class:`TwinTimeEmbedding` term: ``module(t, r)`` (``embedding`` unused)."""
    return module(t, r)


def sinusoidal_features(
    values: Float[Tensor, " batch"], dim: int, *, scale: float = 1000.0, max_period: float = 10000.0
) -> Float[Tensor, "batch {dim}"]:
    r"""Sinusoidal features ``[cos(w_k s v), sin(w_k s v)]``, ``w_k = P^{-k/(dim/2)}``.

    Computed in float32 whatever the input dtype (the frequencies span four
    orders of magnitude).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    angles = scale * values.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TwinTimeEmbedding(nn.Module):
    r"""The two additions TwinFlow needs at a backbone's time embedding.

    .. math::
        \Delta e(t, r) = (|t| - |r|)\, W_2\, \mathrm{SiLU}(W_1 \gamma(|r|) + b_1) + b_2\,(|t| - |r|)
        \;+\; \mathbb{1}[t < 0]\, s

    with ``W_2 = b_2 = 0`` and ``s = 0`` at creation.

    Args:
        embedding_dim: width of the embedding it is added to.
        target_time: build the gated target-time embedder.
        sign: build the sign (twin trajectory) embedding.
        frequency_dim: number of sinusoidal features of ``|r|`` (even).
        time_scale: multiplies ``|r|`` inside the sinusoids (1000 matches the
            usual diffusion timestep range).
    """

    def __init__(
        self,
        embedding_dim: int,
        *,
        target_time: bool = True,
        sign: bool = True,
        frequency_dim: int = 256,
        time_scale: float = 1000.0,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if frequency_dim < 2 or frequency_dim % 2:
            raise ValueError(f"frequency_dim must be an even number >= 2, got {frequency_dim}")
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError(f"time_scale must be positive and finite, got {time_scale}")
        self.embedding_dim = embedding_dim
        self.frequency_dim = frequency_dim
        self.time_scale = float(time_scale)
        self.target_time_mlp: nn.Sequential | None = None
        self.negative_time_embedding: nn.Parameter | None = None
        if target_time:
            self.target_time_mlp = nn.Sequential(
                nn.Linear(frequency_dim, embedding_dim),
                nn.SiLU(),
                nn.Linear(embedding_dim, embedding_dim),
            )
            nn.init.zeros_(self.target_time_mlp[-1].weight)
            nn.init.zeros_(self.target_time_mlp[-1].bias)
        if sign:
            self.negative_time_embedding = nn.Parameter(torch.zeros(embedding_dim))

    @property
    def has_target_time(self) -> bool:
        return self.target_time_mlp is not None

    @property
    def has_sign(self) -> bool:
        return self.negative_time_embedding is not None

    def forward(
        self, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"]
    ) -> Float[Tensor, "batch dim"]:
        """Return ``Delta e(t, r)``, shape ``[B, embedding_dim]``, in the module's dtype."""
        parameters = list(self.parameters())
        dtype = parameters[0].dtype if parameters else t.dtype
        delta = torch.zeros(t.shape[0], self.embedding_dim, dtype=dtype, device=t.device)
        if self.target_time_mlp is not None:
            jump = (t.abs() - r.abs()).to(dtype)
            features = sinusoidal_features(r.abs(), self.frequency_dim, scale=self.time_scale).to(dtype)
            delta = delta + jump[:, None] * self.target_time_mlp(features)
        if self.negative_time_embedding is not None:
            is_twin = (t < 0).to(dtype)
            delta = delta + is_twin[:, None] * self.negative_time_embedding
        return delta


class TimeEmbeddingInjection:
    """A live injection: the hook on the embedder and the times of the current call.

    Created by :func:`inject_time_embedding` or
    :func:`inject_released_time_embedding`; kept by the adapter. Not a module:
    its only weights are the modules registered on the root (``terms``: name
    -> how that module adds to the embedding), so they save, load, move and
    train with it. The hook adds the sum of the terms.
    """

    description = "injection"
    embedding_layout = "[B, D] (hook the inner embedder)"
    """The embedder output this injection adds to, as its errors name it."""

    def __init__(self, root: nn.Module, embedder_path: str, terms: Mapping[str, TimeDelta]) -> None:
        if not terms:
            raise ValueError("terms must name at least one registered module")
        self.root = root
        self.embedder_path = embedder_path
        self.terms = dict(terms)
        self._times: tuple[Tensor, Tensor] | None = None
        self._hook: RemovableHandle | None = root.get_submodule(embedder_path).register_forward_hook(
            self._add_twin_embedding
        )

    @property
    def module_names(self) -> tuple[str, ...]:
        """Attribute names (and state-dict prefixes) of the registered modules."""
        return tuple(self.terms)

    def module(self, name: str) -> nn.Module:
        """The registered module ``name`` (or peft's wrapper around it).

        Looked up on every call, so a peft ``ModulesToSaveWrapper`` that
        replaced it routes to the active adapter's copy.
        """
        return self.root.get_submodule(name)

    @property
    def active(self) -> bool:
        """True inside a :meth:`times` context (an adapter call is running)."""
        return self._times is not None

    @contextlib.contextmanager
    def times(self, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"]) -> Iterator[None]:
        """Make ``(t, r)`` visible to the hook for the duration of one backbone call."""
        if self._hook is None:
            raise ValueError("this time-embedding injection has been removed (the model was un-adapted)")
        previous, self._times = self._times, (t, r)
        try:
            yield
        finally:
            self._times = previous

    def _add_twin_embedding(self, module: nn.Module, args: tuple, output: object) -> object:
        """The forward hook: the stock embedding plus the terms, inside an adapter call; untouched outside one."""
        if self._times is None:
            return output  # called outside an adapter call: the stock model, untouched
        if not isinstance(output, Tensor):
            raise ValueError(
                f"{self.embedder_path} returned {type(output).__name__}; the {self.description} needs a module "
                f"that returns the time embedding as one tensor {self.embedding_layout}"
            )
        return self._add_terms(output, *self._times)

    def _add_terms(self, output: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"]) -> Tensor:
        """``output + sum of the terms at (t, r)`` for an ``output`` of one embedding per batch row, ``[B, D]``."""
        if output.ndim != 2 or output.shape[0] != t.shape[0]:
            raise ValueError(
                f"{self.embedder_path} returned shape {tuple(output.shape)}; expected "
                f"[{t.shape[0]}, D] (one embedding per batch row)"
            )
        stock = output
        for name, delta in self.terms.items():
            output = output + delta(self.module(name), t, r, stock).to(stock.dtype)
        return output

    def remove(self) -> None:
        """Detach the hook and delete the registered modules from the root."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for name in self.terms:
            if hasattr(self.root, name):
                delattr(self.root, name)
        if getattr(self.root, INJECTION_ATTRIBUTE, None) is self:
            delattr(self.root, INJECTION_ATTRIBUTE)


def inject_time_embedding(
    root: nn.Module,
    embedder_path: str,
    embedding_dim: int,
    *,
    target_time: bool = True,
    sign: bool = True,
    module_name: str = DEFAULT_MODULE_NAME,
    frequency_dim: int = 256,
    per_token: bool = False,
) -> TimeEmbeddingInjection:
    """Add TwinFlow's target-time and sign embeddings to any time embedder.

    Registers a :class:`TwinTimeEmbedding` on ``root`` as ``module_name``
    (so it is part of ``root.state_dict()``), on the device and dtype of the
    embedder's parameters, and hooks ``root.get_submodule(embedder_path)`` so
    that its output ``e`` becomes ``e + Delta e(t, r)``.

    Args:
        root: the module that owns the embedder (the diffusers transformer).
        embedder_path: dotted path of a module returning the time embedding
            ``[B, embedding_dim]`` that the modulation layers consume, e.g.
            ``"time_embed.emb.timestep_embedder"`` (SANA).
        embedding_dim: width of that embedding.
        target_time: add the gated target-time embedder.
        sign: add the sign embedding.
        module_name: attribute under which the new module is registered.
        frequency_dim: sinusoidal features of ``|r|``.
        per_token: the embedder returns one embedding per token or
            modulation slot (``[B, L, D]`` or ``[B * L, D]``) instead of one
            per row; see :class:`PerTokenTimeEmbeddingInjection`.

    Raises:
        ValueError: if ``embedder_path`` does not name a submodule, ``root``
            is already injected, or ``module_name`` is taken.
    """
    embedder = _free_embedder(root, embedder_path, (module_name,))
    embedding = _like(
        TwinTimeEmbedding(embedding_dim, target_time=target_time, sign=sign, frequency_dim=frequency_dim), embedder
    )
    injection_class = PerTokenTimeEmbeddingInjection if per_token else TimeEmbeddingInjection
    return _register(root, embedder_path, {module_name: (embedding, twin_delta)}, injection_class=injection_class)


def _free_embedder(root: nn.Module, embedder_path: str, module_names: tuple[str, ...]) -> nn.Module:
    """The embedder at ``embedder_path``, after checking nothing is injected and the names are free."""
    try:
        embedder = root.get_submodule(embedder_path)
    except AttributeError as error:
        raise ValueError(
            f"embedder_path {embedder_path!r} is not a submodule of {type(root).__name__}"
        ) from error
    if getattr(root, INJECTION_ATTRIBUTE, None) is not None:
        raise ValueError(f"{type(root).__name__} already carries a TwinFlow time embedding; un-adapt it first")
    for name in module_names:
        if hasattr(root, name):
            raise ValueError(f"module_name {name!r} is already an attribute of {type(root).__name__}")
    return embedder


def _like(module: nn.Module, embedder: nn.Module) -> nn.Module:
    """``module`` on the device and dtype of ``embedder``'s parameters."""
    reference = next(embedder.parameters(), None)
    if reference is None:
        return module
    return module.to(device=reference.device, dtype=reference.dtype)


def _register(
    root: nn.Module,
    embedder_path: str,
    modules: Mapping[str, tuple[nn.Module, TimeDelta]],
    *,
    injection_class: type[TimeEmbeddingInjection] = TimeEmbeddingInjection,
) -> TimeEmbeddingInjection:
    """Register ``modules`` on ``root`` and hook its embedder with an ``injection_class`` adding their terms."""
    for name, (module, _) in modules.items():
        root.add_module(name, module)
    injection = injection_class(root, embedder_path, {name: delta for name, (_, delta) in modules.items()})
    object.__setattr__(root, INJECTION_ATTRIBUTE, injection)
    return injection


# --- the authors' released time embeddings ---------------------------------------------------


def qwen_image_release_delta(
    second: nn.Module, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"], embedding: Float[Tensor, "batch dim"]
) -> Float[Tensor, "batch dim"]:
    r"""TwinFlow-Qwen-Image-v1.0: :math:`(t - r)\, E_2(r)`, added to :math:`E_1(t)`.

    ``second`` is ``time_text_embed_2``, a ``QwenTimestepProjEmbeddings``
    (sinusoids of ``1000 r``, then an MLP). Both times are signed and in
    ``[-1, 1]`` (the release's ``timestep`` is the twinloss time itself; the
    stock embedder ``E_1`` receives signed ``t`` through a signed
    :class:`~twinloss_adapters.conventions.TimeConvention`). ``embedding``
    only gives the dtype, as ``hidden_states`` does in the release: the times
    are cast to it before the difference is taken.
    """
    t, r = t.to(embedding.dtype), r.to(embedding.dtype)
    return second(r, embedding) * (t - r)[:, None]


def _release_time(u: Tensor) -> Tensor:
    r"""Z-Image time of a signed twinloss time: :math:`\operatorname{sign}(u)(1 - |u|)`, in float64.

    Note ``sign(0) = 0``: the release maps ``u = 0`` to 0 (Z-Image's *noise*
    end), not to 1.
    """
    u = u.to(torch.float64)
    return u.sign() * (1.0 - u.abs())


def z_image_release_delta(
    second: nn.Module,
    t: Float[Tensor, " batch"],
    r: Float[Tensor, " batch"],
    embedding: Float[Tensor, "batch dim"],
    *,
    t_scale: float,
) -> Float[Tensor, "batch dim"]:
    r"""TwinFlow-Z-Image-Turbo-exp: :math:`|\tau_t - \tau_r|\, E_2(s\,\tau_r - s\,\tau_t)`.

    With :math:`\tau_u = \operatorname{sign}(u)(1 - |u|)` (:func:`_release_time`)
    and ``s = t_scale`` (1000), computed in float64 as the release does;
    ``second`` is ``t_embedder_2`` (a copy of Z-Image's ``TimestepEmbedder``).
    The stock embedder receives :math:`s |\tau_t| = s (1 - |t|)`, the stock
    convention. For ``r`` of the sign of ``t`` and ``r != 0`` this is
    :math:`(|t| - |r|)\, E_2(s (t - r))`; at ``r = t`` it vanishes, so the
    release alone does not see the sign of ``t`` there; at ``r = 0`` exactly
    :math:`\tau_r = 0` (see :func:`_release_time`). The hook adds the result in
    the embedding's dtype; the release adds in float64 and casts afterwards
    (a last-bit difference).
    """
    release_t, release_r = _release_time(t), _release_time(r)
    return second(release_r * t_scale - release_t * t_scale) * (release_t - release_r).abs()[:, None]


@dataclass(frozen=True)
class ReleasedTimeEmbedding:
    """The time-embedding layout of one of the authors' released checkpoints.

    Args:
        embedder_path: the stock embedder: hooked, and copied as the second embedder.
        second_name: attribute of the copy on the transformer, i.e. the key
            prefix of its weights in the released checkpoint.
        delta: how the copy adds to the stock embedding (a :data:`TimeDelta`).
        sees_sign: whether the release distinguishes ``t`` from ``-t`` at ``r = t``.
    """

    embedder_path: str
    second_name: str
    delta: TimeDelta
    sees_sign: bool


def qwen_image_release() -> ReleasedTimeEmbedding:
    """TwinFlow-Qwen-Image-v1.0: ``time_text_embed_2``, see :func:`qwen_image_release_delta`."""
    return ReleasedTimeEmbedding("time_text_embed", QWEN_IMAGE_RELEASE_NAME, qwen_image_release_delta, sees_sign=True)


def z_image_release(t_scale: float) -> ReleasedTimeEmbedding:
    """TwinFlow-Z-Image-Turbo-exp: ``t_embedder_2``, see :func:`z_image_release_delta`."""
    delta = functools.partial(z_image_release_delta, t_scale=float(t_scale))
    return ReleasedTimeEmbedding("t_embedder", Z_IMAGE_RELEASE_NAME, delta, sees_sign=False)


def inject_released_time_embedding(
    root: nn.Module, release: ReleasedTimeEmbedding, embedding_dim: int, *, sign: bool = True
) -> TimeEmbeddingInjection:
    """Reproduce a released time embedding on the stock transformer ``root``.

    Registers a copy of ``root.<release.embedder_path>`` (trainable, hooks not
    copied) as ``root.<release.second_name>``, the release's initialisation
    and key names, and hooks the stock embedder to add ``release.delta``.
    When the release does not see the sign of ``t`` and ``sign`` is True, a
    sign-only :class:`TwinTimeEmbedding` (zero at creation, so the release's
    outputs are unchanged) is registered as well, under ``DEFAULT_MODULE_NAME``.

    Raises:
        ValueError: as :func:`inject_time_embedding`.
    """
    add_sign = sign and not release.sees_sign
    names = (release.second_name, DEFAULT_MODULE_NAME) if add_sign else (release.second_name,)
    embedder = _free_embedder(root, release.embedder_path, names)
    second = copy.deepcopy(embedder)
    for module in second.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    second.requires_grad_(True)
    modules: dict[str, tuple[nn.Module, TimeDelta]] = {release.second_name: (second, release.delta)}
    if add_sign:
        sign_embedding = TwinTimeEmbedding(embedding_dim, target_time=False, sign=True)
        modules[DEFAULT_MODULE_NAME] = (_like(sign_embedding, embedder), twin_delta)
    return _register(root, release.embedder_path, modules)


def find_injection(root: nn.Module) -> TimeEmbeddingInjection | None:
    """The live injection on ``root``, if any."""
    return getattr(root, INJECTION_ATTRIBUTE, None)


class PerTokenTimeEmbeddingInjection(TimeEmbeddingInjection):
    r"""An injection for embedders that return one embedding per token.

    Some backbones modulate per token or per modulation slot: Chroma's
    approximator maps ``[B, L, .]`` (one row per modulation slot) to
    ``[B, L, D]``; AnyFlow and other per-frame-timestep models embed a
    ``[B, F]`` timestep as ``[B * F, D]`` (batch-major). Every token of batch
    row ``b`` receives the same row of ``Delta e(t, r)``:

    .. math::
        e_{b, l} \leftarrow e_{b, l} + \Delta e(t_b, r_b).

    It lays the output out as one row per token, repeats each row's times and
    lets the ``[B, D]`` injection add its terms, so the per-token case adds
    exactly what the per-row one does (the twin MLP then runs once per token:
    a few GFLOP for Chroma's 344 slots, nothing next to the transformer).
    Created by :func:`inject_time_embedding` with ``per_token=True``.

    A backbone fed one timestep per token (Wan 2.2 TI2V) may also give one
    time pair per token: times of ``B * L`` entries (batch-major) for an
    output ``[B, L, D]`` add :math:`\Delta e(t_{b,l}, r_{b,l})` to token ``(b, l)``.
    """

    description = "per-token injection"
    embedding_layout = "[B, L, D] or [B * L, D]"

    def _add_terms(self, output: Tensor, t: Float[Tensor, " batch"], r: Float[Tensor, " batch"]) -> Tensor:
        batch_size = t.shape[0]
        if output.ndim == 3 and output.shape[0] * output.shape[1] == batch_size:
            tokens = 1  # the times are per token already
        elif output.ndim == 3 and output.shape[0] == batch_size:
            tokens = output.shape[1]
        elif output.ndim == 2 and output.shape[0] > 0 and output.shape[0] % batch_size == 0:
            tokens = output.shape[0] // batch_size
        else:
            raise ValueError(
                f"{self.embedder_path} returned shape {tuple(output.shape)}; expected [{batch_size}, L, D] "
                f"or [{batch_size} * L, D] (embeddings grouped by batch row)"
            )
        # One row per token, batch-major, each with its row's times: the [B, D] injection does the rest.
        flat = output.reshape(batch_size * tokens, output.shape[-1])
        return super()._add_terms(flat, t.repeat_interleave(tokens), r.repeat_interleave(tokens)).reshape(output.shape)

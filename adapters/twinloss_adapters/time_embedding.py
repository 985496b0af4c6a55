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
"""

import contextlib
import math
from collections.abc import Iterator

import torch
from jaxtyping import Float
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "TimeEmbeddingInjection",
    "TwinTimeEmbedding",
    "find_injection",
    "inject_time_embedding",
    "sinusoidal_features",
]

DEFAULT_MODULE_NAME = "twinflow_time_embedding"
INJECTION_ATTRIBUTE = "_twinflow_time_injection"


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

    Created by :func:`inject_time_embedding`; kept by the adapter. Not a module:
    its only weights are the :class:`TwinTimeEmbedding` registered on the root
    module, so they save, load, move and train with it.
    """

    def __init__(self, root: nn.Module, embedder_path: str, module_name: str) -> None:
        self.root = root
        self.embedder_path = embedder_path
        self.module_name = module_name
        self._times: tuple[Tensor, Tensor] | None = None
        self._hook: RemovableHandle | None = root.get_submodule(embedder_path).register_forward_hook(
            self._add_twin_embedding
        )

    @property
    def embedding(self) -> nn.Module:
        """The registered :class:`TwinTimeEmbedding` (or peft's wrapper around it).

        Looked up on every call, so a peft ``ModulesToSaveWrapper`` that
        replaced it routes to the active adapter's copy.
        """
        return self.root.get_submodule(self.module_name)

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
        if self._times is None:
            return output  # called outside an adapter call: the stock model, untouched
        if not isinstance(output, Tensor):
            raise ValueError(
                f"{self.embedder_path} returned {type(output).__name__}; the injection needs a module "
                "that returns the time embedding as one tensor [B, D] (hook the inner embedder)"
            )
        t, r = self._times
        if output.ndim != 2 or output.shape[0] != t.shape[0]:
            raise ValueError(
                f"{self.embedder_path} returned shape {tuple(output.shape)}; expected "
                f"[{t.shape[0]}, D] (one embedding per batch row)"
            )
        return output + self.embedding(t, r).to(output.dtype)

    def remove(self) -> None:
        """Detach the hook and delete the registered embedding from the root."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if hasattr(self.root, self.module_name):
            delattr(self.root, self.module_name)
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

    Raises:
        ValueError: if ``embedder_path`` does not name a submodule, ``root``
            is already injected, or ``module_name`` is taken.
    """
    try:
        embedder = root.get_submodule(embedder_path)
    except AttributeError as error:
        raise ValueError(
            f"embedder_path {embedder_path!r} is not a submodule of {type(root).__name__}"
        ) from error
    if getattr(root, INJECTION_ATTRIBUTE, None) is not None:
        raise ValueError(f"{type(root).__name__} already carries a TwinFlow time embedding; un-adapt it first")
    if hasattr(root, module_name):
        raise ValueError(f"module_name {module_name!r} is already an attribute of {type(root).__name__}")
    reference = next(embedder.parameters(), None)
    embedding = TwinTimeEmbedding(
        embedding_dim, target_time=target_time, sign=sign, frequency_dim=frequency_dim
    )
    if reference is not None:
        embedding = embedding.to(device=reference.device, dtype=reference.dtype)
    root.add_module(module_name, embedding)
    injection = TimeEmbeddingInjection(root, embedder_path, module_name)
    object.__setattr__(root, INJECTION_ATTRIBUTE, injection)
    return injection


def find_injection(root: nn.Module) -> TimeEmbeddingInjection | None:
    """The live injection on ``root``, if any."""
    return getattr(root, INJECTION_ATTRIBUTE, None)

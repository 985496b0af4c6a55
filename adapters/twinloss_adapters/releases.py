"""Load the authors' released TwinFlow checkpoints into the stock diffusers classes.

A release checkpoint is a stock transformer checkpoint plus the weights of a
second time embedder under the release's key names (``time_text_embed_2.*``
for TwinFlow-Qwen-Image-v1.0, ``t_embedder_2.*`` for
TwinFlow-Z-Image-Turbo-exp). The stock class alone would drop those keys with
a warning. :func:`load_release` loads the stock part with the stock
``from_pretrained``, adapts the model with the release's time embedding and
loads the extra keys by name, raising on anything it cannot place.
"""

import os
from collections.abc import Callable, Iterable

from torch import nn

from twinloss_adapters.base import (
    RELEASE_TIME_EMBEDDING,
    TWINFLOW_TIME_EMBEDDING,
    AdaptedTransformer,
    check_time_embedding_kind,
)

__all__ = ["adapter_from_pretrained", "from_pretrained", "load_release", "pipeline_from_pretrained"]


def from_pretrained(
    adapter_class: type[AdaptedTransformer],
    stock_class: type,
    second_name: str,
    pretrained_model_name_or_path: str,
    *,
    subfolder: str | None,
    time_embedding: str,
    **kwargs: object,
) -> AdaptedTransformer:
    """A backbone's ``from_pretrained`` when it has a release.

    Three kinds of checkpoint load through it:

    - one saved by twinloss (it has ``twinloss_config.json``): the strict
      :meth:`AdaptedTransformer.from_pretrained`, whatever the time embedding;
    - the authors' release (``time_embedding="twinflow_release"``, no twinloss
      config): :func:`load_release`, by key name;
    - a stock checkpoint with the default kind: the strict adapter load, after
      refusing a checkpoint that carries the release's second embedder (the
      default kind would drop it).

    Args:
        adapter_class: the backbone's adapter class (takes ``time_embedding=``).
        stock_class: the stock diffusers transformer class.
        second_name: the release's second-embedder key prefix, refused by the default kind.
        time_embedding: ``"twinflow"`` or ``"twinflow_release"``.

    Raises:
        ValueError: for an unknown ``time_embedding``, a default-kind load of a
            release checkpoint, and as :func:`load_release` /
            :func:`twinloss_adapters.persistence.load_adapted`.
    """
    from twinloss_adapters import persistence

    check_time_embedding_kind(time_embedding)
    options, stock_arguments = persistence.split_load_arguments(adapter_class, kwargs)
    hub = persistence.hub_arguments(stock_arguments)
    saved_by_twinloss = persistence.read_twinloss_config(pretrained_model_name_or_path, subfolder, hub) is not None
    if time_embedding == RELEASE_TIME_EMBEDDING and not saved_by_twinloss:
        return load_release(
            stock_class,
            lambda transformer: adapter_class(transformer, time_embedding=time_embedding, **options),
            pretrained_model_name_or_path, subfolder=subfolder, **stock_arguments,
        )
    if time_embedding != RELEASE_TIME_EMBEDDING:
        files = persistence.weight_files(pretrained_model_name_or_path, subfolder, stock_arguments.get("variant"), hub)
        stray = sorted(persistence.read_tensors(files, (f"{second_name}.",)))
        if stray:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path!r} carries the TwinFlow release's time embedding "
                f"{stray}, which the default time embedding would drop; load it with time_embedding='twinflow_release'"
            )
    return persistence.load_adapted(
        adapter_class, pretrained_model_name_or_path, subfolder=subfolder, time_embedding=time_embedding, **kwargs
    )


def pipeline_from_pretrained(
    adapter_class: type[AdaptedTransformer], stock_class: Callable[[], type], second_name: str, release: str
) -> Callable[..., AdaptedTransformer]:
    """A release backbone module's ``from_pretrained``: :func:`from_pretrained` with ``subfolder="transformer"``.

    Args:
        adapter_class: the backbone's adapter class (takes ``time_embedding=``).
        stock_class: returns the stock diffusers class (called at load time: diffusers is optional).
        second_name: the release's second-embedder key prefix (``time_text_embed_2``, ...).
        release: the release's name, for the docstring.
    """

    def load(
        pretrained_model_name_or_path: str,
        *,
        subfolder: str | None = "transformer",
        time_embedding: str = TWINFLOW_TIME_EMBEDDING,
        **kwargs: object,
    ) -> AdaptedTransformer:
        return from_pretrained(
            adapter_class, stock_class(), second_name, pretrained_model_name_or_path,
            subfolder=subfolder, time_embedding=time_embedding, **kwargs,
        )

    load.__doc__ = f"""Load the transformer of a pipeline repository (or ``subfolder``) and adapt it as ``{adapter_class.__name__}``.

    With ``time_embedding="twinflow_release"`` the checkpoint is loaded as
    {release}: the stock weights into the stock class, the ``{second_name}.*``
    weights into the released second embedder (see
    :func:`twinloss_adapters.releases.load_release`, which raises on missing,
    mis-shaped or unused keys). The default kind refuses a checkpoint that
    carries the release's second embedder instead of dropping it. A checkpoint
    saved by twinloss loads strictly with its saved options (``docs/saving.md``).
    """
    load.__name__ = load.__qualname__ = "from_pretrained"
    load.__module__ = adapter_class.__module__
    return load


def adapter_from_pretrained(stock_class: Callable[[], type], second_name: str) -> classmethod:
    """The class-level ``from_pretrained`` of a backbone adapter with a release: :func:`from_pretrained`, ``subfolder=None``.

    So ``AdapterClass.from_pretrained(release_dir)`` refuses the authors'
    checkpoint instead of dropping its second embedder, and loads it with
    ``time_embedding="twinflow_release"``, as the backbone module's function does.

    Args:
        stock_class: returns the stock diffusers class (called at load time: diffusers is optional).
        second_name: the release's second-embedder key prefix (``time_text_embed_2``, ...).
    """

    def from_pretrained_method(
        cls: type[AdaptedTransformer],
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        subfolder: str | None = None,
        time_embedding: str = TWINFLOW_TIME_EMBEDDING,
        **kwargs: object,
    ) -> AdaptedTransformer:
        return from_pretrained(
            cls, stock_class(), second_name, os.fspath(pretrained_model_name_or_path),
            subfolder=subfolder, time_embedding=time_embedding, **kwargs,
        )

    from_pretrained_method.__doc__ = f"""Load a stock, twinloss or released checkpoint and adapt it; see :func:`twinloss_adapters.releases.from_pretrained`.

    A checkpoint carrying the release's ``{second_name}.*`` keys loads with
    ``time_embedding="twinflow_release"`` only; the default kind raises
    naming them instead of dropping them.
    """
    from_pretrained_method.__name__ = from_pretrained_method.__qualname__ = "from_pretrained"
    return classmethod(from_pretrained_method)


def load_release(
    stock_class: type,
    adapt: Callable[[nn.Module], AdaptedTransformer],
    pretrained_model_name_or_path: str,
    *,
    subfolder: str | None = "transformer",
    **kwargs: object,
) -> AdaptedTransformer:
    """Load a released checkpoint: stock weights into ``stock_class``, then the adapter's extras by key name.

    The adapted model's first injected module (the release's second embedder)
    must be complete in the checkpoint; any further injected module (the
    optional sign embedding, absent from the authors' files but written when a
    model adapted this way is saved) is loaded when present, all or nothing.

    Args:
        stock_class: the stock diffusers transformer class.
        adapt: turns the loaded stock transformer into the adapted model with
            the release's time embedding.
        pretrained_model_name_or_path, subfolder, kwargs: as for the stock
            ``from_pretrained``.

    Raises:
        ValueError: naming the keys, if the checkpoint lacks stock keys or
            the second embedder's keys, has them with the wrong shape, has a
            partial optional module, or has keys nothing would load; naming
            the arguments in ``kwargs`` that the stock loader would not honour.
    """
    from twinloss_adapters import persistence

    persistence.check_stock_arguments(kwargs, [], "load_release")
    with persistence.holding_back_unused_weights_warning():  # the release keys, loaded or named below
        transformer, info = stock_class.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, output_loading_info=True, **kwargs
        )
    adapted = adapt(transformer)
    expected = {key.removeprefix("transformer."): value for key, value in adapted.extra_state_dict().items()}
    persistence.check_stock_load(pretrained_model_name_or_path, stock_class, info, placed=set(expected))
    present = set(info["unexpected_keys"])
    required, *optional = adapted.injection.module_names
    missing = sorted(key for key in expected if _under(key, (required,)) and key not in present)
    for name in optional:
        module_keys = {key for key in expected if _under(key, (name,))}
        if module_keys & present and module_keys - present:
            missing += sorted(module_keys - present)
    if missing:
        raise ValueError(f"checkpoint {pretrained_model_name_or_path!r} lacks the release keys {missing}")
    hub = persistence.hub_arguments(kwargs)
    files = persistence.weight_files(pretrained_model_name_or_path, subfolder, kwargs.get("variant"), hub)
    loaded = {key: value for key, value in persistence.read_tensors(files, tuple(present)).items() if key in present}
    mis_shaped = persistence.mis_shaped_keys(expected, loaded)
    if mis_shaped:
        raise ValueError(f"checkpoint {pretrained_model_name_or_path!r} has mis-shaped release keys {mis_shaped}")
    adapted.load_state_dict(
        {f"transformer.{key}": value.to(expected[key].dtype) for key, value in loaded.items()}, strict=False
    )
    return adapted


def _under(key: str, module_names: Iterable[str]) -> bool:
    return any(key.startswith(f"{name}.") for name in module_names)

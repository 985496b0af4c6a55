"""Load the authors' released TwinFlow checkpoints into the stock diffusers classes.

A release checkpoint is a stock transformer checkpoint plus the weights of a
second time embedder under the release's key names (``time_text_embed_2.*``
for TwinFlow-Qwen-Image-v1.0, ``t_embedder_2.*`` for
TwinFlow-Z-Image-Turbo-exp). The stock class alone would drop those keys with
a warning. :func:`load_release` loads the stock part with the stock
``from_pretrained``, adapts the model with the release's time embedding and
loads the extra keys by name, raising on anything it cannot place.
"""

from collections.abc import Callable, Iterable

from torch import nn

from twinloss_adapters.base import (
    RELEASE_TIME_EMBEDDING,
    TWINFLOW_TIME_EMBEDDING,
    AdaptedTransformer,
    check_time_embedding_kind,
)

__all__ = ["from_pretrained", "load_release", "pipeline_from_pretrained"]



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
    hub = persistence.hub_arguments(kwargs)
    saved_by_twinloss = persistence.read_twinloss_config(pretrained_model_name_or_path, subfolder, hub) is not None
    if time_embedding == RELEASE_TIME_EMBEDDING and not saved_by_twinloss:
        return load_release(
            stock_class, lambda transformer: adapter_class(transformer, time_embedding=time_embedding),
            pretrained_model_name_or_path, subfolder=subfolder, **kwargs,
        )
    if time_embedding != RELEASE_TIME_EMBEDDING:
        files = persistence.weight_files(pretrained_model_name_or_path, subfolder, kwargs.get("variant"), hub)
        stray = sorted(persistence.read_tensors(files, (f"{second_name}.",)))
        if stray:
            raise ValueError(
                f"checkpoint {pretrained_model_name_or_path!r} carries the TwinFlow release's time embedding "
                f"{stray}, which the default time embedding would drop; load it with time_embedding='twinflow_release'"
            )
    return adapter_class.from_pretrained(
        pretrained_model_name_or_path, subfolder=subfolder, time_embedding=time_embedding, **kwargs
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
            partial optional module, or has keys nothing would load.
    """
    transformer, info = stock_class.from_pretrained(
        pretrained_model_name_or_path, subfolder=subfolder, output_loading_info=True, **kwargs
    )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"checkpoint {pretrained_model_name_or_path!r} does not fit {stock_class.__name__}: "
            f"missing {sorted(info['missing_keys'])}, mis-shaped {info['mismatched_keys']}"
        )
    adapted = adapt(transformer)
    expected = {key.removeprefix("transformer."): value for key, value in adapted.extra_state_dict().items()}
    present = set(info["unexpected_keys"])
    unplaced = sorted(present - set(expected))
    if unplaced:
        raise ValueError(
            f"checkpoint {pretrained_model_name_or_path!r} has keys {unplaced} that neither {stock_class.__name__} "
            f"nor the {adapted.time_embedding_kind!r} time embedding has; they would be lost"
        )
    required, *optional = adapted.injection.module_names
    missing = sorted(key for key in expected if _under(key, (required,)) and key not in present)
    for name in optional:
        module_keys = {key for key in expected if _under(key, (name,))}
        if module_keys & present and module_keys - present:
            missing += sorted(module_keys - present)
    if missing:
        raise ValueError(f"checkpoint {pretrained_model_name_or_path!r} lacks the release keys {missing}")
    from twinloss_adapters import persistence

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

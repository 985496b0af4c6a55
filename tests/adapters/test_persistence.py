"""Saving and reloading adapted models, full and LoRA, loses nothing TwinFlow learned (docs/saving.md)."""

import contextlib
import importlib
import importlib.util
import json
import re
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("diffusers")

from adapter_backbones import CASES, BackboneCase, module_arguments  # noqa: E402
from hub_cache import cache_repository  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from twinloss_adapters.persistence import (  # noqa: E402
    EXTRAS_WEIGHTS_NAME,
    TWINLOSS_CONFIG_NAME,
    split_construction_arguments,
)
from twinloss_adapters.time_embedding import DEFAULT_MODULE_NAME  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
BATCH = 3
# One row each: a jump on the real trajectory (r < t), the twin trajectory (t < 0), and r = t.
T = torch.tensor([0.9, -0.6, 0.5])
R = torch.tensor([0.2, -0.3, 0.5])
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft")


def _inputs(case: BackboneCase, transformer: torch.nn.Module):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *case.latent_shape, generator=generator)
    return x, case.make_cond(transformer, BATCH, generator)


def _trained(case: BackboneCase, seed: int = 0, before_adapt: Callable[[torch.nn.Module], object] | None = None):
    """A tiny adapted model whose adapter weights (twin modules, connector) are moved off their initial values.

    ``before_adapt`` is called on the stock transformer first (e.g. diffusers' ``add_adapter``).
    """
    torch.manual_seed(seed)
    transformer = case.build()
    if before_adapt is not None:
        before_adapt(transformer)
    adapted = case.adapt(transformer)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in _extra_parameters(adapted):
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return adapted


def _extra_parameters(adapted: torch.nn.Module) -> list[torch.nn.Parameter]:
    prefixes = adapted.extra_prefixes()
    return [parameter for name, parameter in adapted.named_parameters() if name.startswith(prefixes)]


def _outputs(model, case: BackboneCase) -> torch.Tensor:
    x, cond = _inputs(case, model.transformer if hasattr(model, "transformer") else model)
    with torch.no_grad():
        return model(x, T, R, **cond)


def _twin_state(adapted) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapted.extra_state_dict().items()}


# --- full fine-tune ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_and_reload_is_bit_identical_at_jumps_on_both_trajectories_and_at_r_equal_t(name: str, tmp_path) -> None:
    case = CASES[name]
    adapted = _trained(case)
    expected = _outputs(adapted, case)
    adapted.save_pretrained(tmp_path)
    assert (tmp_path / TWINLOSS_CONFIG_NAME).is_file()

    reloaded = type(adapted).from_pretrained(tmp_path, **module_arguments(name))
    assert type(reloaded) is type(adapted)
    assert torch.equal(_outputs(reloaded, case), expected)
    saved, loaded = _twin_state(adapted), _twin_state(reloaded)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    # The twin weights matter: the same base with untrained twin modules differs at t < 0 and r < t.
    torch.manual_seed(0)
    untrained = _outputs(case.adapt(case.build()), case)
    assert (untrained[:2] - expected[:2]).abs().amax() > 1e-3


@pytest.mark.parametrize("name", ["sana", "wan"])
def test_module_from_pretrained_reads_a_pipeline_layout_and_keeps_the_twin_weights(name: str, tmp_path) -> None:
    case = CASES[name]
    adapted = _trained(case)
    adapted.save_pretrained(tmp_path / "transformer")
    module = importlib.import_module(f"twinloss_adapters.{name}")
    assert torch.equal(_outputs(module.from_pretrained(str(tmp_path)), case), _outputs(adapted, case))


def test_transformer_saved_without_twinloss_config_still_loads_its_twin_weights(tmp_path) -> None:
    case = CASES["sana"]
    adapted = _trained(case)
    type(adapted.transformer).save_pretrained(adapted.transformer, tmp_path)  # the stock class's save
    assert not (tmp_path / TWINLOSS_CONFIG_NAME).exists()
    reloaded = type(adapted).from_pretrained(tmp_path)
    assert torch.equal(_outputs(reloaded, case), _outputs(adapted, case))


@pytest.mark.parametrize("name", ["sana", "hunyuan_video"])
def test_stock_checkpoint_loads_with_silent_twin_modules(name: str, tmp_path) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    transformer = case.build()
    transformer.save_pretrained(tmp_path)
    reloaded = type(case.adapt(case.build())).from_pretrained(tmp_path)
    twin = _twin_state(reloaded)
    zero_init = [k for k in twin if k.endswith(("negative_time_embedding", "target_time_mlp.2.weight", "target_time_mlp.2.bias"))]
    assert len(zero_init) == 3 and all(not twin[k].any() for k in zero_init)
    # At zero init the twin modules add nothing: every row is the stock velocity at |t|, whatever r and the sign.
    x, cond = _inputs(case, transformer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x, T, R, **cond), case.stock_call(transformer, x, T.abs(), cond))


def test_the_stock_class_alone_drops_the_twin_weights(tmp_path) -> None:
    from diffusers import SanaTransformer2DModel

    _trained(CASES["sana"]).save_pretrained(tmp_path)
    assert any(key.startswith(DEFAULT_MODULE_NAME) for key in load_file(tmp_path / WEIGHTS))
    stock = SanaTransformer2DModel.from_pretrained(tmp_path)
    assert not any(key.startswith(DEFAULT_MODULE_NAME) for key in stock.state_dict())


def _rewrite_weights(directory, edit) -> None:
    state = load_file(directory / WEIGHTS)
    edit(state)
    save_file(state, directory / WEIGHTS)


def _drop_twin(state: dict) -> None:
    for key in [k for k in state if k.startswith(DEFAULT_MODULE_NAME)]:
        del state[key]


def _drop_one(state: dict) -> None:
    del state[f"{DEFAULT_MODULE_NAME}.negative_time_embedding"]


def _misshape(state: dict) -> None:
    state[f"{DEFAULT_MODULE_NAME}.target_time_mlp.2.bias"] = torch.zeros(7)


def _add_stray(state: dict) -> None:
    state["my_extra_head.weight"] = torch.ones(3)


def _drop_stock(state: dict) -> None:
    del state["transformer_blocks.0.attn1.to_q.weight"]


@pytest.mark.parametrize(
    ("edit", "keep_config", "message"),
    [
        (_drop_twin, True, r"missing \[.*negative_time_embedding.*target_time_mlp"),
        (_drop_one, True, r"missing \['twinflow_time_embedding.negative_time_embedding'\]"),
        (_drop_one, False, r"missing \['twinflow_time_embedding.negative_time_embedding'\]"),
        (_misshape, True, r"wrong shape \['twinflow_time_embedding.target_time_mlp.2.bias \(saved \(7,\), model \(32,\)\)'\]"),
        (_add_stray, True, r"keys \['my_extra_head.weight'\] that nothing would load"),
        (_add_stray, False, r"keys \['my_extra_head.weight'\] that nothing would load"),
        (_drop_stock, True, r"lacks stock weights \['transformer_blocks.0.attn1.to_q.weight'\]"),
    ],
    ids=["config-but-no-twin-keys", "partial", "partial-without-config", "wrong-shape", "key-nothing-loads",
         "key-nothing-loads-without-config", "stock-weight-missing"],
)
def test_checkpoints_missing_mis_shaped_or_unloadable_weights_raise_naming_the_keys(edit, keep_config, message, tmp_path) -> None:
    adapted = _trained(CASES["sana"])
    adapted.save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, edit)
    if not keep_config:
        (tmp_path / TWINLOSS_CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match=message):
        type(adapted).from_pretrained(tmp_path)


def test_twin_weights_without_config_refuse_an_adapter_built_without_twin_modules(tmp_path) -> None:
    adapted = _trained(CASES["sana"])
    type(adapted.transformer).save_pretrained(adapted.transformer, tmp_path)  # the stock class's save: no config
    with pytest.raises(ValueError, match=r"unexpected \['twinflow_time_embedding.negative_time_embedding', 'twinflow_time_embedding.target_time_mlp.0.bias'"):
        type(adapted).from_pretrained(tmp_path, target_time=False, sign=False)


def test_loading_the_twin_keys_logs_no_unused_weights_warning(tmp_path) -> None:
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("diffusers.models.modeling_utils")
    adapted = _trained(CASES["sana"])
    adapted.save_pretrained(tmp_path)
    logger.addHandler(handler)
    try:
        type(adapted).from_pretrained(tmp_path)
    finally:
        logger.removeHandler(handler)
    assert not [message for message in records if "were not used" in message]


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"target_tme": False, "sing": False}, "['sing', 'target_tme']"),
        ({"output_loading_info": True}, "['output_loading_info']"),
        ({"num_layers": 2}, "['num_layers']"),  # a config override: the saved config is the model
    ],
    ids=["misspelled-options", "unhonoured-stock-argument", "config-override"],
)
def test_from_pretrained_arguments_it_cannot_honour_raise_naming_them(arguments, named, tmp_path) -> None:
    from twinloss_adapters import sana

    adapted = _trained(CASES["sana"])
    adapted.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"got arguments {named} that it cannot honour")):
        sana.SanaAdapter.from_pretrained(tmp_path, **arguments)
    with pytest.raises(ValueError, match=re.escape(f"got arguments {named} that it cannot honour")):
        sana.from_pretrained(str(tmp_path), subfolder=None, **arguments)


@needs_peft
def test_save_refuses_diffusers_lora_layers_and_their_fused_model_round_trips(tmp_path) -> None:
    from peft import LoraConfig

    case = CASES["sana"]
    lora_config = LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False)
    adapted = _trained(case, before_adapt=lambda transformer: transformer.add_adapter(lora_config))
    expected = _outputs(adapted, case)
    with pytest.raises(ValueError, match=r"LoRA layers \['transformer_blocks.0.attn1.to_q'.*fuse_lora"):
        adapted.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    adapted.transformer.fuse_lora()
    adapted.transformer.unload_lora()
    adapted.save_pretrained(tmp_path / "fused")
    reloaded = type(adapted).from_pretrained(tmp_path / "fused")
    torch.testing.assert_close(_outputs(reloaded, case), expected, rtol=1e-5, atol=1e-5)


@needs_peft
def test_a_checkpoint_with_diffusers_lora_layer_keys_raises_at_load_naming_them_and_how_to_save(tmp_path) -> None:
    from peft import LoraConfig

    lora_config = LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False)
    adapted = _trained(CASES["sana"], before_adapt=lambda transformer: transformer.add_adapter(lora_config))
    type(adapted.transformer).save_pretrained(adapted.transformer, tmp_path)  # the stock class's save writes them
    with pytest.raises(ValueError) as raised:
        type(adapted).from_pretrained(tmp_path)
    message = str(raised.value)
    assert "lacks stock weights ['transformer_blocks.0.attn1.to_q.weight'" in message
    assert "'transformer_blocks.0.attn1.to_q.lora_A.default.weight'" in message
    assert "transformer.fuse_lora(); transformer.unload_lora()" in message


def test_the_adapted_transformers_own_save_as_a_pipeline_calls_it_keeps_options_that_change_no_weights(tmp_path) -> None:
    import inspect

    from twinloss_adapters import ltx_video

    torch.manual_seed(0)
    adapted = ltx_video.adapt(CASES["ltx_video"].build(), frame_rate=24.0)
    save = adapted.transformer.save_pretrained  # what pipe.save_pretrained calls, with the keywords it names
    assert {"safe_serialization", "variant", "max_shard_size"} <= set(inspect.signature(save).parameters)
    save(tmp_path, safe_serialization=True, variant="ema", max_shard_size="10GB")
    assert json.loads((tmp_path / TWINLOSS_CONFIG_NAME).read_text())["options"]["frame_rate"] == 24.0
    reloaded = ltx_video.LTXVideoAdapter.from_pretrained(tmp_path, variant="ema")
    assert reloaded.frame_rate == 24.0
    assert reloaded.rope_interpolation_scale == adapted.rope_interpolation_scale
    stock = ltx_video.unadapt(adapted)
    assert "save_pretrained" not in vars(stock)  # unadapted, the transformer saves as the stock class again


def test_saved_options_are_restored_and_a_contradicting_option_or_class_raises(tmp_path) -> None:
    from twinloss_adapters import ltx_video, sana

    torch.manual_seed(0)
    adapted = ltx_video.adapt(CASES["ltx_video"].build(), sign=False, frame_rate=24.0, vae_temporal_compression=4)
    adapted.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / TWINLOSS_CONFIG_NAME).read_text())
    assert saved["adapter"] == "twinloss_adapters.ltx_video.LTXVideoAdapter"
    assert saved["options"]["frame_rate"] == 24.0 and saved["options"]["sign"] is False

    reloaded = ltx_video.LTXVideoAdapter.from_pretrained(tmp_path, frame_rate=24.0)  # agreeing is fine
    assert reloaded.construction_arguments == adapted.construction_arguments
    assert reloaded.rope_interpolation_scale == adapted.rope_interpolation_scale
    assert not reloaded.capabilities.sign
    with pytest.raises(ValueError, match="sign=True contradicts the checkpoint, saved with sign=False"):
        ltx_video.LTXVideoAdapter.from_pretrained(tmp_path, sign=True)
    with pytest.raises(ValueError, match="saved from twinloss_adapters.ltx_video.LTXVideoAdapter"):
        sana.SanaAdapter.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="push_to_hub"):
        adapted.save_pretrained(tmp_path / "other", push_to_hub=True)


def test_openuni_needs_its_connector_and_projector_and_loads_their_weights_strictly(tmp_path) -> None:
    from twinloss_adapters import openuni

    adapted = _trained(CASES["openuni"])
    adapted.save_pretrained(tmp_path)
    outside_transformer = {k for k in adapted.extra_state_dict() if not k.startswith("transformer.")}
    assert {"meta_queries", "projector.weight"} <= outside_transformer
    assert set(load_file(tmp_path / EXTRAS_WEIGHTS_NAME)) == outside_transformer
    with pytest.raises(ValueError, match=r"takes modules \['connector', 'projector'\]"):
        openuni.OpenUniAdapter.from_pretrained(tmp_path)
    modules = module_arguments("openuni")
    hidden = modules["connector"].layers[0].self_attn.q_proj.in_features
    wider = openuni.OpenUniConnector(hidden, 2 * hidden + 8, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match=r"twinloss_extras.safetensors do not match.*connector\.layers\.0\.mlp\.fc1\.weight"):
        openuni.OpenUniAdapter.from_pretrained(tmp_path, connector=wider, projector=modules["projector"])


def test_sharded_checkpoint_loaded_in_bfloat16_keeps_the_twin_weights(tmp_path) -> None:
    case = CASES["sana"]
    adapted = _trained(case)
    adapted.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    reloaded = type(adapted).from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    saved, loaded = _twin_state(adapted), _twin_state(reloaded)
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert loaded[key].dtype == torch.bfloat16 and torch.equal(loaded[key], saved[key].to(torch.bfloat16)), key


def test_pickled_weights_and_a_variant_keep_the_twin_weights(tmp_path) -> None:
    case = CASES["sana"]
    adapted = _trained(case)
    adapted.save_pretrained(tmp_path, safe_serialization=False, variant="ema")
    assert (tmp_path / "diffusion_pytorch_model.ema.bin").is_file()
    reloaded = type(adapted).from_pretrained(tmp_path, variant="ema")
    assert torch.equal(_outputs(reloaded, case), _outputs(adapted, case))


# --- LoRA ---------------------------------------------------------------------------------------------


def _lora_trained(case: BackboneCase, stock_dir):
    """A LoRA model (and its LoRA-EMA teacher) whose LoRA and twin weights moved, over a saved stock base."""
    from peft import LoraConfig

    from twinloss_adapters import lora

    torch.manual_seed(0)
    transformer = case.build()
    transformer.save_pretrained(stock_dir)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian")
    model = lora.add_lora(case.adapt(transformer), config)
    teacher = lora.LoRAEMATeacher(target_decay=0.9)
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        teacher.update(model)
    return model, teacher


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """Every parameter frozen inside, as a reloaded model's are, and restored after: on some CPUs a LoRA layer
    whose weights require grad rounds differently from a frozen one with the same weights, even under no_grad."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _fresh_base(case: BackboneCase, name: str, stock_dir):
    """The stock base adapted with the training options (load_lora's contract), e.g. HunyuanVideo 1.5's vision_tokens."""
    from diffusers import AutoModel

    if name == "openuni":
        return case.adapt(AutoModel.from_pretrained(str(stock_dir)))
    return _base_with_options(case, stock_dir)


def _base_with_options(case: BackboneCase, stock_dir, **changed: object):
    """The stock base adapted with the training options, ``changed`` replaced."""
    trained_like = case.adapt(case.build())
    options, _ = split_construction_arguments(trained_like.construction_arguments)
    return type(trained_like).from_pretrained(stock_dir, **{**options, **changed})


@needs_peft
@pytest.mark.parametrize("name", sorted(CASES))
def test_lora_and_its_ema_reload_onto_a_fresh_stock_base_exactly(name: str, tmp_path) -> None:
    from twinloss_adapters import lora

    case = CASES[name]
    model, teacher = _lora_trained(case, tmp_path / "stock")
    x, cond = _inputs(case, model.get_base_model().transformer)
    with _frozen(model):
        expected = _outputs(model, case)
        expected_ema = teacher(model, x, T, R, cond)
    model.save_pretrained(tmp_path / "lora")  # peft's own saving: the trained adapter, the EMA in twinflow_ema/

    reloaded = lora.load_lora(_fresh_base(case, name, tmp_path / "stock"), tmp_path / "lora")
    assert torch.equal(_outputs(reloaded, case), expected)
    assert not any(p.requires_grad for p in reloaded.parameters())
    ema = lora.load_lora(_fresh_base(case, name, tmp_path / "stock"), tmp_path / "lora" / "twinflow_ema")
    assert torch.equal(_outputs(ema, case), expected_ema)


@needs_peft
def test_a_stock_base_and_a_lora_with_its_ema_on_the_hub_load_by_repository_id_exactly_and_bad_hub_arguments_are_named(tmp_path) -> None:
    """The Hub path (repository ids, the EMA in a subfolder), served from a cache the test writes, offline."""
    from twinloss_adapters import lora

    case = CASES["sana"]
    model, teacher = _lora_trained(case, tmp_path / "stock")
    x, cond = _inputs(case, model.get_base_model().transformer)
    with _frozen(model):
        expected = _outputs(model, case)
        expected_ema = teacher(model, x, T, R, cond)
    model.save_pretrained(tmp_path / "lora")
    hub = cache_repository(tmp_path / "hub", "twinloss-test/tiny-sana", tmp_path / "stock")
    assert cache_repository(tmp_path / "hub", "twinloss-test/tiny-sana-lora", tmp_path / "lora") == hub

    options, _ = split_construction_arguments(case.adapt(case.build()).construction_arguments)

    def base():
        return type(model.get_base_model()).from_pretrained("twinloss-test/tiny-sana", **options, **hub)

    reloaded = lora.load_lora(base(), "twinloss-test/tiny-sana-lora", **hub)
    assert torch.equal(_outputs(reloaded, case), expected)
    ema = lora.load_lora(base(), "twinloss-test/tiny-sana-lora", subfolder="twinflow_ema", **hub)
    assert torch.equal(_outputs(ema, case), expected_ema)
    with pytest.raises(ValueError, match="revison"):  # a misspelled Hub argument is named, not passed on
        lora.load_lora(base(), "twinloss-test/tiny-sana-lora", revison="main", **hub)
    with pytest.raises(ValueError, match="adapter_config.json"):
        lora.load_lora(base(), "twinloss-test/tiny-sana", **hub)  # the stock base's repository holds no adapter


# An option of each backbone whose other value gives other outputs: the base adapted with it must be refused.
LORA_MISMATCHES = {"sana": {"sign": False}, "hunyuan_video15": {"vision_tokens": 2, "target_time": False}}


@needs_peft
@pytest.mark.parametrize("name", sorted(LORA_MISMATCHES))
def test_load_lora_names_each_adapter_option_that_differs_from_the_saved_one(name: str, tmp_path) -> None:
    from twinloss_adapters import lora

    case = CASES[name]
    model, _ = _lora_trained(case, tmp_path / "stock")
    model.save_pretrained(tmp_path / "lora")
    changed = LORA_MISMATCHES[name]
    saved = split_construction_arguments(model.get_base_model().construction_arguments)[0]
    for folder in (tmp_path / "lora", tmp_path / "lora" / "twinflow_ema"):
        recorded = json.loads((folder / TWINLOSS_CONFIG_NAME).read_text())
        assert recorded["options"] == saved
        with pytest.raises(ValueError) as raised:
            lora.load_lora(_base_with_options(case, tmp_path / "stock", **changed), folder)
        for option, value in changed.items():
            assert f"{option} (saved {saved[option]!r}, base {value!r})" in str(raised.value)
        assert "adapter class" not in str(raised.value)


@needs_peft
def test_load_lora_names_the_adapter_class_when_the_base_is_another_backbone(tmp_path) -> None:
    from twinloss_adapters import lora

    model, _ = _lora_trained(CASES["sana"], tmp_path / "stock")
    model.save_pretrained(tmp_path / "lora")
    recorded = json.loads((tmp_path / "lora" / TWINLOSS_CONFIG_NAME).read_text())
    recorded["adapter"] = "twinloss_adapters.sana.SomeOtherAdapter"
    (tmp_path / "lora" / TWINLOSS_CONFIG_NAME).write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match=r"adapter class \(saved twinloss_adapters\.sana\.SomeOtherAdapter, base twinloss_adapters\.sana\.SanaAdapter\)"):
        lora.load_lora(_fresh_base(CASES["sana"], "sana", tmp_path / "stock"), tmp_path / "lora")


@needs_peft
@pytest.mark.parametrize("name", sorted(LORA_MISMATCHES))
def test_lora_saved_without_the_twinloss_file_still_loads_exactly(name: str, tmp_path) -> None:
    from twinloss_adapters import lora

    case = CASES[name]
    model, _ = _lora_trained(case, tmp_path / "stock")
    with _frozen(model):
        expected = _outputs(model, case)
    model.save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / TWINLOSS_CONFIG_NAME).unlink()  # as a LoRA folder saved before twinloss wrote the file
    reloaded = lora.load_lora(_fresh_base(case, name, tmp_path / "stock"), tmp_path / "lora")
    assert torch.equal(_outputs(reloaded, case), expected)


@needs_peft
def test_load_lora_refuses_an_adapter_without_twin_modules_or_with_missing_weights_leaving_the_base_unchanged(tmp_path) -> None:
    import peft

    from twinloss_adapters import lora

    case = CASES["sana"]
    model, _ = _lora_trained(case, tmp_path / "stock")
    model.save_pretrained(tmp_path / "lora")
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if "lora_A" in k)
    del state[dropped]
    save_file(state, weights)
    base = _fresh_base(case, "sana", tmp_path / "stock")
    modules, flags = [type(m) for m in base.modules()], [(n, p.requires_grad) for n, p in base.named_parameters()]
    with pytest.raises(ValueError, match=rf"missing \['{dropped}'\]"):
        lora.load_lora(base, tmp_path / "lora")
    # refused before the base is touched: no LoRA layer injected, no parameter frozen
    assert [type(m) for m in base.modules()] == modules
    assert [(n, p.requires_grad) for n, p in base.named_parameters()] == flags

    plain = peft.get_peft_model(_fresh_base(case, "sana", tmp_path / "stock"), peft.LoraConfig(r=2, target_modules=["to_q"]))
    plain.save_pretrained(tmp_path / "plain")  # twin modules not in modules_to_save: their weights are not saved
    with pytest.raises(ValueError, match=r"does not save modules \['twinflow_time_embedding'\]"):
        lora.load_lora(_fresh_base(case, "sana", tmp_path / "stock"), tmp_path / "plain")


@needs_peft
@pytest.mark.parametrize("name", ["sana", "wan"])
def test_merged_export_fuses_the_lora_and_loads_with_one_call(name: str, tmp_path) -> None:
    from twinloss_adapters import lora

    case = CASES[name]
    model, teacher = _lora_trained(case, tmp_path / "stock")
    expected = _outputs(model, case)
    lora.save_merged(model, tmp_path / "merged")
    assert torch.equal(_outputs(model, case), expected)  # the caller's LoRA model is untouched
    assert model.active_adapter == "default"

    lora.save_merged(model, tmp_path / "merged_ema", adapter_name=teacher.ema_adapter)
    x, cond = _inputs(case, model.get_base_model().transformer)
    merged_ema = type(model.get_base_model()).from_pretrained(tmp_path / "merged_ema")
    torch.testing.assert_close(_outputs(merged_ema, case), teacher(model, x, T, R, cond), rtol=1e-5, atol=1e-5)

    merged = type(model.get_base_model()).from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_outputs(merged, case), expected, rtol=1e-5, atol=1e-5)
    # Independently: each targeted weight is W + (alpha / r) B A, and the twin weights are the trained copies.
    trained = dict(model.named_parameters())
    merged_state = merged.state_dict()
    for key, value in merged_state.items():
        if key.endswith("to_q.weight"):
            prefix = "base_model.model." + key[: -len("weight")]
            delta = trained[prefix + "lora_B.default.weight"] @ trained[prefix + "lora_A.default.weight"]
            torch.testing.assert_close(value, trained[prefix + "base_layer.weight"] + delta, rtol=0, atol=1e-6)
    for key, value in merged.extra_state_dict().items():
        module_path, _, leaf = key.rpartition(f"{DEFAULT_MODULE_NAME}.")
        assert torch.equal(value, trained[f"base_model.model.{module_path}{DEFAULT_MODULE_NAME}.modules_to_save.default.{leaf}"])


# --- resuming a LoRA run ----------------------------------------------------------------------------------


@needs_peft
def test_lora_run_with_ema_teacher_resumes_with_the_uninterrupted_losses(tmp_path) -> None:
    from peft import LoraConfig

    import twinloss
    from twinloss.checkpoint import load_training_state, save_training_state
    from twinloss_adapters import lora

    case = CASES["sana"]

    def setup(seed: int):
        torch.manual_seed(0)
        config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights="gaussian")
        model = lora.add_lora(case.adapt(case.build()), config)
        torch.manual_seed(seed)  # the LoRA draws above are equal; what follows differs between runs
        teacher = lora.LoRAEMATeacher(target_decay=0.9)
        teacher.attach(model)  # a resumed run attaches before loading
        loss_fn = twinloss.TwinFlowLoss(teacher=teacher, guidance_scale=0.0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        generators = {"data": torch.Generator().manual_seed(seed), "loss": torch.Generator().manual_seed(seed + 1)}
        return model, loss_fn, optimizer, generators

    def train(count: int, model, loss_fn, optimizer, generators) -> list[float]:
        losses = []
        for _ in range(count):
            x = torch.randn(4, *case.latent_shape, generator=generators["data"])
            cond = case.make_cond(None, 4, generators["data"])
            out = loss_fn(model, x, cond=cond, generator=generators["loss"])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            loss_fn.teacher.update(model)
            losses.append(out.loss.item())
        return losses

    uninterrupted = train(3, *setup(seed=1))
    model, loss_fn, optimizer, generators = setup(seed=1)
    first = train(2, model, loss_fn, optimizer, generators)
    save_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn, generators=generators)
    model, loss_fn, optimizer, generators = setup(seed=5)
    load_training_state(tmp_path / "state.pt", model=model, optimizer=optimizer, loss_fn=loss_fn, generators=generators)
    assert loss_fn.teacher.num_updates == 2
    assert first + train(1, model, loss_fn, optimizer, generators) == uninterrupted

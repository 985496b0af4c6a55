"""Backbone variants: guidance inputs, OpenUni's connector, Wan image-to-video, loading."""

import pytest
import torch

from adapter_backbones import CASES, TEXT_LEN, build_sana, module_arguments
from twinloss_adapters import flux, qwen_image, sana, wan


def test_guidance_is_rejected_where_the_backbone_has_none() -> None:
    model = sana.adapt(build_sana())
    assert model.capabilities.guidance_inputs == ()
    x, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, TEXT_LEN, 24), torch.full((2,), 0.5)
    with pytest.raises(ValueError, match="without guidance embeddings"):
        model(x, t, t, encoder_hidden_states=text, guidance=torch.ones(2))

    from diffusers import FluxTransformer2DModel

    schnell_like = flux.adapt(
        FluxTransformer2DModel(
            in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=24, pooled_projection_dim=12, axes_dims_rope=(4, 6, 6),
        )
    )
    cond = {"encoder_hidden_states": text, "pooled_projections": torch.randn(2, 12)}
    assert schnell_like(torch.randn(2, 4, 8, 8), t, t, **cond).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="guidance"):
        schnell_like(torch.randn(2, 4, 8, 8), t, t, **cond, guidance=torch.ones(2))


def test_wan_image_to_video_concatenates_the_latent_condition() -> None:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=6, out_channels=4,
        text_dim=24, freq_dim=32, ffn_dim=32, num_layers=1, image_dim=8, added_kv_proj_dim=24,
        rope_max_seq_len=32,
    )
    x, condition = torch.randn(2, 4, 2, 4, 4), torch.randn(2, 2, 2, 4, 4)
    cond = {
        "encoder_hidden_states": torch.randn(2, TEXT_LEN, 24),
        "encoder_hidden_states_image": torch.randn(2, 3, 8),
        "latent_condition": condition,
    }
    t = torch.tensor([0.7, 0.2])
    with torch.no_grad():
        stock = transformer(
            torch.cat([x, condition], dim=1), 1000 * t, cond["encoder_hidden_states"],
            cond["encoder_hidden_states_image"], return_dict=False,
        )[0]
    model = wan.adapt(transformer)
    assert model.required_cond == ("encoder_hidden_states", "encoder_hidden_states_image", "latent_condition")
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, t, **cond), stock, rtol=0, atol=0)
    with pytest.raises(ValueError, match="latent_condition"):
        model(x, t, t, **{**cond, "latent_condition": condition[:, :1]})
    with pytest.raises(ValueError, match="spans"):
        model(x, t, t, **{**cond, "latent_condition": condition[:, :, :1]})


def test_qwen_image_layered_variants_are_rejected() -> None:
    from diffusers import QwenImageTransformer2DModel

    layered = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), use_additional_t_cond=True,
    )
    with pytest.raises(ValueError, match="use_additional_t_cond"):
        qwen_image.adapt(layered)


@pytest.mark.parametrize("name", sorted(name for name, case in CASES.items() if case.stock_call is not None))
def test_from_pretrained_loads_and_adapts(name: str, tmp_path) -> None:
    case = CASES[name]
    torch.manual_seed(0)
    transformer = case.build()
    transformer.save_pretrained(tmp_path / "transformer")
    module = __import__(f"twinloss_adapters.{case.module_name}", fromlist=["from_pretrained"])
    model = module.from_pretrained(str(tmp_path), **module_arguments(name))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *case.latent_shape, generator=generator)
    cond = case.make_cond(transformer, 2, generator)
    t = torch.tensor([0.9, 0.3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, t, **cond), case.stock_call(transformer, x, t, cond))


def test_bfloat16_model_matches_stock_and_keeps_the_twin_module_in_its_dtype() -> None:
    torch.manual_seed(0)
    transformer = build_sana().to(torch.bfloat16)
    x, text = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), torch.randn(2, TEXT_LEN, 24, dtype=torch.bfloat16)
    t = torch.tensor([0.83, 0.41])
    with torch.no_grad():
        stock = transformer(x, text, 1000 * t, return_dict=False)[0]
    model = sana.adapt(transformer)
    assert all(p.dtype == torch.bfloat16 for p in transformer.twinflow_time_embedding.parameters())
    with torch.no_grad():
        out = model(x, t, t, encoder_hidden_states=text)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, stock, rtol=0, atol=0)


def test_deepcopy_and_the_core_ema_teacher_see_the_twin_parameters() -> None:
    import copy

    import twinloss

    case = CASES["sana"]
    torch.manual_seed(0)
    transformer = case.build()
    model = case.adapt(transformer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *case.latent_shape, generator=generator)
    cond = case.make_cond(transformer, 3, generator)
    t, r = torch.tensor([0.9, -0.5, 1.0]), torch.tensor([0.1, -0.2, 0.0])
    with torch.no_grad():
        for parameter in transformer.twinflow_time_embedding.parameters():
            parameter.normal_()
        before = model(x, t, r, **cond)
    teacher = twinloss.EMATeacher()
    teacher.update(model)
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in transformer.twinflow_time_embedding.parameters():
            parameter.zero_()
        moved = model(x, t, r, **cond)
        assert (moved - before).abs().max() > 1e-4
        # The copy owns its own twin module and hook; the EMA evaluates its averaged twin weights.
        torch.testing.assert_close(duplicate(x, t, r, **cond), before)
    torch.testing.assert_close(teacher(model, x, t, r, cond), before)


def test_unadapt_rejects_what_was_never_adapted() -> None:
    with pytest.raises(ValueError, match="returned by adapt"):
        sana.unadapt(build_sana())
    model = sana.adapt(build_sana())
    assert sana.unadapt(model.transformer) is model.transformer  # the transformer itself works too


def test_frame_counts_must_fit_the_temporal_patch() -> None:
    from diffusers import LTXVideoTransformer3DModel, WanTransformer3DModel

    from twinloss_adapters import ltx_video

    torch.manual_seed(0)
    wan_model = wan.adapt(
        WanTransformer3DModel(
            patch_size=(2, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=24, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32,
        )
    )
    ltx_model = ltx_video.adapt(
        LTXVideoTransformer3DModel(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=2, num_attention_heads=2,
            attention_head_dim=12, cross_attention_dim=24, num_layers=1, caption_channels=24,
        )
    )
    text = torch.randn(2, TEXT_LEN, 24)
    t = torch.full((2,), 0.5)
    for model, channels in ((wan_model, 4), (ltx_model, 4)):
        with pytest.raises(ValueError, match="3 latent frames; expected a multiple of"):
            model(torch.randn(2, channels, 3, 4, 4), t, t, encoder_hidden_states=text)
        assert model(torch.randn(2, channels, 4, 4, 4), t, t, encoder_hidden_states=text).shape == (2, channels, 4, 4, 4)


def test_hunyuan_video_rejects_image_to_video_variants_and_defaults_the_text_mask() -> None:
    from diffusers import HunyuanVideoTransformer3DModel

    from twinloss_adapters import hunyuan_video

    small = dict(
        num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1, num_refiner_layers=1,
        patch_size=1, patch_size_t=1, text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(2, 4, 4),
    )
    for variant, channels in (("latent_concat", 9), ("token_replace", 4)):
        image_to_video = HunyuanVideoTransformer3DModel(
            in_channels=channels, out_channels=4, image_condition_type=variant, **small
        )
        with pytest.raises(ValueError, match=f"image_condition_type='{variant}'"):
            hunyuan_video.adapt(image_to_video)

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, guidance_embeds=False, **small)
    model = hunyuan_video.adapt(transformer)
    assert model.capabilities.guidance_inputs == ()
    x, text, pooled = torch.randn(2, 4, 2, 4, 4), torch.randn(2, TEXT_LEN, 24), torch.randn(2, 12)
    t = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        stock = transformer(
            hidden_states=x, timestep=1000 * t, encoder_hidden_states=text,
            encoder_attention_mask=torch.ones(2, TEXT_LEN), pooled_projections=pooled, return_dict=False,
        )[0]
        torch.testing.assert_close(model(x, t, t, encoder_hidden_states=text, pooled_projections=pooled), stock)
    with pytest.raises(ValueError, match="without guidance embeddings"):
        model(x, t, t, encoder_hidden_states=text, pooled_projections=pooled, guidance=torch.full((2,), 6.0))

"""What the standard set does not cover for the new backbones (Lumina2, HiDream, FLUX.2, Chroma, ...).

The per-token time injection, and each backbone's extra inputs, layouts and
variants. (``from_pretrained`` of a saved tiny checkpoint is parametrised over
every backbone in ``test_variants.py``.)
"""

import pytest
import torch
from adapter_backbones import (
    CASES,
    HUNYUAN_VIDEO15_VISION_TOKENS,
    TEXT_LEN,
    anyflow_stock,
    build_anyflow,
    build_flux2,
    train_steps,
    build_hidream,
    build_hunyuan_video15,
    build_lumina2,
    hunyuan_video15_stock,
)
from torch import nn
from twinloss_adapters.time_embedding import (
    DEFAULT_MODULE_NAME,
    PerTokenTimeEmbeddingInjection,
    inject_time_embedding,
)

DIM = 8


class PerSlotBackbone(nn.Module):
    """Chroma's shape: per-slot features [B, L, F] -> embedding [B, L, D] -> per-slot modulation."""

    def __init__(self) -> None:
        super().__init__()
        self.in_proj = nn.Linear(3, DIM)
        self.out_proj = nn.Linear(DIM, DIM)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_proj(nn.functional.silu(self.in_proj(features)))


def _perturbed_injection(root: nn.Module, path: str) -> nn.Module:
    injection = inject_time_embedding(root, path, DIM, per_token=True)
    assert isinstance(injection, PerTokenTimeEmbeddingInjection)
    twin = root.get_submodule(DEFAULT_MODULE_NAME)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.normal_()
    return twin


def test_per_token_injection_adds_the_row_embedding_to_every_slot() -> None:
    torch.manual_seed(0)
    backbone = PerSlotBackbone()
    twin = _perturbed_injection(backbone, "in_proj")
    features = torch.randn(2, 5, 3)
    t, r = torch.tensor([0.8, -0.4]), torch.tensor([0.2, -0.4])
    delta = twin(t, r)  # [B, D], checked in closed form in test_time_embedding.py
    expected = backbone.out_proj(nn.functional.silu(backbone.in_proj(features) + delta[:, None, :]))
    with backbone._twinflow_time_injection.times(t, r):
        torch.testing.assert_close(backbone(features), expected)
    # Outside the adapter's context the stock module is untouched.
    torch.testing.assert_close(backbone(features), backbone.out_proj(nn.functional.silu(backbone.in_proj(features))))


def test_per_token_injection_expands_batch_major_flattened_rows() -> None:
    torch.manual_seed(0)
    root = nn.Module()
    root.embedder = nn.Linear(3, DIM)
    twin = _perturbed_injection(root, "embedder")
    frames = 4
    features = torch.randn(2 * frames, 3)  # AnyFlow-style [B * F, .] per-frame timesteps, batch-major
    t, r = torch.tensor([0.8, -0.4]), torch.tensor([0.2, -0.1])
    delta = twin(t, r)
    expected = root.embedder(features) + torch.stack([delta[0]] * frames + [delta[1]] * frames)
    with root._twinflow_time_injection.times(t, r):
        torch.testing.assert_close(root.embedder(features), expected)
        with pytest.raises(ValueError, match=r"expected \[2, L, D\] or \[2 \* L, D\]"):
            root.embedder(torch.randn(3, 3))


def test_per_token_injection_rejects_a_tuple_output() -> None:
    root = nn.Module()
    root.embedder = nn.Linear(3, DIM)
    injection = inject_time_embedding(root, "embedder", DIM, per_token=True)
    root.embedder.register_forward_hook(lambda module, args, output: (output, output), prepend=True)
    with pytest.raises(ValueError, match="per-token injection needs"), injection.times(torch.ones(2), torch.ones(2)):
        root.embedder(torch.randn(2, 3))


def test_per_token_injection_sign_gradient_sums_over_the_twin_rows_slots() -> None:
    torch.manual_seed(0)
    backbone = PerSlotBackbone()
    inject_time_embedding(backbone, "in_proj", DIM, per_token=True)
    twin = backbone.get_submodule(DEFAULT_MODULE_NAME)
    features = torch.randn(2, 5, 3)
    t, r = torch.tensor([0.8, -0.4]), torch.tensor([0.2, -0.4])
    with backbone._twinflow_time_injection.times(t, r):
        backbone(features).sum().backward()
    # Independent derivation: the gradient at the embedding e[b, l], then d e[b, l] / d s = 1[t_b < 0].
    embedding = (backbone.in_proj(features) + twin(t, r)[:, None, :]).detach().requires_grad_()
    backbone.out_proj(nn.functional.silu(embedding)).sum().backward()
    torch.testing.assert_close(twin.negative_time_embedding.grad, embedding.grad[1].sum(dim=0))
    assert twin.target_time_mlp[-1].weight.grad.abs().sum() > 0
    torch.testing.assert_close(twin.target_time_mlp[0].weight.grad, torch.zeros(DIM, twin.frequency_dim))


def test_lumina2_default_mask_is_all_ones_and_float_masks_are_read_as_bool() -> None:
    from twinloss_adapters import lumina2

    torch.manual_seed(0)
    model = lumina2.adapt(build_lumina2())
    x, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, TEXT_LEN, 24), torch.tensor([0.7, 0.2])
    with torch.no_grad():
        default = model(x, t, t, encoder_hidden_states=text)
        ones = model(x, t, t, encoder_hidden_states=text, encoder_attention_mask=torch.ones(2, TEXT_LEN, dtype=torch.long))
        padded_long = torch.ones(2, TEXT_LEN, dtype=torch.long)
        padded_long[0, -2:] = 0
        padded = model(x, t, t, encoder_hidden_states=text, encoder_attention_mask=padded_long)
        padded_float = model(x, t, t, encoder_hidden_states=text, encoder_attention_mask=padded_long.float())
    torch.testing.assert_close(default, ones, rtol=0, atol=0)
    torch.testing.assert_close(padded_float, padded, rtol=0, atol=0)
    assert (padded[0] - ones[0]).abs().max() > 1e-4


def test_hidream_training_layout_is_laid_out_as_the_image() -> None:
    """In training mode the stock class returns [B, C, tokens, p * p]; the adapter returns the eval-mode image."""
    from twinloss_adapters import hidream

    torch.manual_seed(0)
    transformer = build_hidream()  # top-1 routing: the training and inference MoE paths agree exactly
    model = hidream.adapt(transformer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = CASES["hidream"].make_cond(transformer, 2, generator)
    t = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        raw_training = transformer(
            hidden_states=x, timesteps=1000 * t, encoder_hidden_states_t5=cond["encoder_hidden_states_t5"],
            encoder_hidden_states_llama3=cond["encoder_hidden_states_llama3"].movedim(1, 0),
            pooled_embeds=cond["pooled_embeds"], return_dict=False,
        )[0]
        training = model(x, t, t, **cond)
        transformer.eval()
        inference = model(x, t, t, **cond)
    assert raw_training.shape == (2, 4, 16, 4)
    torch.testing.assert_close(training, inference, rtol=0, atol=0)
    torch.testing.assert_close(inference, CASES["hidream"].stock_call(transformer, x, t, cond), rtol=0, atol=0)


def test_hidream_needs_the_llama_layers_its_config_reads() -> None:
    from twinloss_adapters import hidream

    torch.manual_seed(0)
    transformer = build_hidream()
    model = hidream.adapt(transformer)
    cond = CASES["hidream"].make_cond(transformer, 2, torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5)
    too_few = {**cond, "encoder_hidden_states_llama3": cond["encoder_hidden_states_llama3"][:, :2]}
    with pytest.raises(ValueError, match=r"encoder_hidden_states_llama3.*N >= 3"):
        model(torch.zeros(2, 4, 8, 8), t, t, **too_few)


def test_flux2_image_latents_match_the_pipeline_edit_call() -> None:
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from twinloss_adapters import flux2

    torch.manual_seed(0)
    transformer = build_flux2()
    model = flux2.adapt(transformer)
    generator = torch.Generator().manual_seed(0)
    x, reference = torch.randn(2, 8, 4, 4, generator=generator), torch.randn(2, 2, 8, 2, 4, generator=generator)
    cond = CASES["flux2"].make_cond(transformer, 2, generator)
    t = torch.tensor([0.9, 0.4])
    # Flux2Pipeline with two reference images: packed reference tokens after the target's, T = 10 and 20.
    latent_ids = Flux2Pipeline._prepare_latent_ids(x)
    reference_tokens, reference_ids = [], []
    for row in range(2):
        images = [reference[row : row + 1, index] for index in range(2)]
        reference_ids.append(Flux2Pipeline._prepare_image_ids(images)[0])
        reference_tokens.append(torch.cat([Flux2Pipeline._pack_latents(image)[0] for image in images]))
    with torch.no_grad():
        tokens = transformer(
            hidden_states=torch.cat([Flux2Pipeline._pack_latents(x), torch.stack(reference_tokens)], dim=1),
            timestep=t, guidance=cond["guidance"], encoder_hidden_states=cond["encoder_hidden_states"],
            txt_ids=Flux2Pipeline._prepare_text_ids(cond["encoder_hidden_states"]),
            img_ids=torch.cat([latent_ids, torch.stack(reference_ids)], dim=1), return_dict=False,
        )[0]
        expected = Flux2Pipeline._unpack_latents_with_ids(tokens[:, : latent_ids.shape[1]], latent_ids)
        edited = model(x, t, t, **cond, image_latents=reference)
        one_reference = model(x, t, t, **cond, image_latents=reference[:, 0])
        plain = model(x, t, t, **cond)
    torch.testing.assert_close(edited, expected, rtol=0, atol=0)
    assert (edited - one_reference).abs().max() > 1e-4 and (one_reference - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"image_latents.*\[B, 8, H, W\]"):
        model(x, t, t, **cond, image_latents=torch.zeros(2, 4, 2, 2))


def test_flux2_klein_without_guidance_embeddings_rejects_guidance() -> None:
    from diffusers import Flux2Transformer2DModel
    from twinloss_adapters import flux2

    torch.manual_seed(0)
    klein = Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    model = flux2.adapt(klein)
    assert model.capabilities.guidance_inputs == ()
    x, text, t = torch.randn(2, 8, 4, 4), torch.randn(2, TEXT_LEN, 24), torch.full((2,), 0.5)
    assert model(x, t, t, encoder_hidden_states=text).shape == x.shape
    with pytest.raises(ValueError, match="without guidance embeddings"):
        model(x, t, t, encoder_hidden_states=text, guidance=torch.full((2,), 4.0))


def test_anyflow_passes_r_to_its_own_target_timestep_and_adds_only_the_sign() -> None:
    from twinloss_adapters import anyflow

    torch.manual_seed(0)
    transformer = build_anyflow()
    model = anyflow.adapt(transformer)
    twin = transformer.get_submodule(DEFAULT_MODULE_NAME)
    assert twin.target_time_mlp is None and model.capabilities.target_time
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 2, 4, 4, generator=generator)
    cond = CASES["anyflow"].make_cond(transformer, 3, generator)
    t, r = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.0, 0.25, 0.3])
    with torch.no_grad():
        # AnyFlowPipeline's mean-velocity call (use_mean_velocity): r_timestep = 1000 r for every frame.
        torch.testing.assert_close(model(x, t, r, **cond), anyflow_stock(transformer, x, t, cond, r), rtol=0, atol=0)
        twin.negative_time_embedding.normal_()
        on_twin = model(x, -t, -r, **cond)
    assert ((on_twin - anyflow_stock(transformer, x, t, cond, r)).flatten(1).abs().amax(dim=1) > 1e-4).all()


def test_ace_step_twinflow_lora_fine_tune_trains_only_lora_and_the_sign() -> None:
    """TwinFlow on a real audio DiT: LoRA + sign embedding train, the base stays, the base teacher is the stock flow map."""
    from peft import LoraConfig
    from twinloss_adapters import lora

    import twinloss

    case = CASES["ace_step"]
    torch.manual_seed(0)
    transformer = case.build()
    model = lora.add_lora(case.adapt(transformer), LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, *case.latent_shape, generator=generator)
    cond = case.make_cond(transformer, 4, generator)
    uncond = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    t, r = torch.tensor([0.9, 0.7, 0.5, 0.2]), torch.tensor([0.1, 0.7, 0.0, 0.2])
    with torch.no_grad():  # the pretrained flow map at (t, r), read before any training
        stock_jump = case.stock_call(transformer, x, t, cond, r)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("negative_time_embedding" in n for n in trained) and any("lora_B" in n for n in trained)
    loss_fn = twinloss.TwinFlowLoss(guidance_teacher=lora.BaseModelTeacher(), guidance_scale=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = train_steps(loss_fn, model, x, cond, uncond, optimizer)
    assert all(torch.isfinite(torch.tensor(losses))) and len(set(losses)) == 3, losses
    parameters = dict(model.named_parameters())
    for name, value in frozen.items():
        torch.testing.assert_close(parameters[name], value, rtol=0, atol=0)
    for key in ("negative_time_embedding", "lora_B"):
        assert any((parameters[n] - v).abs().max() > 0 for n, v in trained.items() if key in n), key
    teacher = lora.BaseModelTeacher()(model, x, t, r, cond)
    torch.testing.assert_close(teacher, stock_jump, rtol=0, atol=0)


def test_hunyuan_video15_image_to_video_inputs_reach_the_stock_call() -> None:
    """The image-to-video pipeline's inputs: first-frame latent + mask in the condition channels, SigLIP tokens."""
    from twinloss_adapters import hunyuan_video15

    torch.manual_seed(0)
    transformer = build_hunyuan_video15()
    model = hunyuan_video15.adapt(transformer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 4, 4, generator=generator)
    cond = CASES["hunyuan_video15"].make_cond(transformer, 2, generator)
    image_latent, image_embeds = torch.randn(2, 4, 1, 4, 4, generator=generator), torch.randn(2, 7, 12, generator=generator)
    condition = torch.cat([image_latent, torch.zeros(2, 4, 1, 4, 4)], dim=2)  # HunyuanVideo15ImageToVideoPipeline
    mask = torch.zeros(2, 1, 2, 4, 4)
    mask[:, :, 0] = 1.0
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        expected = transformer(
            hidden_states=torch.cat([x, condition, mask], dim=1), timestep=1000 * t,
            encoder_hidden_states=cond["encoder_hidden_states"], encoder_attention_mask=cond["encoder_attention_mask"],
            encoder_hidden_states_2=cond["encoder_hidden_states_2"], encoder_attention_mask_2=torch.ones(2, 4),
            image_embeds=image_embeds, return_dict=False,
        )[0]
        actual = model(x, t, t, **cond, latent_condition=torch.cat([condition, mask], dim=1), image_embeds=image_embeds)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"latent_condition'\] must be \[B, 5, F, H, W\]"):
        model(x, t, t, **cond, latent_condition=condition)


def test_hunyuan_video15_mean_flow_variant_passes_r_to_timestep_r() -> None:
    from twinloss_adapters import hunyuan_video15

    torch.manual_seed(0)
    transformer = build_hunyuan_video15(use_meanflow=True)
    with pytest.raises(ValueError, match="use_meanflow=True"):
        hunyuan_video15.HunyuanVideo15Adapter(transformer)
    model = hunyuan_video15.adapt(transformer, vision_tokens=HUNYUAN_VIDEO15_VISION_TOKENS)
    assert isinstance(model, hunyuan_video15.HunyuanVideo15MeanFlowAdapter)
    assert transformer.get_submodule(DEFAULT_MODULE_NAME).target_time_mlp is None
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, 4, 4, generator=generator)
    cond = CASES["hunyuan_video15"].make_cond(transformer, 2, generator)
    t, r = torch.tensor([0.9, 0.4]), torch.tensor([0.3, 0.0])
    with torch.no_grad():
        expected = hunyuan_video15_stock(transformer, x, t, cond, r)
        torch.testing.assert_close(model(x, t, r, **cond), expected, rtol=0, atol=0)
        transformer.get_submodule(DEFAULT_MODULE_NAME).negative_time_embedding.normal_()
        assert ((model(x, -t, -r, **cond) - expected).flatten(1).abs().amax(dim=1) > 1e-4).all()


def test_flux_kontext_reference_image_conditions_the_target_and_is_checked() -> None:
    from adapter_backbones import build_flux
    from twinloss_adapters import flux_kontext

    torch.manual_seed(0)
    transformer = build_flux()
    model = flux_kontext.adapt(transformer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    cond = CASES["flux_kontext"].make_cond(transformer, 2, generator)
    without_image = {key: value for key, value in cond.items() if key != "image_latents"}
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        edited = model(x, t, t, **cond)
        plain = model(x, t, t, **without_image)
        # Without a reference image the Kontext call is the plain Flux pipeline call.
        torch.testing.assert_close(plain, CASES["flux"].stock_call(transformer, x, t, without_image), rtol=0, atol=0)
    assert edited.shape == x.shape and (edited - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"image_latents'\] must be \[B, 4, H', W'\] with even"):
        model(x, t, t, **{**cond, "image_latents": torch.zeros(2, 4, 3, 4)})


def test_hunyuan_video_i2v_serves_only_latent_concat_and_checks_the_condition() -> None:
    from adapter_backbones import build_hunyuan_video, build_hunyuan_video_i2v
    from diffusers import HunyuanVideoTransformer3DModel
    from twinloss_adapters import hunyuan_video_i2v

    small = {
        "num_attention_heads": 2, "attention_head_dim": 10, "num_layers": 1, "num_single_layers": 1,
        "num_refiner_layers": 1, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 24,
        "pooled_projection_dim": 12, "rope_axes_dim": (2, 4, 4),
    }
    token_replace = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, image_condition_type="token_replace", **small)
    for other, variant in ((token_replace, "'token_replace'"), (build_hunyuan_video(), "None")):
        with pytest.raises(ValueError, match=f"image_condition_type={variant}; this adapter serves 'latent_concat'"):
            hunyuan_video_i2v.adapt(other)
    torch.manual_seed(0)
    transformer = build_hunyuan_video_i2v()
    model = hunyuan_video_i2v.adapt(transformer)
    cond = CASES["hunyuan_video_i2v"].make_cond(transformer, 2, torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.5)
    with pytest.raises(ValueError, match=r"latent_condition'\] must be \[B, 5, F, H, W\]"):
        model(torch.zeros(2, 4, 2, 4, 4), t, t, **{**cond, "latent_condition": cond["latent_condition"][:, :4]})
    with pytest.raises(ValueError, match=r"latent_condition'\] spans \(1, 4, 4\) but x_t spans \(2, 4, 4\)"):
        model(torch.zeros(2, 4, 2, 4, 4), t, t, **{**cond, "latent_condition": cond["latent_condition"][:, :, :1]})


def test_ltx2_joint_tokens_follow_the_pipeline_packing_and_coordinates() -> None:
    from adapter_backbones import build_ltx2
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
    from twinloss_adapters import ltx2

    torch.manual_seed(0)
    transformer = build_ltx2()
    video, audio = torch.randn(2, 8, 2, 3, 2), torch.randn(2, 2, 5, 4)  # audio: 2 channels x 4 mel bins = 8 features
    tokens = ltx2.pack_audio_video(video, audio)
    expected = torch.cat([LTX2Pipeline._pack_latents(video), LTX2Pipeline._pack_audio_latents(audio)], dim=1)
    torch.testing.assert_close(tokens, expected, rtol=0, atol=0)
    unpacked_video, unpacked_audio = ltx2.unpack_audio_video(tokens, 2, 3, 2, mel_bins=4)
    torch.testing.assert_close(unpacked_video, video, rtol=0, atol=0)
    torch.testing.assert_close(unpacked_audio, audio, rtol=0, atol=0)
    coords = ltx2.coordinates(transformer, 2, 2, 3, 2, 5, fps=24.0)
    torch.testing.assert_close(coords["video_coords"], transformer.rope.prepare_video_coords(2, 2, 3, 2, torch.device("cpu"), fps=24.0))
    assert coords["audio_coords"].shape == (2, 1, 5, 2)


def test_ltx2_audio_stream_gets_its_own_twin_embedding_and_unadapt_removes_both() -> None:
    from adapter_backbones import LTX2_VIDEO_GRID, build_ltx2
    from twinloss_adapters import ltx2

    torch.manual_seed(0)
    transformer = build_ltx2()
    stock_keys = set(transformer.state_dict())
    model = ltx2.adapt(transformer)
    audio_twin = transformer.audio_time_embed.get_submodule(DEFAULT_MODULE_NAME)
    assert audio_twin.embedding_dim == 8  # the audio stream's width, not the video's 16
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *CASES["ltx2"].latent_shape, generator=generator)
    cond = CASES["ltx2"].make_cond(transformer, 2, generator)
    t = torch.tensor([0.8, 0.5])
    with torch.no_grad():
        before = model(x, -t, -t, **cond)
        audio_twin.negative_time_embedding.normal_()
        after = model(x, -t, -t, **cond)
    video_tokens = LTX2_VIDEO_GRID[0] * LTX2_VIDEO_GRID[1] * LTX2_VIDEO_GRID[2]
    # The audio sign embedding moves the audio tokens directly (and the video ones through cross-attention).
    assert (after[:, video_tokens:] - before[:, video_tokens:]).abs().max() > 1e-4
    assert any(key.startswith("transformer.audio_time_embed.twinflow_time_embedding.") for key in model.extra_state_dict())
    with pytest.raises(ValueError, match="x_t has 12 tokens but the coordinates describe 8 video \\+ 3 audio"):
        model(torch.zeros(2, 12, 8), t, t, **cond)
    restored = ltx2.unadapt(model)
    assert restored is transformer and set(restored.state_dict()) == stock_keys
    with pytest.raises(ValueError, match="ltx2.adapt"):
        ltx2.unadapt(transformer)


def test_ace_step_bfloat16_model_matches_the_pipeline_call() -> None:
    """AceStepPipeline passes the times in the model's dtype; a float32 time would not reach a bf16 Linear."""
    from adapter_backbones import build_ace_step
    from twinloss_adapters import ace_step

    torch.manual_seed(0)
    transformer = build_ace_step().to(torch.bfloat16)
    model = ace_step.adapt(transformer)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, *CASES["ace_step"].latent_shape, generator=generator).bfloat16()
    cond = {key: value.bfloat16() for key, value in CASES["ace_step"].make_cond(transformer, 2, generator).items()}
    t, r = torch.tensor([0.8, 0.3]), torch.tensor([0.2, 0.3])
    with torch.no_grad():
        expected = CASES["ace_step"].stock_call(transformer, x, t.bfloat16(), cond, r.bfloat16())
        actual = model(x, t, r, **cond)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


NEW_MODULES = (
    "lumina2", "hidream", "flux2", "flux_kontext", "chroma", "anyflow", "ace_step", "hunyuan_video15",
    "hunyuan_video_i2v", "ltx2",
)


def _perturbed_extras(model: nn.Module) -> nn.Module:
    """``model`` with every adapter parameter moved off its initial value (so a reload that drops one shows)."""
    generator = torch.Generator().manual_seed(1)
    prefixes = model.extra_prefixes()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(prefixes):
                parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def _jump_outputs(model: nn.Module, name: str) -> torch.Tensor:
    """Outputs at a real jump, a twin jump and r = t (the rows of test_persistence)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, *CASES[name].latent_shape, generator=generator)
    cond = CASES[name].make_cond(model.transformer, 3, generator)
    with torch.no_grad():
        return model(x, torch.tensor([0.9, -0.6, 0.5]), torch.tensor([0.2, -0.3, 0.5]), **cond)


@pytest.mark.parametrize("name", NEW_MODULES)
def test_module_from_pretrained_reloads_a_saved_adapter_with_its_twin_weights_bit_identically(name: str, tmp_path) -> None:
    """``<module>.from_pretrained`` is the strict persistence load (pipeline ``transformer/`` subfolder), not ``adapt``."""
    import importlib

    case = CASES[name]
    torch.manual_seed(0)
    adapted = _perturbed_extras(case.adapt(case.build()))
    adapted.save_pretrained(tmp_path / "transformer")
    reloaded = importlib.import_module(f"twinloss_adapters.{name}").from_pretrained(str(tmp_path))
    assert type(reloaded) is type(adapted)
    assert torch.equal(_jump_outputs(reloaded, name), _jump_outputs(adapted, name))


@pytest.mark.parametrize("use_meanflow", [False, True])
def test_hunyuan_video15_from_pretrained_picks_the_adapter_class_from_use_meanflow(use_meanflow: bool, tmp_path) -> None:
    from twinloss_adapters import hunyuan_video15

    torch.manual_seed(0)
    adapted = _perturbed_extras(
        hunyuan_video15.adapt(build_hunyuan_video15(use_meanflow=use_meanflow), vision_tokens=HUNYUAN_VIDEO15_VISION_TOKENS)
    )
    expected_class = hunyuan_video15.HunyuanVideo15MeanFlowAdapter if use_meanflow else hunyuan_video15.HunyuanVideo15Adapter
    assert type(adapted) is expected_class
    adapted.save_pretrained(tmp_path / "transformer")
    reloaded = hunyuan_video15.from_pretrained(str(tmp_path))
    assert type(reloaded) is expected_class and reloaded.vision_tokens == HUNYUAN_VIDEO15_VISION_TOKENS
    assert torch.equal(_jump_outputs(reloaded, "hunyuan_video15"), _jump_outputs(adapted, "hunyuan_video15"))


def test_per_token_time_with_a_released_embedding_raises_instead_of_being_ignored() -> None:
    """The released embeddings add one row per batch row: ``per_token_time=True`` cannot be honoured with them."""
    from twinloss_adapters.base import AdaptedTransformer
    from twinloss_adapters.conventions import TimeConvention
    from twinloss_adapters.time_embedding import ReleasedTimeEmbedding, twin_delta

    class ToyAdapter(AdaptedTransformer):
        def check_latent(self, x_t: torch.Tensor) -> None:
            pass

        def run_backbone(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
            return x_t

    root = nn.Module()
    root.emb = nn.Linear(DIM, DIM)
    release = ReleasedTimeEmbedding("emb", "emb_2", twin_delta, sees_sign=True)
    with pytest.raises(ValueError, match="per_token_time=True cannot be honoured"):
        ToyAdapter(
            root, time_convention=TimeConvention(scale=1.0), embedder_path="emb", embedding_dim=DIM,
            release=release, per_token_time=True,
        )
    assert not hasattr(root, "emb_2")
    ToyAdapter(root, time_convention=TimeConvention(scale=1.0), embedder_path="emb", embedding_dim=DIM, release=release)
    assert isinstance(root.emb_2, nn.Linear)

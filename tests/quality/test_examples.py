"""The video and audio examples: shapes, and 1-NFE TwinFlow beating 1-NFE flow matching.

Each test pretrains with flow matching and fine-tunes the same weights with TwinFlow for a
short fixed budget (seeded), then compares both at 1 NFE on held-out data. Margins were
set from runs at several seeds, well inside what they showed.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import audio  # noqa: E402
import video  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the small models run fastest single-threaded
    yield
    torch.set_num_threads(previous)


def test_audio_shapes_and_data():
    g = torch.Generator().manual_seed(0)
    signals = audio.tones_and_chirps(16, generator=g)
    assert signals.shape == (16, 32, 2)
    torch.testing.assert_close(signals.norm(dim=-1), torch.ones(16, 32))  # unit amplitude
    assert audio.phase_roughness(signals) < 0.03  # tones and chirps: a smooth phase
    scrambled = torch.nn.functional.normalize(torch.randn(16, 32, 2, generator=g), dim=-1)
    assert audio.phase_roughness(scrambled) > 1.0  # random phases: about pi / 2
    model = audio.SignalTransformer()
    t = torch.rand(16, generator=g)
    out = model(signals, -t, -t * 0.5)
    assert out.shape == signals.shape


def test_video_shapes_and_data():
    g = torch.Generator().manual_seed(0)
    clips = video.moving_blobs(8, generator=g)
    assert clips.shape == (8, 1, video.FRAMES, video.SIZE, video.SIZE)
    assert float(clips.min()) >= -1 and float(clips.max()) <= 1
    assert abs(video.contrast(clips) - 1.8) < 0.3
    assert video.wobble(clips) < 0.6  # constant velocity: only edge effects
    spliced = torch.cat([clips[:, :, :2], clips.flip(0)[:, :, 2:]], dim=2)  # two motions per clip
    assert video.wobble(spliced) > 3 * video.wobble(clips)
    model = video.VideoTransformer()
    t = torch.rand(8, generator=g)
    assert model(clips, t, t * 0.5).shape == clips.shape


def test_audio_twinflow_one_step_beats_flow_matching_one_step():
    results = audio.run(
        pretrain_steps=300, finetune_steps=100, batch=64, eval_samples=128, seed=1, finetune_lr=3e-4, log=lambda _: None
    )
    fm, twin = results["flow matching, 1 NFE"], results["TwinFlow, 1 NFE"]
    # Seeds 0-3 at this budget: twin / fm = 0.42-0.56 (SW), 0.40-0.54 (amplitude), 0.45-0.47 (phase).
    assert twin["sliced_wasserstein"] < 0.75 * fm["sliced_wasserstein"], results
    assert twin["amplitude_error"] < 0.7 * fm["amplitude_error"], results
    assert twin["phase_roughness"] < 0.6 * fm["phase_roughness"], results


def test_video_twinflow_one_step_beats_flow_matching_one_step():
    results = video.run(pretrain_steps=400, finetune_steps=150, batch=64, eval_samples=128, seed=0, log=lambda _: None)
    fm, twin = results["flow matching, 1 NFE"], results["TwinFlow, 1 NFE"]
    assert twin["sliced_wasserstein"] < 0.85 * fm["sliced_wasserstein"], results
    assert twin["contrast"] > fm["contrast"] + 0.15, results


def test_examples_keep_samples_and_draw_them(tmp_path):
    import protocol  # noqa: E402 (examples/ is on sys.path above)

    for example, draw, shape in ((video, video.draw_clip, (1, video.FRAMES, video.SIZE, video.SIZE)),
                                 (audio, audio.draw_signal, (32, 2))):
        kept = {}
        results = example.run(pretrain_steps=2, finetune_steps=2, batch=8, eval_samples=16, seed=0,
                              log=lambda _: None, keep_samples=kept)
        assert list(kept) == ["held-out data", *[name for name in results if name != "data (second draw)"]]
        assert all(samples.shape == (6, *shape) for samples in kept.values())
        path = tmp_path / f"{example.__name__}.png"
        protocol.render_rows(kept, draw, path, "test")
        from PIL import Image

        with Image.open(path) as image:
            assert image.width > 6 * draw(kept["held-out data"][0]).width
            assert image.height > len(kept) * draw(kept["held-out data"][0]).height

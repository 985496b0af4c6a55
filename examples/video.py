"""TwinFlow on video ``[B, C, F, H, W]``: generated moving-blob clips, a tiny space-time transformer.

Each clip is ``F = 4`` frames of ``8 x 8`` pixels in ``[-1, 1]`` showing one Gaussian blob
(width 1 px) that starts at a random point and moves with a random constant velocity. Two
figures besides the distance to held-out clips say whether a sample *is* such a clip:

* ``contrast``: mean per-frame ``max - median`` (real clips: about 2; the average of many
  clips, which 1-NFE flow matching produces, is a faint smear);
* ``wobble``: mean size, in pixels, of the second difference over frames of the centroid
  of each frame's peak (real clips move at constant velocity: 0.32, from blobs leaving
  the frame; clips spliced from two motions: 2.8; a smear with no blob scores 0, which is
  why it is read together with ``contrast``).

Protocol as in the benchmark: pretrain with plain flow matching, fine-tune the same weights
with :class:`twinloss.TwinFlowLoss`, then sample at 1 and 2 NFE.

    PYTHONPATH=src python examples/video.py              # a few minutes on 2 CPU cores
    PYTHONPATH=src python examples/video.py --quick      # seconds
"""

import protocol
import torch
from einops import rearrange
from torch import Tensor, nn

from twinloss import toy

FRAMES, SIZE = 4, 8


def moving_blobs(n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """``[n, 1, FRAMES, SIZE, SIZE]`` clips of one Gaussian blob moving at constant velocity."""
    start = 2.0 + 4.0 * torch.rand(n, 2, generator=generator)
    velocity = 2.0 * torch.rand(n, 2, generator=generator) - 1.0
    frame = torch.arange(FRAMES, dtype=torch.float32).view(1, FRAMES, 1)
    center = start.unsqueeze(1) + velocity.unsqueeze(1) * frame  # [n, F, 2]
    grid = torch.arange(SIZE, dtype=torch.float32)
    dy = grid.view(1, 1, SIZE, 1) - center[..., 0].view(n, FRAMES, 1, 1)
    dx = grid.view(1, 1, 1, SIZE) - center[..., 1].view(n, FRAMES, 1, 1)
    return (-1.0 + 2.0 * torch.exp(-(dx**2 + dy**2) / 2.0)).unsqueeze(1)


class VideoTransformer(nn.Module):
    """A two-time velocity field on ``[B, C, F, H, W]`` clips: a tiny space-time transformer.

    Each frame is cut into ``patch x patch`` patches; every (frame, patch) is one token with a
    learned space-time position embedding, and one extra token carries the times: sinusoidal
    features of ``|t|``, ``|t| - |r|``, plus a zero-initialised *twin* term for ``t < 0`` (the fake trajectory), so
    the fake field starts equal to the real one.
    Global attention lets a single evaluation place the blob consistently in every frame.
    """

    def __init__(self, channels: int = 1, patch: int = 4, width: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        tokens = FRAMES * (SIZE // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, width)
        self.position = nn.Parameter(0.02 * torch.randn(1, tokens + 1, width))
        self.time = toy.ToyTimeEmbedding(width, frequencies=8)  # fake field starts as the real one
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, channels * patch * patch))

    def forward(self, x_t: Tensor, t: Tensor, r: Tensor) -> Tensor:
        b, c, f, h, w = x_t.shape
        p = self.patch
        tokens = rearrange(x_t, "b c f (h p) (w q) -> b (f h w) (c p q)", p=p, q=p)
        time_token = self.time(t, r, x_t.dtype)
        h_tokens = torch.cat([time_token.unsqueeze(1), self.embed(tokens)], dim=1) + self.position
        out = self.out(self.encoder(h_tokens)[:, 1:])
        return rearrange(out, "b (f h w) (c p q) -> b c f (h p) (w q)", f=f, h=h // p, w=w // p, p=p, q=p)


def contrast(clips: Tensor) -> float:
    """Mean per-frame ``max - median`` (real clips: about 2)."""
    frames = clips.flatten(3)  # [B, C, F, H*W]
    return float((frames.max(dim=-1).values - frames.median(dim=-1).values).mean())


def wobble(clips: Tensor) -> float:
    """Mean ``|c_{f+1} - 2 c_f + c_{f-1}|`` (pixels) of the centroid ``c_f`` of each frame's peak.

    The peak is every pixel within 0.5 of the frame's brightest, weighted by how far above
    that level it is, so an offset background does not drag the centroid.

    A blob moving at constant velocity has a straight, evenly spaced centroid track (0.32
    over held-out clips, all of it where a blob leaves the frame); frames that do not
    belong to one motion do not (2.8 for clips spliced from two).
    """
    frames = clips[:, 0]  # [B, F, H, W]
    mass = (frames - frames.amax(dim=(2, 3), keepdim=True) + 0.5).clamp(min=0)  # the brightest half unit
    grid = torch.arange(SIZE, dtype=clips.dtype, device=clips.device)
    total = mass.sum(dim=(2, 3)).clamp(min=1e-6)
    centroid = torch.stack([(mass.sum(3) * grid).sum(2) / total, (mass.sum(2) * grid).sum(2) / total], dim=-1)
    second_difference = centroid[:, 2:] - 2 * centroid[:, 1:-1] + centroid[:, :-2]  # [B, F-2, 2]
    return float(second_difference.norm(dim=-1).mean())


def draw_clip(clip: Tensor, scale: int = 6):
    """A ``[1, F, H, W]`` clip as its frames side by side, grey levels from ``[-1, 1]``."""
    from PIL import Image

    frames = ((clip[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [F, H, W]
    frames = frames.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    gap = torch.full((frames.shape[0], frames.shape[1], 2), 255, dtype=torch.uint8)
    strip = torch.cat([torch.cat([frame, spacer], dim=1) for frame, spacer in zip(frames, gap, strict=True)], dim=1)
    return Image.frombytes("L", (strip.shape[1], strip.shape[0]), bytes(strip.flatten().tolist())).convert("RGB")


def run(*, pretrain_steps: int = 1500, finetune_steps: int = 600, batch: int = 64, seed: int = 0,
        eval_samples: int = 256, finetune_lr: float = 1e-3, log=print, keep_samples=None) -> dict[str, dict[str, float]]:
    """Pretrain (flow matching), fine-tune (TwinFlow) and evaluate; returns figures per sampler."""
    torch.manual_seed(seed)
    return protocol.run(
        VideoTransformer(), moving_blobs, {"contrast": contrast, "wobble": wobble},
        pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, batch=batch, seed=seed,
        eval_samples=eval_samples, finetune_lr=finetune_lr, log=log, keep_samples=keep_samples,
    )


if __name__ == "__main__":
    protocol.main(
        "TwinFlow on generated moving-blob clips [B, C, F, H, W].", run,
        quick=dict(pretrain_steps=300, finetune_steps=100, eval_samples=128), draw=draw_clip,
    )

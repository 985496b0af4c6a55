"""An independent, loop-by-loop float64 reference of one TwinFlow step.

It follows ALGORITHM.md section 2 literally, draws its random numbers in the
order TwinFlowLoss documents (t, u, fake noise, interpolation noise,
rectification noise, rectification time), computes every target under
``no_grad`` from a *separate* no-grad forward, and back-propagates through a
single forward with those precomputed targets.
"""

import math

import torch


def l2(p, q):
    return ((p - q) ** 2).flatten(1).mean(1)


def barron(p, q, c=1e-3):
    mse = l2(p, q)
    return mse * ((mse.detach() / c**2 + 1) ** -0.5) / c


def reference_step(model, x, y, null_y, seed, *, guidance=0.5, step=0.01, order=2,
                   clamp=1.0, rectify_weight=0.5, rectify_clamp=1.0, distance=l2):
    g = torch.Generator().manual_seed(seed)
    batch = x.shape[0]
    n = batch // 4
    one, multi, anys, fake = (slice(k * n, (k + 1) * n) for k in range(4))
    real = slice(0, 3 * n)
    view = (-1,) + (1,) * (x.ndim - 1)

    t0 = torch.rand(batch, dtype=x.dtype, generator=g)
    u = torch.rand(batch, dtype=x.dtype, generator=g)
    t, r = t0.clone(), t0.clone()
    t[one], r[one] = 1.0, 0.0
    r[multi] = t0[multi] - u[multi] * t0[multi] * 0.05
    r[anys] = t0[anys] - u[anys] * t0[anys]
    t[fake], r[fake] = -t0[fake], -t0[fake]

    with torch.no_grad():
        z_gen = torch.randn(x[fake].shape, dtype=x.dtype, generator=g)
        ones = torch.ones(n, dtype=x.dtype)
        x_fake = z_gen - model(z_gen, ones, 0 * ones, y=y[fake])
    x_rows = torch.cat([x[real], x_fake])
    z = torch.randn(x_rows.shape, dtype=x.dtype, generator=g)
    a = t.abs().reshape(view)
    x_t = a * z + (1 - a) * x_rows
    v = z - x_rows

    with torch.no_grad():
        prediction = model(x_t, t, r, y=y)
        target = v.clone()
        for i in range(3 * n):  # guidance, then RCGM, row by row
            ti, ri = t[i : i + 1], r[i : i + 1]
            xi, vi = x_t[i : i + 1], v[i : i + 1].clone()
            if guidance > 0 and 0 < ti.item() < 1:
                fc = model(xi, ti, ti, y=y[i : i + 1])
                fu = model(xi, ti, ti, y=null_y[i : i + 1])
                vi = vi + guidance * (fc - fu)
            t_mid = max(ti.item() - step, ri.item())
            xs = xi - step * vi
            s, disp = t_mid, torch.zeros_like(xi)
            for k in range(1, order + 1):
                s_next = t_mid - k * (t_mid - ri.item()) / order
                jump = (s - s_next) * model(xs, torch.tensor([s], dtype=x.dtype),
                                            torch.tensor([s_next], dtype=x.dtype), y=y[i : i + 1])
                xs, disp, s = xs - jump, disp + jump, s_next
            if ti.item() - ri.item() >= step:
                residual = ((ti.item() - ri.item()) * prediction[i : i + 1] - disp) / step - vi
            else:
                residual = prediction[i : i + 1] - vi
            target[i : i + 1] = prediction[i : i + 1] - residual.clamp(-clamp, clamp)

        x_hat = x_t[one] - prediction[one]  # t = 1, r = 0
        z2 = torch.randn(x_hat.shape, dtype=x.dtype, generator=g)
        s = torch.rand(n, dtype=x.dtype, generator=g)
        y_mix = s.reshape(view) * z2 + (1 - s.reshape(view)) * x_hat
        gap = (model(y_mix, -s, -s, y=y[one]) - model(y_mix, s, s, y=y[one])).clamp(
            -rectify_clamp, rectify_clamp)

    output = model(x_t, t, r, y=y)  # the only forward with grad
    weight = torch.ones(batch, dtype=x.dtype)
    weight[real] = 1 + torch.tan((1 - (t[real].abs() - r[real].abs())) * math.pi / 2.5)
    base = (weight * distance(output, target)).sum() / batch
    rectify = distance(output[one], (output[one] - gap).detach()).mean()
    return base + rectify_weight * rectify, gap, n

"""An independent, loop-by-loop float64 reference of one TwinFlow step.

It follows docs/method.md section 2 literally, draws its random numbers in the
order TwinFlowLoss documents (t, u, fake noise, interpolation noise,
rectification noise, rectification time), computes every target under
``no_grad`` from a *separate* no-grad forward, and back-propagates through a
single forward with those precomputed targets.
"""

import math
from fractions import Fraction

import torch


def linear(t):
    return t, 1 - t


def cosine(t):
    return torch.sin(math.pi * t / 2), torch.cos(math.pi * t / 2)


def vp(t, beta_min=0.1, beta_max=20.0):
    b = torch.exp(-0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t**2))
    return torch.sqrt(1 - b**2), b


def _with_derivatives(path, t):
    """``a, b, a', b'`` at ``t``, the derivatives by autograd (independent of any closed form)."""
    t = t.detach().clone().requires_grad_(True)
    a, b = path(t)
    da, = torch.autograd.grad(a.sum(), t, retain_graph=True)
    db, = torch.autograd.grad(b.sum(), t)
    return a.detach(), b.detach(), da, db


def l2(p, q):
    return ((p - q) ** 2).flatten(1).mean(1)


def barron(p, q, c=1e-3):
    mse = l2(p, q)
    return mse * ((mse.detach() / c**2 + 1) ** -0.5) / c


def guided_to_noise(guidance, interval):
    """Whether the guided target reaches the noise end: ``w > 0`` on an interval ``(low, 1)``."""
    return guidance > 0 and interval[1] == 1


def default_group_sizes(batch, guidance, interval=(0.2, 0.7)):
    """Rows of the one-step, multi-step, any-step and fake groups under the library's default partition,
    written out in exact fractions: equal quarters with guidance that reaches the noise end; otherwise 7/24
    for each real group and 1/8 for the fake one. Largest remainders get the leftover rows, equal remainders the smaller share first,
    then the groups in this order."""
    shares = [Fraction(1, 4)] * 4 if guided_to_noise(guidance, interval) else [Fraction(7, 24)] * 3 + [Fraction(1, 8)]
    exact = [share * batch for share in shares]
    sizes = [math.floor(quota) for quota in exact]
    ranked = sorted(range(4), key=lambda k: (sizes[k] - exact[k], shares[k], k))
    for k in ranked[: batch - sum(sizes)]:
        sizes[k] += 1
    return sizes


def reference_step(model, x, y, null_y, seed, *, guidance=0.2, interval=(0.2, 0.7), step=0.01, order=2,
                   clamp=1.0, rectify_weight=0.5, rectify_clamp=1.0, distance=l2, path=linear,
                   image_free=False, guidance_model=None,
                   guidance_groups=("one_step", "multi_step", "any_step"), rectify_field="guided",
                   rectify_draw=None, record=None, sizes=None, rectify_distance=None, guidance_difference="teacher",
                   balance_feedback=False, twin_rows="all"):
    """One step, row by row. ``path(t) -> (a, b)`` with ``x_t = a z + b x``;
    ``image_free`` follows the authors' ``use_image_free`` with their fixed
    teacher: every row starts from the online model's one-jump sample, and
    the guided rows' target is ``F_u + w (F_c - F_u)`` of ``guidance_model``.
    ``rectify_distance`` is step 7's ``rho`` (*default* ``distance``).
    ``sizes`` are the rows of the one-step, multi-step, any-step and fake
    groups, in that order (*default* :func:`default_group_sizes`). Only rows
    of ``guidance_groups`` whose ``t`` lies strictly inside ``interval`` are guided. ``rectify_field="guidance_free"`` takes
    ``guidance (G_c - G_u)`` of ``guidance_model`` at ``(y, s, s)`` out of the
    rectification's real field where ``s`` lies inside ``interval``. ``rectify_draw(n, dtype, g)`` draws the
    rectification's times ``s``; ``guidance_difference="data"`` guides the
    labelled rows (``y != null_y``) with ``v + w / (1 - w) (v - G_u)`` and
    takes ``w (F - G_u)`` out of the guidance-free field; ``balance_feedback``
    weighs the teacher-guided labelled rows' base term by ``1 / (1 - w)``; ``twin_rows="conditioned"`` weighs the
    fake rows and the rectification rows whose label is the null one by 0; by default the library's rule, written out
    here for a labelled batch: ``sigmoid`` of a float32 standard normal with guidance that reaches the noise
    end, otherwise the uniform ``u`` shifted towards the data, ``s = u / (3 - 2u)``. A ``record`` dict receives the unclamped
    corrections: ``"residual"`` (the real rows' RCGM residuals, stacked) and
    ``"gap"`` (the rectification's velocity gap).
    """
    guidance_model = model if guidance_model is None else guidance_model
    g = torch.Generator().manual_seed(seed)
    batch = x.shape[0]
    sizes = default_group_sizes(batch, guidance, interval) if sizes is None else list(sizes)
    low, high = interval
    assert sum(sizes) == batch
    ends = [sum(sizes[: k + 1]) for k in range(4)]
    one, multi, anys, fake = (slice(end - size, end) for size, end in zip(sizes, ends, strict=True))
    real = slice(0, ends[2])
    n = sizes[0]  # the one-step rows, which the rectification reads
    view = (-1,) + (1,) * (x.ndim - 1)

    t0 = torch.rand(batch, dtype=x.dtype, generator=g)
    u = torch.rand(batch, dtype=x.dtype, generator=g)
    t, r = t0.clone(), t0.clone()
    t[one], r[one] = 1.0, 0.0
    r[multi] = t0[multi] - u[multi] * t0[multi] * 0.05
    r[anys] = t0[anys] - u[anys] * t0[anys]
    t[fake], r[fake] = -t0[fake], -t0[fake]

    with torch.no_grad():
        made = slice(0, batch) if image_free else fake  # rows made by the online model
        z_gen = torch.randn(x[made].shape, dtype=x.dtype, generator=g)
        ones = torch.ones(z_gen.shape[0], dtype=x.dtype)
        samples = z_gen - model(z_gen, ones, 0 * ones, y=y[made])  # x_t - (1 - 0) F at t = 1
        x_rows = samples if image_free else torch.cat([x[real], samples])
    z = torch.randn(x_rows.shape, dtype=x.dtype, generator=g)
    a, b, da, db = _with_derivatives(path, t.abs())
    x_t = a.reshape(view) * z + b.reshape(view) * x_rows
    v = da.reshape(view) * z + db.reshape(view) * x_rows

    balanced = torch.zeros(batch, dtype=torch.bool)  # rows whose base term is weighed by 1 / (1 - w)
    with torch.no_grad():
        prediction = model(x_t, t, r, y=y)
        target = v.clone()
        for i in range(ends[2]):  # guidance, then RCGM, row by row
            ti, ri = t[i : i + 1], r[i : i + 1]
            xi, vi = x_t[i : i + 1], v[i : i + 1].clone()
            group = ("one_step", "multi_step", "any_step")[sum(i >= end for end in ends[:2])]
            inside = low < ti.item() < high
            if guidance > 0 and inside and group in guidance_groups and guidance_difference == "data":
                if y[i] != null_y[i]:  # the dropped labels keep v
                    fu = guidance_model(xi, ti, ti, y=null_y[i : i + 1])
                    vi = vi + guidance / (1 - guidance) * (vi - fu)
            elif guidance > 0 and inside and group in guidance_groups:
                fc = guidance_model(xi, ti, ti, y=y[i : i + 1])
                fu = guidance_model(xi, ti, ti, y=null_y[i : i + 1])
                vi = fu + guidance * (fc - fu) if image_free else vi + guidance * (fc - fu)
                balanced[i] = balance_feedback and bool(y[i] != null_y[i])
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
            if record is not None:
                record.setdefault("residual", []).append(residual)

        x_hat = x_t[one] - prediction[one]  # t = 1, r = 0
        z2 = torch.randn(x_hat.shape, dtype=x.dtype, generator=g)
        if rectify_draw is not None:
            s = rectify_draw(n, x.dtype, g)
        elif guided_to_noise(guidance, interval):
            s = torch.sigmoid(torch.randn(n, dtype=torch.float32, generator=g)).to(x.dtype)
        else:  # the uniform draw shifted towards the data (these batches carry labels)
            u = torch.rand(n, dtype=x.dtype, generator=g)
            s = u / (3 - 2 * u)
        a_s, b_s = path(s)
        y_mix = a_s.reshape(view) * z2 + b_s.reshape(view) * x_hat
        real_field = model(y_mix, s, s, y=y[one])
        guided_s = ((low < s) & (s < high)).reshape(view).to(x.dtype)  # where step 4 trained F(y, s, s) guided
        if rectify_field == "guidance_free" and guidance_difference == "data":
            labelled = (y[one] != null_y[one]).reshape(view).to(x.dtype) * guided_s
            real_field = real_field - labelled * guidance * (real_field - guidance_model(y_mix, s, s, y=null_y[one]))
        elif rectify_field == "guidance_free":
            real_field = real_field - guided_s * guidance * (
                guidance_model(y_mix, s, s, y=y[one]) - guidance_model(y_mix, s, s, y=null_y[one]))
        raw_gap = model(y_mix, -s, -s, y=y[one]) - real_field
        gap = raw_gap.clamp(-rectify_clamp, rectify_clamp)
        if record is not None:
            record["residual"] = torch.cat(record["residual"])
            record["gap"] = raw_gap

    output = model(x_t, t, r, y=y)  # the only forward with grad
    weight = torch.ones(batch, dtype=x.dtype)
    weight[real] = 1 + torch.tan((1 - (t[real].abs() - r[real].abs())) * math.pi / 2.5)
    weight = torch.where(balanced, weight / (1 - guidance), weight)
    twin_weight = torch.ones(batch, dtype=x.dtype)  # the fake rows' and the rectification rows' weight
    if twin_rows == "conditioned":
        twin_weight = (y != null_y).to(x.dtype)
    weight[fake] = twin_weight[fake]
    base = (weight * distance(output, target)).sum() / batch
    rectify = (twin_weight[one] * (rectify_distance or distance)(output[one], (output[one] - gap).detach())).mean()
    return base + rectify_weight * rectify, gap, n

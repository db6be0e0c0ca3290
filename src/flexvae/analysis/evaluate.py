"""Evaluation of a trained model on a set of images.

Reported, all on images in [-1, 1] (the training range):

- reconstruction from the posterior mean: MSE, PSNR (peak-to-peak 2), SSIM and MS-SSIM
  (SSIM's Gaussian window, sigma 1.5, K = (0.01, 0.03), computed on [0, 1]);
  MS-SSIM uses as many of the standard 5 scales as the image holds (the coarsest scale
  must still hold one window); their weights are renormalised to sum to 1;
- KL(q(z|x) || N(0, I)) in nats per image, per latent channel (summed over spatial
  positions) and per element;
- active units (Burda et al.): element u is active when Cov_x(E_q[z_u]) > 0.01, the
  variance over the images of its posterior mean; a channel is active when the mean of
  its elements' variances exceeds the same threshold. Few active units = posterior collapse;
- an importance-sampled negative log-likelihood for Gaussian posteriors:
  log p(x) ~ logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z|x),
  with the decoder likelihood
    'value' output: Gaussian N(x; decoder(z), sigma^2 I) on x in [-1, 1], sigma fixed
      by the caller or 'auto' = sqrt(mean squared error of the raw decoder output at the
      posterior mean), the maximum-likelihood shared sigma for these images;
    'logits' output: Bernoulli with probabilities sigmoid(logits) on targets (x + 1) / 2
      in [0, 1] (a proper likelihood only for binary images).
  Bits per dimension: Bernoulli NLL / (D ln 2). For the Gaussian the density lives on
  [-1, 1], where one 8-bit grey level is 2/255 = 1/127.5 wide, so the density per grey
  level is p(x) / 127.5 per dimension: bits/dim = (NLL + D ln 127.5) / (D ln 2).
  The same samples give the ELBO; -ELBO >= NLL. A model trained with the elbo objective
  is scored with its own likelihood (likelihoods.py: learned or running-average scales,
  the logistic mixture's mass), never with a sigma chosen here.
"""

from __future__ import annotations

import math

import torch

from ..errors import DataError
from ..metrics import ms_ssim, ms_ssim_scales, psnr, ssim, ssim_window
from .likelihood import (bits_per_dim, default_nll_samples, importance_log_weights, importance_nll,  # noqa: F401
                         is_gaussian, likelihood_estimate, model_bits_per_dim)
from .measures import ACTIVE_THRESHOLD, _Moments, _per_channel
from .split import batch_generator, gather, indexed, merge_moments
MAX_LISTED_ELEMENTS = 65536  # per-element KL goes into the JSON up to this latent size


# ------------------------------------------------------------------ evaluation
def _images(batch):
    return batch if isinstance(batch, torch.Tensor) else batch.images


def _labels(batch, device):
    labels = None if isinstance(batch, torch.Tensor) else batch.labels
    return None if labels is None else labels.to(device)


@torch.no_grad()
def evaluate_model(vae, batches, *, nll_samples: int | None = None, nll_sigma="auto", nll_images: int = 512,
                   device="cpu", seed: int = 0, progress: bool = False, objective=None, step: int = 0) -> dict:
    """Evaluate on ``batches``: a re-iterable of image tensors or loader ``Batch``es.

    ``nll_samples`` = 0 skips the likelihood; None picks :func:`default_nll_samples`.
    The likelihood is estimated on the first ``nll_images`` images. ``objective``: the run's
    objective.Objective, whose loss and terms are averaged over the images (objective_terms) with
    the weights of ``step`` (the checkpoint's).
    """
    from tqdm import tqdm

    vae.eval()
    sums = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "ms_ssim": 0.0, "raw_se": 0.0}
    count, values = 0, 0
    kl, means = _Moments(), _Moments()
    ssim_info = None
    groups = None
    learned_prior = vae.prior is not None  # its KL: the one-sample Monte Carlo estimate, seeded per batch
    if vae.groups:
        from .latent_groups import GroupStatistics

        groups = GroupStatistics()
    data_shape = None
    for index, batch in tqdm(indexed(batches), disable=not progress, desc="evaluate",
                             total=len(batches) if hasattr(batches, "__len__") else None):
        x = _images(batch)
        if x is None:
            continue
        data_shape = tuple(x.shape[1:])
        x, labels = x.to(device), _labels(batch, device)
        raw, posterior, state = vae.reconstruct_raw(x, labels)
        if groups is not None:
            groups.add(posterior, state)
        image = vae.to_image(raw)
        per_image = (image.float() - x.float()).pow(2).flatten(1).mean(1)
        sums["mse"] += per_image.sum().item()
        sums["psnr"] += psnr(image, x).sum().item()
        if vae.output == "value":
            sums["raw_se"] += (raw.double() - x.double()).pow(2).sum().item()
        if x.dim() == 4 and min(x.shape[2:]) >= 3:
            window = ssim_window(tuple(x.shape[2:]))
            sums["ssim"] += ssim(image, x).sum().item()
            ms = ms_ssim(image, x)
            if ms is not None:
                sums["ms_ssim"] += ms.sum().item()
            ssim_info = (window, ms_ssim_scales(min(x.shape[2:]), window), ms is not None)
        if learned_prior:
            draws = batch_generator(device, seed, index)
            kl.add(vae.prior.posterior(posterior, posterior.sample(generator=draws), vae).kl_elements())
        else:
            kl.add(posterior.kl_elements())
        means.add(posterior.mode())
        count += x.shape[0]
        values += x[0].numel() * x.shape[0]
    parts = gather(batches, (sums, count, values, kl, means, groups, ssim_info, data_shape))
    if len(parts) > 1:  # torchrun: every process's share, added up (split.py)
        sums = {key: sum(part[0][key] for part in parts) for key in sums}
        count, values = sum(part[1] for part in parts), sum(part[2] for part in parts)
        kl, means = merge_moments(part[3] for part in parts), merge_moments(part[4] for part in parts)
        if groups is not None:
            groups.merge([part[5] for part in parts])
        ssim_info = next((part[6] for part in parts if part[6] is not None), None)
        data_shape = next((part[7] for part in parts if part[7] is not None), None)
    if count == 0:
        raise DataError("no readable image to evaluate")

    result = {"images": count, "data_shape": list(data_shape), "latent_shape": list(vae.latent_shape)}
    recon = {"mse": sums["mse"] / count, "psnr": sums["psnr"] / count, "ssim": None, "ms_ssim": None}
    if ssim_info is not None:
        window, scales, has_ms = ssim_info
        recon.update(ssim=sums["ssim"] / count, ssim_window=window)
        if has_ms:
            recon.update(ms_ssim=sums["ms_ssim"] / count, ms_ssim_scales=scales)
    result["reconstruction"] = recon
    if groups is not None:  # a hierarchy: KL and active units per latent group, the top first
        result["groups"] = groups.result()

    if kl.n:
        kl_mean = kl.mean()
        result["kl"] = {
            "total_nats": float(kl_mean.sum()),
            "per_channel": [float(v) for v in _per_channel(kl_mean, "sum")],
            "per_element_max": float(kl_mean.max()),
            "per_element_mean": float(kl_mean.mean()),
            **({"prior": "learned (model.prior): one-sample Monte Carlo estimate; per element, the negative "
                         "entropy minus an equal share of log p(z)"} if learned_prior else {}),
        }
        if kl_mean.numel() <= MAX_LISTED_ELEMENTS:
            result["kl"]["per_element"] = kl_mean.float().tolist()  # nested like the latent shape
    variance = means.variance()
    channel_activity = _per_channel(variance, "mean")
    result["active_units"] = {
        "rule": f"Cov_x(E_q[z_u]) > {ACTIVE_THRESHOLD}",
        "threshold": ACTIVE_THRESHOLD,
        "elements": int((variance > ACTIVE_THRESHOLD).sum()),
        "of_elements": int(variance.numel()),
        "channels": int((channel_activity > ACTIVE_THRESHOLD).sum()),
        "of_channels": int(channel_activity.numel()),
        "channel_activity": [float(v) for v in channel_activity],
    }

    if objective is not None:
        result["objective"] = objective_terms(vae, objective, batches, device, seed, step)
    samples = default_nll_samples(data_shape) if nll_samples is None else int(nll_samples)
    if samples > 0:
        result["nll"] = likelihood_estimate(vae, batches, samples, nll_sigma, nll_images, sums["raw_se"] / values,
                             data_shape, device, seed, progress)
    return result


@torch.no_grad()
def objective_terms(vae, objective, batches, device, seed: int = 0, step: int = 0) -> dict:
    """The run's loss and each of its terms, averaged over the images as training computes them
    (one latent sample per image, seeded; the model in evaluation mode, so a calibrated decoder
    uses its running scale). Terms that need a network loaded for training (LPIPS, Adv) are left
    out and listed."""
    from ..objective import TermInputs, image_of

    needs_network = {"LPIPS", "Adv"}
    on = {name for name in objective.names if name not in needs_network}
    sums, count = {}, 0
    for index, batch in indexed(batches):
        x = _images(batch)
        if x is None:
            continue
        x, labels = x.to(device), _labels(batch, device)
        out = vae(x, sample=True, generator=batch_generator(device, seed, index), labels=labels)
        losses = objective(TermInputs(x, out, image_of(out.recon, vae, vae.output), vae, step=step, labels=labels,
                                      seed=seed), on)
        values = {"loss": losses.total, **{k: v for k, v in losses.terms.items() if k in _logged(objective, on)}}
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + float(value) * x.shape[0]
        count += x.shape[0]
    parts = gather(batches, (sums, count))
    sums = {name: sum(part[0].get(name, 0.0) for part in parts) for name in parts[0][0]}
    count = sum(part[1] for part in parts)
    result = {"terms": [t for n, t in zip(objective.names, objective.texts) if n in on], "images": count,
              **{name: total / max(count, 1) for name, total in sums.items()}}
    left_out = [t for n, t in zip(objective.names, objective.texts) if n not in on]
    if left_out:
        result["left_out"] = left_out
    return result


def _logged(objective, on) -> set:
    return {column for name, term in zip(objective.names, objective.terms) if name in on for column in term.logged()}


# ------------------------------------------------------------------ reporting
def format_report(result: dict, top: int = 8) -> str:
    """The evaluation as Markdown: a summary table, then KL and activity per channel."""
    from .common import markdown_table

    rec = result["reconstruction"]
    rows = [("images", result["images"]),
            ("MSE (images in [-1, 1])", rec["mse"]),
            ("PSNR (dB)", rec["psnr"]),
            ("SSIM" + (f" (window {rec['ssim_window']})" if rec.get("ssim_window") else ""), rec["ssim"])]
    if rec.get("ms_ssim") is not None:
        rows.append((f"MS-SSIM ({rec['ms_ssim_scales']} scales)", rec["ms_ssim"]))
    else:
        rows.append(("MS-SSIM", "n/a (image too small for 2 scales)"))
    if "kl" in result:
        rows.append(("KL (nats per image)" + (", top latent" if "groups" in result else "")
                     + ("; to the learned prior, Monte Carlo" if "prior" in result["kl"] else ""),
                     result["kl"]["total_nats"]))
    if "groups" in result:
        rows.append(("KL of the whole hierarchy (nats per image)", sum(g["kl_nats"] for g in result["groups"].values())))
    au = result["active_units"]
    rows.append((f"active units ({au['rule']})", f"{au['elements']} / {au['of_elements']}"))
    rows.append(("active channels", f"{au['channels']} / {au['of_channels']}"))
    nll = result.get("nll")
    if nll and "skipped" not in nll:
        rows.append((f"NLL (nats, {nll['samples']} IS samples, {nll['images']} images)", nll["nats"]))
        rows.append(("NLL (bits/dim)", nll["bits_per_dim"]))
        rows.append(("-ELBO (nats)", nll["neg_elbo_nats"]))
        rows.append(("decoder likelihood", nll["likelihood"] + (f" = {nll['sigma']:.4g}" if nll["sigma"] else "")))
    elif nll:
        rows.append(("NLL", f"skipped: {nll['skipped']}"))
    terms = result.get("objective")
    if terms:
        rows.append((f"the run's loss ({', '.join(terms['terms'])}; one latent sample per image)", terms["loss"]))
        rows += [(f"  {name}", value) for name, value in terms.items()
                 if name not in ("loss", "terms", "images", "left_out")]
        if terms.get("left_out"):
            rows.append(("  left out (networks of training)", ", ".join(terms["left_out"])))
    gen = result.get("generation")
    if gen:
        which = {"fitted": "fitted prior", "model": "model's prior"}.get(gen.get("prior"), "prior")
        noise = gen.get("noise", {})

        def beside(key, text):
            return f"{text} (uniform noise: {noise[key]:.4g})" if key in noise else text

        rows.append((f"{which} samples: Frechet distance in the judge's features ({gen['samples']} samples against "
                     f"{gen['real_images']} images of {gen['labelled']})", beside("frechet", f"{gen['frechet']:.4g}")))
        pair = f"{gen['precision']:.3f} / {gen['recall']:.3f}"
        if noise:
            pair += f" (uniform noise: {noise['precision']:.3f} / {noise['recall']:.3f})"
        rows.append(("  precision / recall (k-NN manifolds, k = 3)", pair))
        rows.append(("  classified with p > 0.9", beside("confident", f"{gen['confident']:.3f}")))
        rows.append(("  entropy of the predicted classes (bits)", beside(
            "class_entropy_bits", f"{gen['class_entropy_bits']:.3f} of {gen['max_entropy_bits']:.3f}")))
        if gen["classifier_accuracy"] is not None:
            rows.append(("  the judge's held-out accuracy on real images", gen["classifier_accuracy"]))
    from .sample_checks import report_rows

    rows += report_rows(result)
    cond = result.get("conditional_generation")
    if cond:
        rows.append((f"class-c samples classified as c (mean over {len(cond['per_class'])} classes, "
                     f"{cond['samples_per_class']} each)", cond["mean"]))
        worst = min(cond["per_class"], key=cond["per_class"].get)
        rows.append(("worst class", f"{worst}: {cond['per_class'][worst]:.3f}"))
    acc = result.get("class_accuracy")
    if acc:
        rows.append((f"class latent accuracy ({acc['images']} images of {acc['labelled']})", acc["accuracy"]))
        rows.append(("class latent purity / chance", f"{acc['purity']:.3f} / {acc['chance']:.3f}"))
    text = [markdown_table(["metric", "value"], rows)]
    if "kl" in result:
        kl = result["kl"]["per_channel"]
        activity = au["channel_activity"]
        order = sorted(range(len(kl)), key=lambda i: -kl[i])[:top]
        text += ["", f"Latent channels by KL (top {len(order)} of {len(kl)}):", "",
                 markdown_table(["channel", "KL (nats)", "Var_x of mean", "active"],
                                [(i, kl[i], activity[i], "yes" if activity[i] > ACTIVE_THRESHOLD else "no")
                                 for i in order])]
    if "groups" in result:
        text += ["", "Latent groups (top-down; the KL above is the top latent's):", "",
                 markdown_table(["group", "shape", "KL (nats)", "active units", "active channels"],
                                [(name, " x ".join(map(str, g["shape"])), g["kl_nats"],
                                  f"{g['active_units']} / {g['units']}", f"{g['active_channels']} / {g['channels']}")
                                 for name, g in result["groups"].items()])]
    return "\n".join(text)

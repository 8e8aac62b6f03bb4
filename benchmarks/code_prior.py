"""A compact per-field code as the prior: a VAE over the learned strategy's latents, a mixture over its codes.

    python benchmarks/code_prior.py --out /tmp/gq_chairs_b8 --source ../shared/data/shapes/modelnet10_chair_32.npz \\
        --ae-epochs 80 --ae-batch-size 8 --seeds 0 1 2 --threads 1

The experiment behind RESULTS.md, "Chairs, session 9"; the package's ``code`` strategy (`NefCodeVAE`, session 10)
puts NefGPT where the mixture is here. On the cached work folder of a `generation_quality.py` run with the learned
strategy (the same ``--source`` and ``--ae-*`` settings; stages missing there are computed first):

1. the decoder's metric M = E[JᵀJ] (`nef_transformers.tokenization.code.decoder_metric`: J the Jacobian of the
   decoded fields' outputs on a coarse grid with respect to the latents, by central differences) on
   ``--metric-items`` training fields;
2. a VAE over the training fields' latents in shape-weighted coordinates y = M^½ (z - mean) (MLPs of width 512,
   a ``--code-dim`` code, Gaussian likelihood of fixed variance ``--sigma2``);
3. codes drawn from a mixture of ``--components`` full-covariance Gaussians fitted to the training fields' codes
   (``--components 0``: from N(0, T² I)), decoded to latents, then to fields, scored like the benchmark's rows
   (`Run.evaluate_weights`, with the latent NN ratio), one row per ``--seeds`` value (the mixture's seed), and with
   two or more seeds their mean (`seed_means`: one draw of 178 chairs spreads by 1.3-2.7 points of 1-NNA).

Prints the table, then one JSON line per row. Needs scikit-learn for the mixture (``pip install scikit-learn``).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def train_vae(y, code_dim: int, sigma2: float, steps: int, width: int = 512, batch_size: int = 64, seed: int = 0):
    """A VAE over the rows of ``y`` (``(n, d)`` float32): ``(encoder, decoder)``, each MLP returning
    ``(mean, log-variance)`` codes and reconstructions."""
    import torch
    from torch import nn
    from tqdm.auto import trange

    torch.manual_seed(seed)

    def mlp(inputs, outputs):
        return nn.Sequential(nn.Linear(inputs, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                             nn.Linear(width, outputs))

    encoder, decoder = mlp(y.shape[1], 2 * code_dim), mlp(code_dim, y.shape[1])
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3)
    for _ in trange(steps, desc="VAE", unit="step", mininterval=1.0):
        batch = y[torch.randint(0, len(y), (batch_size,))]
        mean, log_var = encoder(batch).chunk(2, -1)
        code = mean + (0.5 * log_var).exp() * torch.randn_like(mean)
        reconstruction = ((decoder(code) - batch) ** 2).sum(1) / (2 * sigma2)
        kl = 0.5 * (mean ** 2 + log_var.exp() - 1 - log_var).sum(1)
        loss = (reconstruction + kl).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder.eval(), decoder.eval()


def draw_codes(encoder, y, count: int, components: int, temperature: float, seed: int):
    """``count`` codes: from a mixture of ``components`` Gaussians fitted to 8 posterior draws per row of ``y``
    (spread around each component's mean scaled by ``temperature``), or from N(0, T² I) with ``components=0``."""
    import torch

    code_dim = encoder[-1].out_features // 2
    if components == 0:
        return temperature * torch.randn(count, code_dim, generator=torch.Generator().manual_seed(seed))
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as error:
        raise SystemExit("code_prior.py needs scikit-learn for the mixture: pip install scikit-learn") from error
    with torch.no_grad():
        mean, log_var = encoder(y).chunk(2, -1)
        draws = torch.cat([mean + (0.5 * log_var).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(r))
                           for r in range(8)])
    mixture = GaussianMixture(components, covariance_type="full", random_state=seed, reg_covar=1e-4).fit(draws.numpy())
    codes, labels = mixture.sample(count)
    centres = torch.from_numpy(mixture.means_).float()[torch.from_numpy(labels)]
    return centres + temperature * (torch.from_numpy(codes).float() - centres)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the generation_quality.py work folder (cached stages)")
    parser.add_argument("--source", default="mnist")
    parser.add_argument("--num-items", type=int, default=None)
    parser.add_argument("--ae-epochs", type=int, default=45)
    parser.add_argument("--ae-hidden-size", type=int, default=128)
    parser.add_argument("--ae-layers", type=int, default=2)
    parser.add_argument("--ae-latent-dim", type=int, default=4)
    parser.add_argument("--ae-batch-size", type=int, default=None)
    parser.add_argument("--metric-items", type=int, default=40, help="training fields the decoder's metric averages")
    parser.add_argument("--code-dim", type=int, default=32)
    parser.add_argument("--sigma2", type=float, default=0.3, help="the VAE's fixed likelihood variance (KL pull)")
    parser.add_argument("--steps", type=int, default=4000, help="VAE optimizer steps (batch 64)")
    parser.add_argument("--components", type=int, default=8, help="mixture over the codes; 0: N(0, T² I)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for name, value, bad in (("--components", args.components, args.components < 0),
                             ("--temperature", args.temperature, args.temperature < 0),
                             ("--sigma2", args.sigma2, args.sigma2 <= 0), ("--code-dim", args.code_dim, args.code_dim < 1),
                             ("--metric-items", args.metric_items, args.metric_items < 1), ("--steps", args.steps, args.steps < 1)):
        if bad:
            parser.error(f"{name} {value} is out of range (components, temperature >= 0; sigma2 > 0; the rest >= 1)")

    import torch

    from nef_transformers.experiment import Run, RunConfig, metrics_table, seed_means
    from nef_transformers.tokenization.code import decoder_metric, shape_weighted_frame

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args.out, RunConfig(source=args.source, num_items=args.num_items, strategy="learned",
                                  autoencoder_epochs=args.ae_epochs, autoencoder_hidden_size=args.ae_hidden_size,
                                  autoencoder_layers=args.ae_layers, autoencoder_latent_dim=args.ae_latent_dim,
                                  autoencoder_batch_size=args.ae_batch_size))
    autoencoder, latents = run._autoencoder().cpu(), run._training_latents()
    count = len(run.split()[1])
    started = time.perf_counter()
    metric = decoder_metric(autoencoder, run.kind, latents, args.metric_items)
    centre, root, inverse_root, scale = shape_weighted_frame(metric, latents)
    y = ((latents.flatten(1).double() - centre) @ root / scale).float()
    encoder, decoder = train_vae(y, args.code_dim, args.sigma2, args.steps)
    print(f"metric and VAE: {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for seed in args.seeds:
        codes = draw_codes(encoder, y, count, args.components, args.temperature, seed)
        with torch.no_grad():
            drawn = (centre + decoder(codes).double() * scale @ inverse_root).float().view(count, *latents.shape[1:])
            weights = torch.cat([autoencoder.decode(part).float() for part in drawn.split(64)])
        rows.append(run.evaluate_weights(weights, "vae-code-prior", {
            "components": args.components, "temperature": args.temperature, "code_dim": args.code_dim,
            "sigma2": args.sigma2, "seed": seed}, latents=drawn))
    rows += seed_means(rows)  # two or more seeds: their mean, the 1-NNA with ± its standard error
    print(metrics_table(rows))
    for row in rows:
        print(json.dumps({"bench": "code_prior", "source": args.source, **{
            key: row.get(key) for key in ("strategy", "components", "temperature", "code_dim", "sigma2", "seed", "mmd",
                                          "cov", "one_nna", "one_nna_samples", "one_nna_references",
                                          "memorisation_ratio", "latent_nn_ratio", "invalid")},
            **({"seeds": row["seeds"], "one_nna_se": row["one_nna_se"]} if "seeds" in row else {})}))
    return rows


if __name__ == "__main__":
    main()

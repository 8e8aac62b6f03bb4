"""Fitting throughput: `nef-transformers fit` vs the reference stacked fitter vs a naive per-field loop, one run.

    python benchmarks/fit_throughput.py                       # MNIST, 1,024 digits, the default config
    python benchmarks/fit_throughput.py --num-fields 256 --naive-fields 8 --skip-full   # a quick look

(a) `nef-transformers fit` on N digits as a user runs it (a fresh process: data loading, fitting, shard and
    dataset writing), less its time on 1 digit (start-up): NeFs/s = (N - 1) / (T_N - T_1);
(b) the reference fitter `../shared/bench/ref_fit.py` (stacked `baddbmm` + autograd + one Adam; 100 steps,
    lr 1e-3, 256 fields: the 30 dB config), in its own process;
(c) a naive loop: one `nn.Module` SIREN + `torch.optim.Adam` per field, this package's config;
(d) unless --skip-full: all 5,000 embedded digits through the CLI, for its peak RSS.
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "bench" / "ref_fit.py"


def run_cli(num_fields: int, out: Path, threads: int) -> tuple[float, float, float]:
    """Seconds, mean PSNR and peak RSS (MB) of one `nef-transformers fit` process."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", "import sys, resource; from nef_transformers.cli import main; code = main(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)",
               "fit", "--source", "mnist", "--num-fields", str(num_fields), "--out", str(out), "--device", "cpu",
               "--threads", str(threads)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"nef-transformers fit failed:\n{result.stderr[-2000:]}")
    from nef_transformers.data.weights import load_nef_dataset

    psnr = float(np.mean(load_nef_dataset(out)["psnr"]))
    rss_kb = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("PEAK_RSS_KB"))
    return seconds, psnr, rss_kb / 1024


def run_reference(threads: int) -> dict:
    if not REFERENCE.exists():
        return {"nefs_per_s": None, "psnr_db": None}
    result = subprocess.run([sys.executable, str(REFERENCE), "--num-fields", "256", "--steps", "100", "--threads",
                             str(threads)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


class NaiveSiren(torch.nn.Module):
    def __init__(self, spec, init):
        super().__init__()
        self.spec = spec
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in spec.layer_dims)
        params = spec.unflatten(init.unsqueeze(0))
        with torch.no_grad():
            for l, layer in enumerate(self.layers):
                layer.weight.copy_(params[f"layers.{l}.weight"][0])
                layer.bias.copy_(params[f"layers.{l}.bias"][0])

    def forward(self, coords):
        hidden = coords
        for l, layer in enumerate(self.layers):
            hidden = layer(hidden)
            if l < len(self.layers) - 1:
                hidden = torch.sin(self.spec.omega_0 * hidden)
        return hidden


def run_naive(num_fields: int, threads: int) -> tuple[float, float]:
    from nef_transformers.data.images import load_mnist
    from nef_transformers.data.weights import select_indices
    from nef_transformers.fields import FitConfig, SirenSpec, psnr_fit_a_nef, siren_init

    torch.set_num_threads(threads)
    source, spec, config = load_mnist(), SirenSpec(), FitConfig()
    init = siren_init(spec, 1, generator=torch.Generator().manual_seed(config.seed))[0]
    coords = source.coords()
    indices = select_indices(len(source), num_fields, seed=0)
    psnrs = []
    start = time.perf_counter()
    for index in indices:
        target = source.signals([index])[0]
        model = NaiveSiren(spec, init)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        for _ in range(config.steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(coords), target)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            psnrs.append(psnr_fit_a_nef(model(coords)[None], target[None], source.mean, source.std).item())
    return num_fields / (time.perf_counter() - start), float(np.mean(psnrs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-fields", type=int, default=1024)
    parser.add_argument("--naive-fields", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true", help="skip fitting all 5,000 digits (peak RSS)")
    args = parser.parse_args()
    from nef_transformers.fields import FitConfig

    config = FitConfig()
    work = Path(tempfile.mkdtemp(prefix="fit-throughput-"))
    try:
        one_s, _, _ = run_cli(1, work / "one", args.threads)
        many_s, psnr, rss_mb = run_cli(args.num_fields, work / "many", args.threads)
        ours = (args.num_fields - 1) / (many_s - one_s)
        reference = run_reference(args.threads)
        naive, naive_psnr = run_naive(args.naive_fields, args.threads)
        full_rss = None
        if not args.skip_full:
            _, _, full_rss = run_cli(5000, work / "full", args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [
        ("nef-transformers fit (CLI, start-up excluded)", ours, psnr, f"{config.steps} steps, lr {config.lr}"),
        ("reference ref_fit.py (stacked baddbmm, autograd)", reference["nefs_per_s"], reference["psnr_db"], "100 steps, lr 0.001"),
        ("naive per-field loop (nn.Module + Adam)", naive, naive_psnr, f"{config.steps} steps, lr {config.lr}"),
    ]
    print(f"\nfit throughput, MNIST, {args.num_fields} digits, {args.threads} threads")
    print(f"{'fitter':<52} {'NeFs/s':>8} {'PSNR dB':>8}  config")
    for name, rate, quality, note in rows:
        rate_text = "n/a" if rate is None else f"{rate:.1f}"
        quality_text = "n/a" if quality is None else f"{quality:.2f}"
        print(f"{name:<52} {rate_text:>8} {quality_text:>8}  {note}")
    ref_rate = reference["nefs_per_s"]
    print(f"speed-up vs reference: {ours / ref_rate:.2f}x" if ref_rate else "reference fitter not found")
    print(f"speed-up vs naive loop: {ours / naive:.1f}x; peak RSS {rss_mb:.0f} MB ({args.num_fields} fields)"
          + (f", {full_rss:.0f} MB (5,000 fields)" if full_rss else ""))
    print(json.dumps({
        "bench": "fit_throughput", "source": "mnist", "num_fields": args.num_fields, "steps": config.steps,
        "nefs_per_s": round(ours, 2), "psnr_db": round(psnr, 2),
        "naive_nefs_per_s": round(naive, 2), "naive_psnr_db": round(naive_psnr, 2), "speedup": round(ours / naive, 2),
        "reference_nefs_per_s": ref_rate and round(ref_rate, 2),
        "reference_psnr_db": reference["psnr_db"] and round(reference["psnr_db"], 2),
        "speedup_vs_reference": ref_rate and round(ours / ref_rate, 2),
        "peak_rss_mb": round(full_rss if full_rss else rss_mb, 1), "peak_rss_fields": 5000 if full_rss else args.num_fields,
        "threads": args.threads,
    }))


if __name__ == "__main__":
    main()

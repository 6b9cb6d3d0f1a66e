"""Peak memory of `d2c-evaluate` on an ADM-size sample file: writes an N-image uint8 npz (and a
reference batch) a chunk at a time, then runs d2c.evaluation.evaluate_npz in a child process
and prints its peak RSS (ru_maxrss) and wall time as one JSON line.

    .venv/bin/python bench/eval_memory.py --num-images 50000 --size 256 --folder /tmp/evalmem

The images are random, the Inception has random weights in torch-fidelity's layout (its real
file loads the same way and costs the same); only the memory and the time mean anything.
--stub-net keeps torch-fidelity's whole data path (our rows, its loader, the resize to 299 px,
its feature lists and metrics) but replaces the Inception's convolutions with a pooling and a
fixed projection to the same 2048 / 1008 features: on a 2-core CPU the real network takes about
0.2 s an image, so a 60,000-image run would take hours; run the real one on fewer images for the
network's own (per-batch, size-independent) activation memory.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np


def write_npz(path: Path, n: int, size: int, seed: int, extra: dict | None = None, chunk: int = 1000) -> None:
    """arr_0 uint8 (n, size, size, 3) streamed into a stored zip member, `chunk` images at a time."""
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, {"descr": "|u1", "fortran_order": False,
                                                     "shape": (n, size, size, 3)})
            for lo in range(0, n, chunk):
                f.write(rng.integers(0, 256, (min(chunk, n - lo), size, size, 3), dtype=np.uint8).tobytes())
        for k, v in (extra or {}).items():
            with zf.open(f"{k}.npy", "w") as f:
                np.lib.format.write_array(f, v)


def _stub_forward(self, x):
    """Inception's input handling, then pooling and a fixed projection in place of its convolutions."""
    import torch
    import torch.nn.functional as F
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = interpolate_bilinear_2d_like_tensorflow1x(x.to(torch.float32), size=(299, 299), align_corners=False)
    x = F.adaptive_avg_pool2d((x - 128) / 128, 8).flatten(1)                          # (B, 192)
    proj = torch.Generator().manual_seed(0)
    pool = torch.relu(x @ torch.randn(192, 2048, generator=proj) / 14)
    feats = {"2048": pool, "logits_unbiased": pool @ self.fc.weight.T}
    feats["logits"] = feats["logits_unbiased"] + self.fc.bias
    return tuple(feats[a] for a in self.features_list)


def _child(args) -> None:
    if args.stub_net:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        FeatureExtractorInceptionV3.forward = _stub_forward
    from d2c.evaluation import evaluate_npz
    t0 = time.perf_counter()
    m = evaluate_npz(args.folder / "samples.npz", inception=args.folder / "inception.pth",
                     reference=args.folder / "reference.npz", batch_size=args.batch_size)
    print(json.dumps({"metrics": m, "seconds": time.perf_counter() - t0,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=50_000)
    ap.add_argument("--num-reference", type=int, default=10_000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/evalmem"))
    ap.add_argument("--stub-net", action="store_true", help="pooling + projection in place of the convolutions")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    args.folder.mkdir(parents=True, exist_ok=True)
    if not (args.folder / "inception.pth").is_file():
        import torch
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3 as Inc
        torch.save({}, args.folder / "empty.pth")
        Inc.load_state_dict = lambda self, sd, strict=True: None     # random weights, the real layout
        torch.manual_seed(0)
        torch.save(Inc("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(args.folder / "empty.pth"))
                   .state_dict(), args.folder / "inception.pth")
    t0 = time.perf_counter()
    want = {"samples.npz": (args.num_images, 0, None), "reference.npz": (args.num_reference, 1, "stats")}
    for name, (n, seed, stats) in want.items():         # reused when already of this size
        path = args.folder / name
        try:
            from d2c.files import NpzRows
            if NpzRows(path, "arr_0").shape == (n, args.size, args.size, 3):
                continue
        except Exception:
            pass
        rng = np.random.default_rng(seed)
        a = rng.normal(size=(2048, 2048)) / 64
        write_npz(path, n, args.size, seed=seed, extra={"mu": rng.normal(size=2048), "sigma": a @ a.T} if stats else None)
    written = time.perf_counter() - t0
    p = subprocess.run([sys.executable, __file__, "--child", "--folder", str(args.folder),
                        "--batch-size", str(args.batch_size)] + ["--stub-net"] * args.stub_net,
                       capture_output=True, text=True)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print(json.dumps({"num_images": args.num_images, "num_reference": args.num_reference, "size": args.size,
                      "stub_net": args.stub_net, "npz_gib": (args.folder / "samples.npz").stat().st_size / 2 ** 30,
                      "write_seconds": written, **out}))


if __name__ == "__main__":
    main()

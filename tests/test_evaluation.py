"""The ADM evaluation at scale (d2c.evaluation): batches sampled by every rank into one ADM-format
.npz, equal for 1 and 2 gloo ranks, resumed after a kill, and measured with an Inception file
against an ADM-format reference batch."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from d2c.evaluation import EvalError, evaluate_npz, load_npz_images, sample_to_npz
from d2c.sampling import SamplerConfig

# Random tiny D2C (same weights in every process: seeded), 10 images in 4 batches of 3.
_SAMPLE = textwrap.dedent("""
    import json, os, sys, torch, d2c
    import d2c.sampling as S
    from d2c.evaluation import sample_to_npz
    from d2c.sampling import SamplerConfig
    torch.set_num_threads(1)
    torch.manual_seed(0)
    models = dict(gpt=d2c.build("gpt_tiny").eval(), mar=d2c.build("mar_tiny", fusion="qformer").eval(),
                  kl=d2c.build("kl_tiny").eval())
    die, calls, sample = int(os.environ.get("DIE_AT_CALL", -1)), [0], S.d2c_sample
    def counted(*a, **k):
        calls[0] += 1
        if calls[0] == die:
            os._exit(9)
        return sample(*a, **k)
    S.d2c_sample = counted
    if os.environ.get("GLOO"):
        import torch.distributed as dist
        dist.init_process_group("gloo")
    try:
        npz = sample_to_npz(models, sys.argv[1], SamplerConfig(steps=2, cfg=2.0), num_images=10, num_classes=10,
                            batch_size=3, seed=1, png=True, progress=False)
    finally:    # joins gloo's threads: left to interpreter exit, they can abort the process (SIGABRT)
        if os.environ.get("GLOO"):
            dist.destroy_process_group()
    print(json.dumps({"npz": str(npz), "calls": calls[0]}))
""")


def _run(out, envs):
    procs = [subprocess.Popen([sys.executable, "-c", _SAMPLE, str(out)], env={**os.environ, **e},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for e in envs]
    return [(p.returncode, o, e) for p, (o, e) in ((p, p.communicate(timeout=300)) for p in procs)]


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "one"
    (rc, o, e), = _run(out, [{}])
    assert rc == 0, e
    return out, json.loads(o.splitlines()[-1])


def test_two_gloo_ranks_sample_what_one_does(tmp_path, one):
    out1, r1 = one
    rows = load_npz_images(r1["npz"])
    assert rows.shape == (10, 32, 32, 3) and rows.dtype == np.uint8 and r1["calls"] == 4
    a = rows[:]
    with np.load(r1["npz"]) as z:
        assert z["arr_1"].tolist() == list(range(10))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    runs = _run(tmp_path / "two", [{"GLOO": "1", "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                    "MASTER_PORT": port} for r in range(2)])
    for rc, o, e in runs:
        assert rc == 0, e
    assert [json.loads(o.splitlines()[-1])["calls"] for _, o, _ in runs] == [2, 2]   # batches 0, 2 | 1, 3
    b = load_npz_images(tmp_path / "two" / "samples.npz")[:]
    assert b.tobytes() == a.tobytes()
    assert len(set(a.reshape(10, -1).sum(1).tolist())) > 1                  # not one image ten times
    pngs = sorted((tmp_path / "two" / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(pngs[7])), a[7])
    speed = json.loads((tmp_path / "two" / "speed.json").read_text())
    assert speed["ranks"] == 2 and speed["num_images"] == 10 and speed["warmup_excluded"]
    assert speed["timed_images"] == 4 and speed["seconds_per_image"] > 0 and speed["per"] == "rank"  # batches 2, 3
    assert speed["images_per_second"] == pytest.approx(1 / speed["seconds_per_image"]) and speed["mar_steps"] == 2
    assert speed["peak_memory_bytes"] > 0


@pytest.fixture(scope="module")
def adm(tmp_path_factory, one):
    """A random-weights Inception in torch-fidelity's format, and an ADM-format reference batch
    (arr_0 uint8 NHWC, mu, sigma) of other images: the samples mirrored."""
    from d2c.metrics import save_reference_stats
    from test_metrics import make_inception_file
    d = tmp_path_factory.mktemp("adm")
    inception = make_inception_file(d)
    real = torch.from_numpy(np.flip(load_npz_images(one[1]["npz"])[:], axis=1).copy()).permute(0, 3, 1, 2).contiguous()
    stats = save_reference_stats(real, d / "stats.npz", mode="imagenet", weights_path=inception)
    with np.load(stats) as z:
        np.savez(d / "VIRTUAL_imagenet256_labeled.npz", arr_0=real.permute(0, 2, 3, 1).numpy(), mu=z["mu"],
                 sigma=z["sigma"])
    return inception, d / "VIRTUAL_imagenet256_labeled.npz"


def test_killed_sampling_resumes_only_missing_batches(tmp_path, one, adm):
    out1, r1 = one
    out = tmp_path / "killed"
    (rc, _, e), = _run(out, [{"DIE_AT_CALL": "3"}])           # dies sampling batch 2
    assert rc == 9, e
    done = sorted(p.name for p in (out / "batches").glob("*.json"))
    assert done == ["batch-000000.json", "batch-000001.json"] and not (out / "samples.npz").exists()
    stamps = {p: (out / "batches" / p).stat().st_mtime_ns for p in done}
    (rc, o, e), = _run(out, [{}])
    assert rc == 0, e
    assert json.loads(o.splitlines()[-1])["calls"] == 2        # batches 2 and 3 only
    assert {p: (out / "batches" / p).stat().st_mtime_ns for p in done} == stamps
    a, b = load_npz_images(r1["npz"])[:], load_npz_images(out / "samples.npz")[:]
    assert a.tobytes() == b.tobytes()

    # the metrics of both files, under a random-weights Inception against an ADM-format batch
    inception, ref = adm
    m1 = evaluate_npz(r1["npz"], inception=inception, reference=ref)
    m2 = evaluate_npz(out / "samples.npz", inception=inception, reference=ref)
    assert m1 == m2 and {"fid", "is_mean", "is_std", "precision", "recall"} <= set(m1)
    assert m1["fid"] > 0


def test_sample_folder_and_file_errors(tmp_path, one):
    out1, _ = one
    torch.manual_seed(0)
    import d2c
    models = dict(gpt=d2c.build("gpt_tiny").eval(), mar=d2c.build("mar_tiny", fusion="qformer").eval(),
                  kl=d2c.build("kl_tiny").eval())
    with pytest.raises(EvalError, match="holds samples of another configuration \\(sample.cfg differs\\)"):
        sample_to_npz(models, out1, SamplerConfig(steps=2, cfg=3.0), num_images=10, num_classes=10, batch_size=3,
                      seed=1, progress=False)
    with pytest.raises(EvalError, match="sample file not found"):
        load_npz_images(tmp_path / "none.npz")
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(EvalError, match=r"arr_0 is float32 \(2, 8, 8, 3\); ADM's format is uint8"):
        load_npz_images(tmp_path / "f.npz")
    np.savez(tmp_path / "g.npz", x=np.zeros(2))
    with pytest.raises(EvalError, match="no arr_0"):
        load_npz_images(tmp_path / "g.npz")
    (tmp_path / "h.npz").write_bytes(b"not a zip")
    with pytest.raises(EvalError, match="not a readable .npz"):
        load_npz_images(tmp_path / "h.npz")


def test_sample_and_evaluate_commands(tmp_path, one, adm):
    """d2c-sample from files in the public containers (a MAR file loaded as D2C: fusion zero-init)
    and d2c-evaluate to a metrics record; a bad combination is one line, exit 2."""
    import d2c
    torch.manual_seed(0)
    gpt, mar, kl = d2c.build("gpt_tiny"), d2c.build("mar_tiny"), d2c.build("kl_tiny")
    torch.save({"model": gpt.state_dict()}, tmp_path / "c2i.pt")
    torch.save({"model": mar.state_dict(), "model_ema": mar.state_dict()}, tmp_path / "checkpoint-last.pth")
    torch.save({"model": kl.state_dict()}, tmp_path / "kl16.ckpt")
    cmd = [sys.executable, "-m", "d2c.commands"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    p = subprocess.run(cmd + ["sample", "--gpt", str(tmp_path / "c2i.pt"), "--gpt-preset", "gpt_tiny",
                              "--mar", str(tmp_path / "checkpoint-last.pth"), "--mar-preset", "mar_tiny",
                              "--fusion", "qformer", "--kl", str(tmp_path / "kl16.ckpt"), "--kl-preset", "kl_tiny",
                              "--out", str(tmp_path / "eval"), "--num-images", "6", "--batch-size", "3",
                              "--steps", "2", "--cfg", "2.0", "--png"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    imgs = load_npz_images(tmp_path / "eval" / "samples.npz")
    assert imgs.shape == (6, 32, 32, 3) and len(list((tmp_path / "eval" / "png").iterdir())) == 6
    inception, ref = adm
    p = subprocess.run(cmd + ["evaluate", "--npz", str(tmp_path / "eval" / "samples.npz"), "--inception",
                              str(inception), "--reference", str(ref)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {"fid", "is_mean", "precision", "recall"} <= set(rec["metrics"]) and rec["speed"]["num_images"] == 6
    assert rec["metrics"] == evaluate_npz(tmp_path / "eval" / "samples.npz", inception=inception, reference=ref)
    p = subprocess.run(cmd + ["sample", "--mar", str(tmp_path / "checkpoint-last.pth"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2 and p.stderr.strip() == "error: --mar needs --kl (the KL tokenizer decodes its latents)"
    p = subprocess.run(cmd + ["evaluate", "--npz", str(tmp_path / "none.npz"), "--inception", str(inception),
                              "--reference", str(ref)], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: sample file not found")


def test_speed_summary_reports_the_warmup_excess_apart(tmp_path):
    """Each rank's first batch (compilation and CUDA-graph capture under compile=True) stays out
    of the speed, and its time beyond the steady rate is compile_seconds (mean over ranks)."""
    from d2c.evaluation import _batch, speed_summary
    (tmp_path / "batches").mkdir()
    rows = [(0, 0, True, 30.0), (1, 1, True, 12.0), (2, 0, False, 2.0), (3, 1, False, 2.0), (4, 0, False, 2.0)]
    for b, rank, warm, sec in rows:
        _batch(tmp_path, b, "json").write_text(json.dumps({
            "batch": b, "images": 4, "seconds": sec, "warmup": warm, "rank": rank, "world": 2,
            "timings": {"stage1": sec / 2, "stage2": sec / 2}, "nfe": {}, "dtypes": {},
            "peak_memory_bytes": 1, "peak_memory_kind": "x"}))
    s = speed_summary(tmp_path, 5)
    assert s["timed_images"] == 12 and s["seconds_per_image"] == pytest.approx(0.5)
    assert s["compile_seconds"] == pytest.approx(((30 - 2) + (12 - 2)) / 2)

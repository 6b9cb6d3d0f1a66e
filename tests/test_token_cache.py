"""The token cache (d2c.data.cache, d2c.data.cache_build): round trip against the tokenizers,
reuse by key, crash safety, builds by several ranks and killed builds, unreadable images."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import d2c
from d2c.data import ImageFolder, ShapesDataset, TokenCache, build_token_cache, sample_latents, token_cache_key
from d2c.data.cache import CacheError, cache_path, is_complete
from d2c.data.imagefolder import BadImageWarning
from test_data import _generated_folder, _write_png

N_IMAGES = 16   # the tiny tokenizers cost ~0.1 s an image (+ flip, both) on a busy 2-core CPU
BATCH = 8


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return d2c.build("kl_tiny").eval(), d2c.build("vq_tiny").eval()


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(n=N_IMAGES, seed=5, size=32)


def _direct(kl, vq, images):
    """What the tokenizers give for images and their width flips, batch by batch as the build."""
    out = {"m0": [], "m1": [], "c0": [], "c1": []}
    with torch.no_grad():
        for s in range(0, len(images), BATCH):
            x = images[s:s + BATCH]
            for f, v in ((0, x), (1, torch.flip(x, dims=[3]))):
                out[f"m{f}"].append(kl.encode_moments(v))
                out[f"c{f}"].append(vq.encode(v))
    return {k: torch.cat(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok, shapes):
    """One cache of the shapes images, and the tokenizers' outputs computed directly."""
    kl, vq = tok
    root = tmp_path_factory.mktemp("cache")
    cache = build_token_cache(shapes, root, kl=kl, vq=vq, batch_size=BATCH, progress=False)
    images = torch.stack([shapes[i][0] for i in range(N_IMAGES)])
    return root, cache, _direct(kl, vq, images)


def test_cache_round_trip(built, shapes):
    _, cache, d = built
    assert isinstance(cache, TokenCache) and len(cache) == N_IMAGES
    meta = json.loads((cache.path / "meta.json").read_text())
    assert meta["arrays"]["moments"]["shape"] == [N_IMAGES, 2, 8, 8, 8]
    assert meta["arrays"]["moments"]["dtype"] == "float32"
    assert meta["arrays"]["codes"] == {"file": "codes.npy", "shape": [N_IMAGES, 2, 8, 8], "dtype": "int16"}
    assert meta["num_valid"] == N_IMAGES and meta["num_bad"] == 0 and meta["image_size"] == [32, 32]
    assert meta["num_shards"] == 1 and all(isinstance(a, np.memmap) for a in cache.shards["moments"])
    idx = torch.arange(N_IMAGES)
    for f in (0, 1):
        b = cache.get_batch(idx, f)
        assert b["moments"].dtype == torch.float32 and b["codes"].dtype == torch.int64
        assert torch.equal(b["moments"], d[f"m{f}"]), f
        assert torch.equal(b["codes"], d[f"c{f}"]), f
        assert torch.equal(b["labels"], shapes.labels) and b["flips"].tolist() == [bool(f)] * N_IMAGES
    assert not torch.equal(d["m0"], d["m1"]) and not torch.equal(d["c0"], d["c1"])

    # per-sample flips chosen by the trainer, shuffled indices
    perm = torch.randperm(N_IMAGES)[:12]
    flips = torch.arange(12) % 3 == 0
    b = cache.get_batch(perm, flips)
    want = torch.where(flips[:, None, None, None], d["m1"][perm], d["m0"][perm])
    assert torch.equal(b["moments"], want) and torch.equal(b["flips"], flips)
    assert torch.equal(b["codes"], torch.where(flips[:, None, None], d["c1"][perm], d["c0"][perm]))

    # Dataset items: random flip from a generator (reproducible), or an explicit one
    r1 = TokenCache(cache.path, generator=torch.Generator().manual_seed(1))
    r2 = TokenCache(cache.path, generator=torch.Generator().manual_seed(1))
    got = [r1[i][3] for i in range(N_IMAGES)]
    assert got == [r2[i][3] for i in range(N_IMAGES)] and 0 < sum(got) < N_IMAGES
    m, c, y, fl = cache[3, 1]
    assert torch.equal(m, d["m1"][3]) and torch.equal(c, d["c1"][3]) and y == int(shapes.labels[3]) and fl
    assert torch.equal(TokenCache(cache.path, flip=0, mmap=False)[5][0], d["m0"][5])

    # latents: posterior sample * scale, reproducible from the generator
    m = b["moments"]
    z1 = sample_latents(m, 0.5, torch.Generator().manual_seed(0))
    z2 = sample_latents(m, 0.5, torch.Generator().manual_seed(0))
    mean, logvar = m.chunk(2, dim=1)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z1, z2) and z1.shape == mean.shape
    assert torch.allclose(z1, (mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * eps) * 0.5, atol=1e-6)


def test_cache_reused_by_key_and_key_changes(built, tok, shapes):
    kl, vq = tok
    tmp_path, c1, _ = built
    stamp = {p.name: p.stat().st_mtime_ns for p in c1.path.iterdir()}

    calls = []
    orig = kl.encode_moments
    kl.encode_moments = lambda x: (calls.append(1), orig(x))[1]
    try:
        vq.quantize.codebook_used.fill_(3.0)   # usage statistics: not part of the key
        c2 = build_token_cache(shapes, tmp_path, kl=kl, vq=vq, batch_size=BATCH, progress=False)
    finally:
        del kl.encode_moments
        vq.quantize.codebook_used.zero_()
    assert calls == [] and c2.path == c1.path
    assert {p.name: p.stat().st_mtime_ns for p in c2.path.iterdir()} == stamp

    key = token_cache_key(shapes, kl, vq)[0]
    kl2 = d2c.build("kl_tiny")
    kl2.load_state_dict(kl.state_dict())
    assert token_cache_key(shapes, kl2, vq)[0] == key
    with torch.no_grad():
        kl2.encoder.conv_in.bias[0] += 1e-3
    assert token_cache_key(shapes, kl2, vq)[0] != key
    assert token_cache_key(shapes, kl, None)[0] != key
    assert token_cache_key(ShapesDataset(n=N_IMAGES, seed=6), kl, vq)[0] != key
    small = build_token_cache(ShapesDataset(n=8, seed=5, size=16), tmp_path, kl=None, vq=vq, batch_size=BATCH,
                              progress=False)
    assert small.path != c1.path and small.shards["moments"] is None and small.get_batch([0, 1], 0)["moments"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([c1.path.name, small.path.name])


def test_cache_crash_leaves_nothing_complete(tmp_path, tok):
    kl, vq = tok
    shapes = ShapesDataset(n=12, seed=2, size=16)
    calls = []

    def failing(x, _orig=vq.encode):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return _orig(x)

    vq.encode = failing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            build_token_cache(shapes, tmp_path, kl=kl, vq=vq, batch_size=4, progress=False)
    finally:
        del vq.encode
    assert len(calls) == 3     # two calls a batch (image, flip): it died in the second batch
    key = token_cache_key(shapes, kl, vq)[0]
    assert not is_complete(cache_path(tmp_path, key)) and not any(is_complete(p) for p in tmp_path.iterdir())
    assert [p.name for p in cache_path(tmp_path, key).iterdir()] == ["plan.json"]   # the temp shard went
    cache = build_token_cache(shapes, tmp_path, kl=kl, vq=vq, batch_size=4, progress=False)
    assert len(cache) == 12 and is_complete(cache.path, key)
    assert torch.equal(cache.get_batch([0], 0)["codes"][0], vq.encode(shapes[0][0][None])[0])


# One build in a fresh process: tokenizers from safetensors, the generated folder, an optional
# kill (os._exit, no cleanup) when the dataset reaches DIE_AT, and an optional gloo group.
_BUILD = textwrap.dedent("""
    import json, os, sys, torch, d2c
    from safetensors.torch import load_file
    from d2c.data import ImageFolder, build_token_cache
    torch.set_num_threads(1)
    kl, vq = d2c.build("kl_tiny"), d2c.build("vq_tiny")
    kl.load_state_dict(load_file(sys.argv[1]))
    vq.load_state_dict(load_file(sys.argv[2]))
    ds = ImageFolder(sys.argv[3], image_size=32)
    die, get = int(os.environ.get("DIE_AT", -1)), ds.get_or_none
    ds.get_or_none = lambda i: os._exit(9) if i == die else get(i)
    if os.environ.get("GLOO"):
        import torch.distributed as dist
        dist.init_process_group("gloo")
    try:
        c = build_token_cache(ds, sys.argv[4], kl=kl, vq=vq, batch_size=2, shard_size=3, progress=False)
    finally:    # joins gloo's threads: left to interpreter exit, they can abort the process (SIGABRT)
        if os.environ.get("GLOO"):
            dist.destroy_process_group()
    print(json.dumps({"path": str(c.path), "rows": len(c)}))
""")
SHARD_ROWS = 3


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tok):
    """Tokenizer files, the generated folder, and its cache built by one process."""
    kl, vq = tok
    tmp = tmp_path_factory.mktemp("sharded")
    from safetensors.torch import save_file
    save_file(kl.state_dict(), str(tmp / "kl.safetensors"))
    save_file({k: v.contiguous() for k, v in vq.state_dict().items()}, str(tmp / "vq.safetensors"))
    folder = _generated_folder(tmp / "imgs")
    ref = _builds(tmp, [{}], "one")[0]
    return tmp, folder, ref


def _builds(tmp, envs, out):
    """Run one build process per env (together), return their outputs in order."""
    args = [sys.executable, "-c", _BUILD, str(tmp / "kl.safetensors"), str(tmp / "vq.safetensors"),
            str(tmp / "imgs"), str(tmp / out)]
    procs = [subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for env in envs]
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def _cache_bytes(path):
    """Everything a reader sees: meta.json (dataset identity aside) and every shard array's bytes."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    files = {str(f.relative_to(path)): np.load(f).tobytes() for f in sorted(path.glob("shard-*/*.npy"))}
    return meta, files


def test_cache_built_by_two_ranks_equals_one(sharded):
    tmp, folder, (rc, out, err) = sharded
    assert rc == 0, err
    ref = json.loads(out)
    assert ref["rows"] == 12 and "left out 1 unreadable image(s) of 13" in err
    meta, files = _cache_bytes(ref["path"])
    assert meta["num_shards"] == 5 and meta["num_bad"] == 1 and meta["image_size"] == [32, 32]
    assert len(files) == 15          # labels, moments, codes of every shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    gloo = [{"GLOO": "1", "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            for r in range(2)]
    slurm = [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2"} for r in range(2)]   # no process group
    runs = _builds(tmp, gloo, "gloo") + _builds(tmp, slurm, "slurm")
    for rc, out, err in runs:
        assert rc == 0, err
    for name, (_, out, _) in zip(("gloo0", "gloo1", "slurm0", "slurm1"), runs):
        path = json.loads(out)["path"]
        assert Path(path).name == Path(ref["path"]).name, name       # same key
        assert _cache_bytes(path) == (meta, files), name

    # the ranks split the shards: rank r wrote shards r, r + 2, ... (pids differ in the tmp names)
    cache = TokenCache(ref["path"])
    ds = ImageFolder(folder, image_size=32)
    good = [i for i, (p, _) in enumerate(ds.samples) if not p.endswith("img99.jpg")]
    assert cache.labels.tolist() == [ds.samples[i][1] for i in good]


def test_cache_rank0_failure_reaches_every_rank(tmp_path, sharded, tok):
    """In a process group, rank 0's failure to complete the cache (here meta.json cannot be
    written: a folder holds its name) stops the other rank too, with a line saying so, instead
    of leaving it at a barrier forever."""
    tmp, folder, _ = sharded
    kl, vq = tok
    key, _ = token_cache_key(ImageFolder(folder, image_size=32), kl, vq)
    (cache_path(tmp_path / "out", key) / "meta.json").mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    args = [sys.executable, "-c", _BUILD, str(tmp / "kl.safetensors"), str(tmp / "vq.safetensors"), str(folder),
            str(tmp_path / "out")]
    procs = [subprocess.Popen(args, env={**os.environ, "GLOO": "1", "RANK": str(r), "WORLD_SIZE": "2",
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [1, 1], errs
    assert "meta.json" in errs[0].strip().splitlines()[-1]
    assert "rank 0 failed to complete the shared output" in errs[1].strip().splitlines()[-1]
    assert len(list(cache_path(tmp_path / "out", key).glob("shard-*"))) == 5     # the shards stay for a rerun


def test_cache_killed_midway_resumes_to_the_same_cache(sharded):
    tmp, _, (_, out, _) = sharded
    ref = json.loads(out)["path"]
    rc, _, err = _builds(tmp, [{"DIE_AT": "7"}], "killed")[0]     # dies in shard 2 (rows 6..8)
    assert rc == 9, err
    part = tmp / "killed" / Path(ref).name
    assert not is_complete(part)
    assert sorted(p.name for p in part.iterdir() if not p.name.startswith(".tmp-shard-00002-")) == \
        ["plan.json", "shard-00000", "shard-00001"]
    stamps = {s: (part / s / "shard.json").stat().st_mtime_ns for s in ("shard-00000", "shard-00001")}

    rc, out, err = _builds(tmp, [{}], "killed")[0]
    assert rc == 0, err
    assert json.loads(out)["path"] == str(part) and is_complete(part)
    assert {s: (part / s / "shard.json").stat().st_mtime_ns for s in stamps} == stamps   # kept, not rebuilt
    assert not list(part.glob(".tmp-*"))                                                 # the dead temp went
    assert _cache_bytes(part) == _cache_bytes(ref)


def test_cache_from_imagefolder_leaves_out_bad(tmp_path, tok):
    kl, vq = tok
    root = tmp_path / "imgs"
    for k in range(5):
        _write_png(root / f"c{k % 2}" / f"{k}.png",
                   np.random.default_rng(k).integers(0, 256, (40 + k, 50, 3), dtype=np.uint8))
    (root / "c1" / "bad.png").write_bytes(b"\x89PNG broken")
    ds = ImageFolder(root, image_size=32)
    with pytest.warns(UserWarning, match="left out 1 unreadable image"), pytest.warns(BadImageWarning):
        cache = build_token_cache(ds, tmp_path / "cache", kl=kl, vq=vq, batch_size=4, progress=False)
    assert len(cache) == 5 and cache.meta["num_bad"] == 1 and cache.meta["classes"] == ["c0", "c1"]
    good = [i for i in range(len(ds)) if not ds.samples[i][0].endswith("bad.png")]
    x = torch.stack([ds[i][0] for i in good])
    b = cache.get_batch(torch.arange(5), 1)
    assert b["labels"].tolist() == [ds.samples[i][1] for i in good]
    with torch.no_grad():
        assert torch.allclose(b["moments"], kl.encode_moments(torch.flip(x, dims=[3])), atol=1e-5)
    with pytest.raises(IndexError):
        cache.get_batch([5], 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = build_token_cache(ds, tmp_path / "cache", kl=kl, vq=vq, batch_size=4, progress=False)
    assert again.path == cache.path


def test_cache_errors(tmp_path, tok, shapes):
    kl, _ = tok
    with pytest.raises(CacheError, match="at least one tokenizer"):
        build_token_cache(shapes, tmp_path, batch_size=8)
    with pytest.raises(CacheError, match="moments_dtype='bfloat16'"):
        build_token_cache(shapes, tmp_path, kl=kl, moments_dtype="bfloat16")
    with pytest.raises(CacheError, match="not a complete token cache"):
        TokenCache(tmp_path)
    half = build_token_cache(ShapesDataset(n=4, seed=0, size=16), tmp_path, kl=kl, batch_size=4,
                             progress=False, moments_dtype="float16")
    assert half.shards["moments"][0].dtype == np.float16 and half.get_batch([0], 0)["moments"].dtype == torch.float32
    with pytest.raises(CacheError, match="shard_size=0"):
        build_token_cache(shapes, tmp_path, kl=kl, shard_size=0)

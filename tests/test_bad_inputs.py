"""Reliability, bad inputs and security (crash safety, non-finite losses and determinism:
test_reliability.py): corrupt images, damaged checkpoints and statistics, out-of-range labels and
user errors at the CLI are loud (one line, a d2c error type, exit 2), and crafted pickles are
refused before they run."""
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import d2c
from d2c.checkpoint import CheckpointError, load_state_dict_file, save_safetensors
from d2c.errors import NonFiniteLoss
from d2c.train import train
from test_reliability import ENV, ROOT, one_line, src, train_config


# =============================================================================== 1. bad inputs


def _png(path, arr):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_corrupt_images_skip_counts_or_error(tmp_path):
    from d2c.data.imagefolder import BadImageWarning, DataConfig, DataError, build_dataset
    for c in ("a", "b"):
        _png(tmp_path / c / "ok.png", np.full((20, 20, 3), 100, np.uint8))
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    with pytest.warns(BadImageWarning, match="skipping unreadable image"):
        ds = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8))
        got = [ds.get_or_none(i) for i in range(len(ds))]
    assert ds.num_bad == 1 and sum(g is None for g in got) == 1
    ds = build_dataset(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, on_bad="error"))
    with pytest.raises(DataError) as e:
        [ds[i] for i in range(len(ds))]
    one_line(e, "unreadable image", "broken.jpg")
    with pytest.raises(DataError) as e:
        build_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    one_line(e, "does not exist", "missing")


def test_wrong_model_checkpoint_names_key_and_shapes(tmp_path):
    save_safetensors(d2c.build("gpt_tiny", dim=128, n_head=4), tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError) as e:
        d2c.load_pretrained("gpt_tiny", tmp_path / "w.safetensors")
    assert re.search(r"shape mismatch at \S+: checkpoint \(\d+, 128\) vs model \(\d+, 64\)", one_line(e))
    save_safetensors(d2c.build("vq_tiny"), tmp_path / "vq.safetensors")
    with pytest.raises(CheckpointError) as e:
        d2c.load_pretrained("gpt_tiny", tmp_path / "vq.safetensors")
    one_line(e, "keys do not match", "missing [", "unexpected [")


def test_truncated_or_garbage_checkpoints_are_one_line(tmp_path):
    save_safetensors(d2c.build("gpt_tiny"), tmp_path / "w.safetensors")
    blob = (tmp_path / "w.safetensors").read_bytes()
    for name, data in (("cut.safetensors", blob[: len(blob) // 2]), ("head.safetensors", blob[:5]),
                       ("zero.safetensors", b""), ("junk.pt", b"\x80\x04junk" * 20)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as e:
            load_state_dict_file(tmp_path / name)
        one_line(e, name)
    torch.save({"model": d2c.build("gpt_tiny").state_dict()}, tmp_path / "w.pt")
    blob = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError) as e:
        load_state_dict_file(tmp_path / "cut.pt")
    one_line(e, "cut.pt", "not a readable checkpoint")


def test_damaged_checkpoint_in_a_run_is_named_and_older_ones_kept(tmp_path):
    run = tmp_path / "r"
    train(train_config(), src(), run)
    f = run / "step_0000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])          # outside damage (bad disk, partial copy)
    with pytest.raises(CheckpointError) as e:
        train(train_config(train_steps=6), src(), run)
    one_line(e, "cannot resume", "step_0000004", "move", "step_0000002")
    assert (run / "step_0000002" / "state.pt").is_file()


def test_bad_reference_statistics_are_one_line(tmp_path):
    from d2c.metrics import MetricsError
    from d2c.metrics.fidelity import _load_stats
    cases = {"keys.npz": dict(mean=np.zeros(4), cov=np.eye(4)), "shape.npz": dict(mu=np.zeros(4), sigma=np.eye(3)),
             "nan.npz": dict(mu=np.full(4, np.nan), sigma=np.eye(4))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    np.savez(tmp_path / "ok.npz", mu=np.zeros(4), sigma=np.eye(4))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:200])
    for name, needle in (("keys.npz", "wrong keys"), ("shape.npz", "wrong shapes"), ("nan.npz", "NaN"),
                         ("cut.npz", "unreadable"), ("none.npz", "missing")):
        with pytest.raises(MetricsError) as e:
            _load_stats(tmp_path / name, 4)
        one_line(e, name, needle)
    with pytest.raises(MetricsError) as e:
        _load_stats(tmp_path / "ok.npz", 8)        # statistics of another feature extractor
    one_line(e, "wrong shapes")


def test_out_of_range_labels_and_ids_at_the_api():
    from d2c.sampling import SamplerConfig, d2c_sample
    gpt, vq = d2c.build("gpt_tiny").eval(), d2c.build("vq_tiny").eval()
    mar, kl = d2c.build("mar_tiny", fusion="qformer").eval(), d2c.build("kl_tiny").eval()
    for labels in ([0, 10], [-1]):
        for models in (dict(gpt=gpt, vq=vq), dict(mar=mar, kl=kl), dict(gpt=gpt, mar=mar, kl=kl)):
            with pytest.raises(ValueError) as e:
                d2c_sample(labels, models, SamplerConfig(steps=2))
            one_line(e, "labels must be in [0, 9]")
    with pytest.raises(ValueError) as e:
        gpt(torch.full((1, 64), 512), torch.tensor([0]))
    one_line(e, "[0, 511]")
    with pytest.raises(ValueError) as e:
        mar.train()(torch.randn(1, 4, 8, 8), torch.tensor([0]), codes=torch.full((1, 64), 600))
    one_line(e, "600")


def test_user_errors_exit_2_with_one_line(tmp_path):
    """CLI contract: `error: <one line>` on stderr, exit status 2, no traceback."""
    for args in (["-m", "d2c.demo", "--steps", "0", "--out", str(tmp_path / "demo")],
                 [str(ROOT / "ablations" / "run.py"), f"results_dir={tmp_path / 'p'}", "model=mar,nope"],
                 [str(ROOT / "ablations" / "run.py"), f"results_dir={tmp_path / 'p'}", "-m", "steps=8,x"]):
        p = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, p.stderr)
    assert not (tmp_path / "p").exists() and not (tmp_path / "demo").exists()   # failed before any work


def test_exit_on_user_error_covers_d2c_error_types(capsys, monkeypatch):
    from d2c.cli import exit_on_user_error
    from d2c.data.cache import CacheError
    from d2c.data.imagefolder import DataError
    from d2c.metrics import MetricsError
    monkeypatch.delenv("D2C_TRACEBACK", raising=False)
    for exc in (CheckpointError("a.safetensors: bad"), DataError("x"), MetricsError("y"), CacheError("z"),
                ValueError("steps=0; allowed: integers >= 1"), NonFiniteLoss("nan at step 3"),
                FileNotFoundError(2, "No such file", "ckpt"), ValueError("two\nlines")):
        with pytest.raises(SystemExit) as e, exit_on_user_error():
            raise exc
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    with pytest.raises(KeyError), exit_on_user_error():   # a bug keeps its traceback
        raise KeyError("bug")


# ================================================================================= 2. security


class _Evil:
    """Unpickling this runs code that writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_crafted_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    sd = d2c.build("gpt_tiny").state_dict()
    torch.save({"model": sd, "hook": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as e:
        d2c.load_pretrained("gpt_tiny", tmp_path / "evil.pt")
    one_line(e, "evil.pt", "refused")
    assert not marker.exists()
    # the same payload as a run's state.pt: resuming refuses it too
    run = tmp_path / "r"
    train(train_config(), src(), run)
    torch.save({"step": 4, "optimizer": _Evil(marker)}, run / "step_0000004" / "state.pt")
    with pytest.raises(CheckpointError) as e:
        train(train_config(train_steps=6), src(), run)
    one_line(e, "state.pt", "refused")
    # and as an object array in reference statistics (np.load allow_pickle=False)
    from d2c.metrics import MetricsError
    from d2c.metrics.fidelity import _load_stats
    arr = np.empty(1, dtype=object)
    arr[0] = _Evil(marker)
    np.savez(tmp_path / "evil.npz", mu=arr, sigma=np.eye(1))
    with pytest.raises(MetricsError) as e:
        _load_stats(tmp_path / "evil.npz", None)
    one_line(e, "evil.npz")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Evil(marker)))      # control: the payload does work when unpickled
    assert marker.exists()


def test_no_unsafe_deserialisation_in_the_code():
    """Static audit: every torch.load in our code passes weights_only=True; no pickle loads,
    allow_pickle=True or weights_only=False anywhere."""
    bad = []
    for base in ("core", "ablations", "reports", "bench", "slurm"):
        for f in (ROOT / base).rglob("*.py"):
            text = f.read_text(errors="replace")
            for m in re.finditer(r"torch\.load\(", text):
                depth, i = 1, m.end()             # the whole call, nested parentheses included
                while depth and i < len(text):
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                if "weights_only=True" not in text[m.end():i]:
                    bad.append(f"{f.relative_to(ROOT)}: {text[m.start():i]}")
            for pat in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False",
                        r"yaml\.load\((?![^)]*SafeLoader)", r"yaml\.unsafe_load"):
                bad += [f"{f.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pat, text)]
    assert not bad, bad

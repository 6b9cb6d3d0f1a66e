"""d2c-sample's arguments: each bad one is one line and exit 2 before a model is built or a
file written, a corrected rerun into the same folder works, and a grid of chosen classes comes
from public files as LlamaGen's sample_c2i.py gives it."""
import pytest
import torch

import d2c
from d2c.commands import sample_main


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    d = tmp_path_factory.mktemp("public")
    torch.manual_seed(0)
    torch.save({"model": d2c.build("gpt_tiny").state_dict()}, d / "c2i.pt")
    mar = d2c.build("mar_tiny").state_dict()
    torch.save({"model": mar, "model_ema": mar}, d / "checkpoint-last.pth")
    torch.save({"model": d2c.build("kl_tiny").state_dict()}, d / "kl16.ckpt")
    torch.save({"model": d2c.build("vq_tiny").state_dict()}, d / "vq.pt")
    return d


def _mar(d):
    return ["--mar", str(d / "checkpoint-last.pth"), "--mar-preset", "mar_tiny", "--kl", str(d / "kl16.ckpt"),
            "--kl-preset", "kl_tiny"]


def _run(args, capsys, monkeypatch):
    import d2c.commands as commands
    built = []
    real = commands.load_model
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    try:
        sample_main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()], built


def test_every_bad_argument_is_one_line_before_anything_is_built(public, tmp_path, capsys, monkeypatch):
    d, out = public, tmp_path / "eval"
    small = ["--num-images", "4", "--batch-size", "2", "--steps", "2", "--out", str(out)]
    cases = [
        (["--precision", "bogus"], "precision=bogus: allowed: auto, bf16, fp32"),
        (["--steps", "0"], "steps=0: allowed:"),
        (["--num-images", "0"], "--num-images 0; allowed: integers >= 1"),
        (["--kl", str(d / "nowhere.ckpt")], "--kl " + str(d / "nowhere.ckpt") + ": no such file or folder"),
        (["--kl", str(d / "vq.pt")], "vq.pt"),                              # a VQ file as the KL tokenizer
        (["--mar-preset", "mar_base"], "checkpoint-last.pth"),              # the file is not MAR-B
        (["--gpt", str(d / "c2i.pt"), "--gpt-preset", "gpt_tiny"], "--gpt with a plain MAR"),
        (["--classes", "3,5"], "--classes and --grid go together"),
        (["--classes", "3,10", "--grid", str(tmp_path / "g.png")], "--classes 3,10: allowed: ids in 0..9"),
        (["--classes", "a", "--grid", str(tmp_path / "g.png")], "allowed: comma-separated class ids"),
        (["--classes", "3", "--grid", str(tmp_path / "g.jpg")], "allowed: a .png path"),
    ]
    for extra, needle in cases:
        args = _mar(d) + small
        for i in range(0, len(extra), 2):       # an extra flag replaces the same flag of the base
            if extra[i] in args:
                j = args.index(extra[i])
                del args[j:j + 2]
        code, err, built = _run(args + extra, capsys, monkeypatch)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (extra, err)
        assert built == [] and not out.exists() and not (tmp_path / "g.png").exists(), extra
    # the corrected command into the same folder runs
    code, err, built = _run(_mar(d) + small, capsys, monkeypatch)
    assert code == 0 and built == ["mar", "kl"] and (out / "samples.npz").is_file(), err


def test_grid_of_chosen_classes(public, tmp_path, capsys, monkeypatch):
    from PIL import Image
    d = public
    for family, extra in {"mar": _mar(d),
                          "llamagen": ["--gpt", str(d / "c2i.pt"), "--gpt-preset", "gpt_tiny", "--vq", str(d / "vq.pt"),
                                       "--vq-preset", "vq_tiny"]}.items():
        grid = tmp_path / f"{family}.png"
        code, err, _ = _run(extra + ["--classes", "1,7,3", "--grid", str(grid), "--per-class", "2", "--steps", "2",
                                     "--batch-size", "4"], capsys, monkeypatch)
        assert code == 0, err
        img = torch.from_numpy(__import__("numpy").array(Image.open(grid)))
        assert tuple(img.shape) == (3 * 34 + 2, 2 * 34 + 2, 3), family   # 3 rows of 2 (32 px, padding 2)
        tiles = [img[2 + 34 * r:34 * (r + 1), 2 + 34 * c:34 * (c + 1)] for r in range(3) for c in range(2)]
        assert len({t.sum().item() for t in tiles}) > 1, family                   # six images, not one
    # the grid is what the library samples for those labels and seeds
    from d2c.commands import load_model, sample_grid
    from d2c.sampling import SamplerConfig
    models = {k: load_model(k, d / f, p, "cpu") for k, f, p in (("mar", "checkpoint-last.pth", "mar_tiny"),
                                                                   ("kl", "kl16.ckpt", "kl_tiny"))}
    again = sample_grid(models, [1, 7, 3], SamplerConfig(steps=2), tmp_path / "again.png", per_class=2, batch_size=4)
    assert Image.open(again).tobytes() == Image.open(tmp_path / "mar.png").tobytes()

"""What a cluster user meets when installing: ranges not pins, every import declared, the core
package working without the harness extra, console scripts."""
import os
import re
import shutil
import subprocess
import sys
try:
    import tomllib
except ModuleNotFoundError:                   # Python 3.10
    from pip._vendor import tomli as tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower()


def test_dependencies_are_ranges_and_constraints_hold_the_pins():
    reqs = PROJECT["dependencies"] + sum(PROJECT["optional-dependencies"].values(), [])
    assert not [r for r in reqs if "==" in r], "exact pins belong in constraints.txt"
    pins = {_name(ln): ln for ln in (ROOT / "constraints.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}
    assert {"torch", "torchvision"} <= set(pins) and all("==" in p for p in pins.values())
    core = {_name(r): r for r in PROJECT["dependencies"]}
    assert core["torch"].startswith("torch>=") and core["torchvision"].startswith("torchvision>=")


def test_every_third_party_import_is_declared():
    import_to_dist = {"PIL": "pillow", "yaml": "omegaconf", "torch_fidelity": "torch-fidelity",
                      "hydra": "hydra-core", "markdown": "markdown"}
    declared = {_name(r) for r in PROJECT["dependencies"] + sum(PROJECT["optional-dependencies"].values(), [])}
    stdlib = set(sys.stdlib_module_names)
    own = {"d2c", "d2c_ablations", "d2c_reports", "d2c_harness", "hydra_plugins", "conftest", "test_reliability",
           "test_train", "test_ablations"}
    seen = set()
    for folder in ("core", "ablations", "reports"):
        for f in (ROOT / folder).rglob("*.py"):
            for m in re.finditer(r"^\s*(?:from|import) ([A-Za-z_]\w*)", f.read_text(), re.M):
                seen.add(m.group(1))
    third = {m for m in seen - stdlib - own if m not in ("triton",)}   # triton ships with torch
    missing = {m for m in third if import_to_dist.get(m, m).lower().replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_every_package_is_listed():
    """pyproject lists the packages (three source folders); a new subpackage must be added there."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(f.parent.relative_to(ROOT / "core").parts) for f in (ROOT / "core").rglob("__init__.py")
             if "egg-info" not in str(f)}
    for name, folder in (("d2c_ablations", "ablations"), ("d2c_reports", "reports")):
        assert setup["package-dir"][name] == folder
        found |= {".".join((name, *f.parent.relative_to(ROOT / folder).parts)) for f in (ROOT / folder).glob("*/__init__.py")
                  if f.parent.name != "d2c_ablations"} | {name}
    assert found == set(setup["packages"])


def test_console_scripts_exist_and_answer_help():
    assert PROJECT["scripts"] == {"d2c-demo": "d2c.demo:main", "d2c-sweep": "d2c_ablations.run:main",
                                  "d2c-report": "d2c_reports.make_tables:main",
                                  "d2c-sample": "d2c.commands:sample_main", "d2c-evaluate": "d2c.commands:evaluate_main",
                                  "d2c-train": "d2c_ablations.run:train_main"}
    bin_dir = Path(sys.executable).parent
    for name in PROJECT["scripts"]:
        exe = bin_dir / name
        assert exe.is_file(), f"{exe}: not installed (make install)"
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr
    for module in ("d2c.demo", "d2c_ablations", "d2c_reports", "d2c.commands"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), (module, out.stderr[-2000:])


@pytest.mark.slow
def test_core_install_without_extras_runs_the_demo_and_names_the_extra(tmp_path):
    """A fresh venv with `pip install -c constraints.txt .` (no extras): the demo runs; metrics
    stop with one line naming the extra."""
    src = tmp_path / "src"                  # a copy: setuptools builds in the source tree
    for folder in ("core", "ablations", "reports"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for f in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / f, src / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(src / "constraints.txt"), str(src)],
                   check=True, timeout=1200, env=env, cwd=tmp_path)
    listed = subprocess.run([str(py), "-m", "pip", "list"], capture_output=True, text=True, check=True).stdout
    assert "torch-fidelity" not in listed.lower() and "hydra" not in listed.lower()
    demo = subprocess.run([str(venv / "bin" / "d2c-demo"), "--out", str(tmp_path / "demo"), "--num-images", "4",
                           "--steps", "2"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert sorted(p.name for p in (tmp_path / "demo").glob("*.png")) == ["d2c_qformer.png", "llamagen.png", "mar.png"]
    code = ("import torch, d2c.metrics as m\nfrom d2c.cli import exit_on_user_error\n"
            "with exit_on_user_error():\n    m.compute_metrics(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))\n")
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "torch_fidelity" in out.stderr and "d2c[harness]" in out.stderr
    for script in ("d2c-sweep", "d2c-report"):   # installed, and they name the extra they need
        out = subprocess.run([str(venv / "bin" / script), "--help"], capture_output=True, text=True, timeout=300,
                             env=env, cwd=tmp_path)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "d2c[harness]" in out.stderr, out.stderr

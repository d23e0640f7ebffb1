"""The package as a user installs it: a wheel built from this tree, installed into a fresh virtual environment,
trains the tiny model from another directory with the packaged recipe and DeepSpeed config."""
import os
import shutil
import subprocess
import sys

from helpers import EVAL, REPO, SAMPLE, TINY, read_metrics

SCRIPTS = ("qwen-moe-ft-train", "qwen-moe-ft-bench", "qwen-moe-ft-memory", "qwen-moe-ft-plot")


def run(*command, cwd, env=None):
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_wheel_in_a_fresh_venv_trains_the_tiny_model(tmp_path):
    # a copy of what the wheel is built from, so the build leaves no build/ or egg-info in the tree
    source = tmp_path / "source"
    shutil.copytree(REPO / "qwen_moe_ft", source / "qwen_moe_ft", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
        "-w", str(tmp_path / "wheel"), cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("qwen_moe_ft-*.whl")
    # the dependencies (torch above all) are this interpreter's; the venv adds only the package
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv), cwd=tmp_path)
    python = venv / "bin" / "python"
    run(str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel), cwd=tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    where = run(str(python), "-c", "import qwen_moe_ft; print(qwen_moe_ft.__file__)", cwd=elsewhere, env=env)
    assert where.startswith(str(venv)), where
    assert all((venv / "bin" / script).is_file() for script in SCRIPTS)

    out = elsewhere / "run"
    stdout = run(str(venv / "bin" / "qwen-moe-ft-train"), "--config", "tiny-packed", "--model", str(TINY),
                 "--data", str(SAMPLE), "--eval-data", str(EVAL), "--max-steps", "3", "--output-dir", str(out),
                 "--progress-bar", "false", cwd=elsewhere, env=env)
    assert [m["step"] for m in read_metrics(out) if "eval_loss" not in m] == [1, 2, 3], stdout
    assert (out / "hf" / "model.safetensors").is_file()
    # Qwen3-30B-A3B's config.json ships with the package: the estimate needs no clone and no download
    stdout = run(str(venv / "bin" / "qwen-moe-ft-memory"), "--config", "qwen3-30b-a3b-packed", "--gpus", "8",
                 cwd=elsewhere, env=env)
    assert stdout.startswith(str(venv)) and ": 48 layers, full fine-tuning, 8 GPUs" in stdout, stdout

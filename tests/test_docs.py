"""What a new user runs first: the README's commands and quickstart, the demo, the notebooks."""
import os
import re
import subprocess
import sys

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
# the thread settings the suite started with, which the subprocesses below inherit
THREAD_ENVIRON = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@pytest.fixture(autouse=True)
def environment_as_at_start():
    """Earlier tests leave the thread settings as they found them (a dask cluster's
    nanny once left them at 1, and every notebook ran on one thread)."""
    assert {k: os.environ.get(k) for k in THREAD_ENVIRON} == THREAD_ENVIRON


def test_readme_set_up_is_two_commands_that_ci_runs():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith("pip install") and "[test]" in block[0]
    assert "pytest" in block[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "README.md" in ci and 'bash -c "${setup[0]}"' in ci and 'bash -c "${setup[1]}"' in ci


def test_readme_says_what_the_install_downloads():
    # the torch pin of the test extra is the one the README tells users how to take as a CPU build
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    pin = re.search(r'"(torch==[0-9.]+)"', pyproject).group(1)
    assert f"pip install {pin} --index-url https://download.pytorch.org/whl/cpu" in README
    assert "CUDA build" in README


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out.splitlines()
    # the shapes and the answer the README's comments promise
    assert printed[:3] == ["(1, 118)", "(1, 4, 15, 15)", "['Mary']"]
    assert printed[4] == "(4, 15)"
    assert printed[6] == "When Mary and John went to the store , John gave a book to Mary ."
    assert printed[7] == "When Mary and John went to the store , Mary gave a book to Mary ."
    assert printed[8] == "L2H2"
    assert (tmp_path / "resid_pre.png").stat().st_size > 1000
    assert (tmp_path / "trace.png").stat().st_size > 1000
    assert (tmp_path / "attribution.png").stat().st_size > 1000


def test_demo_command(tmp_path):
    out = tmp_path / "demo.png"
    done = subprocess.run([sys.executable, "-m", "mechscope", "demo", "--model", "small", "--out", str(out),
                           "--facts", "20"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Activation patching" in done.stdout and "Causal tracing" in done.stdout
    # the model solves the task: the clean logit difference is large and positive
    clean = float(re.search(r"clean ([+-][0-9.]+), corrupted", done.stdout).group(1))
    assert clean > 3
    assert out.stat().st_size > 10000


def test_demo_command_real_model(tmp_path):
    """The default demo runs on SmolLM2 (the test extra installs it)."""
    out = tmp_path / "demo.png"
    done = subprocess.run([sys.executable, "-m", "mechscope", "demo", "--out", str(out), "--prompts", "2",
                           "--facts", "3"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "SmolLM2" in done.stdout and "Causal tracing" in done.stdout
    # SmolLM2 solves IOI: the clean logit difference favours the indirect object
    clean, corrupted = (float(x) for x in re.search(r"clean ([+-][0-9.]+), corrupted ([+-][0-9.]+)",
                                                    done.stdout).groups())
    assert clean > 1 and corrupted < clean
    facts = int(re.search(r"of 3 facts \(([0-9]) predicted as expected\)", done.stdout).group(1))
    assert facts == 3
    assert out.stat().st_size > 10000


def test_command_line_help():
    done = subprocess.run([sys.executable, "-m", "mechscope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout
    done = subprocess.run([sys.executable, "-m", "mechscope", "nonsense"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2


# the plots each notebook draws (heatmaps and traces; effects by unit)
MIN_IMAGES = {"activation_patching.ipynb": 5, "mediation.ipynb": 3, "das.ipynb": 2, "smollm2_das.ipynb": 2,
              "experts.ipynb": 4, "sae.ipynb": 4}


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "notebooks")) if n.endswith(".ipynb")))
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= MIN_IMAGES.get(name, 1)  # the plots were drawn

"""Faults: flaky servers, hostile archives, diverging training, a killed stage. Nothing half-done survives."""

import ast
import functools
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from stages import download as download_stage
from stages import lineage
from stages import train as train_stage
from stages.data import ArchiveError, load_dataset
from stages.download import DownloadError, download
from stages.errors import PipelineError
from stages.loop import NonFiniteLoss, pick_device
from stages.params import load_params, resolve_try
from tests.cifar_archive import TOP, batch_files
from tests.conftest import DVC, ROOT, dvc, edit_params, outputs_in, run, tool_env


class FlakyServer:
    """Serves one file on 127.0.0.1, misbehaving as planned: 'drop' (half the body, then close), a status, or 'ok'."""

    def __init__(self, payload, plan):
        self.payload, self.plan, self.requests = payload, list(plan), 0
        flaky = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                flaky.requests += 1
                action = flaky.plan.pop(0) if flaky.plan else "ok"
                if isinstance(action, int):
                    self.send_error(action)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(flaky.payload)))
                self.end_headers()
                body = flaky.payload if action == "ok" else flaky.payload[: len(flaky.payload) // 2]
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/cifar.tar.gz"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(download_stage, "BACKOFF_S", 0.01)


@pytest.fixture
def flaky(small_archive):
    servers = []

    def start(plan):
        servers.append(FlakyServer(small_archive[0].read_bytes(), plan))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.mark.parametrize("plan", [["drop"], [503, 503], [500, "drop", 502]], ids=["dropped", "503-twice", "mixed"])
def test_transient_failures_are_retried_until_the_archive_arrives(tmp_path, small_archive, flaky, no_backoff, plan):
    server = flaky(plan)
    out = tmp_path / "data" / "cifar10"
    download(server.url, small_archive[1], out)
    assert server.requests == len(plan) + 1
    assert len(load_dataset(out).train.labels) == 1000
    assert sorted(p.name for p in out.parent.iterdir()) == ["cifar10"]


def test_a_server_that_keeps_failing_gives_up_cleanly(tmp_path, small_archive, flaky, no_backoff):
    server = flaky(["drop"] * 10)
    out = tmp_path / "data" / "cifar10"
    with pytest.raises(DownloadError, match="after 4 attempts: the transfer ended after"):
        download(server.url, small_archive[1], out)
    assert server.requests == 4
    assert not out.parent.exists()  # data/, made for the download, goes with it


def test_a_client_error_is_not_retried(tmp_path, small_archive, flaky, no_backoff):
    server = flaky([403])
    with pytest.raises(DownloadError, match="HTTP 403"):
        download(server.url, small_archive[1], tmp_path / "data" / "cifar10")
    assert server.requests == 1


@pytest.mark.parametrize("where", ["a folder that does not exist", "a full disk", "a full disk, a small download"])
def test_a_download_that_cannot_be_written_blames_the_disk_not_the_url(tmp_path, small_archive, no_backoff, where):
    if "full" in where and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (Linux's always-full device) on this system")
    path = tmp_path / "gone" / "archive.tar.gz" if where.startswith("a folder") else download_stage.Path("/dev/full")
    # A small download stays in the file's buffer until it is closed: the disk's error shows only then.
    server = FlakyServer(b"x" * 100 if "small" in where else small_archive[0].read_bytes(), plan=[])
    try:
        with pytest.raises(DownloadError, match=f"could not write the download to {path.parent}: ") as raised:
            download_stage.fetch_http(server.url, path)
    finally:
        server.close()
    assert "data.url" not in str(raised.value) and server.requests == 1  # not retried either


def hostile_archive(path, batches):
    """The batches, plus members that try to escape the target folder or point elsewhere."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in [*batches.items(), ("../../escaped", b"x"), ("/tmp/absolute-escape", b"x")]:
            info = tarfile.TarInfo(name if name.startswith(("..", "/")) else f"{TOP}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo(f"{TOP}/data_batch_1")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_traversal_members_and_links_are_never_written_or_followed(tmp_path):
    batches = batch_files()
    del batches["data_batch_1"]  # only the symlink stands in for it
    work = tmp_path / "deep" / "work"
    path = work / "hostile.tar.gz"
    work.mkdir(parents=True)
    md5 = hostile_archive(path, batches)
    with pytest.raises(ArchiveError, match="lacks cifar-10-batches-py/data_batch_1"):
        download(str(path), md5, work / "data" / "cifar10")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()
    assert sorted(p.name for p in work.rglob("*")) == ["hostile.tar.gz"]  # data/, made for the download, went too


def stage(project, *args):
    return run([sys.executable, "-m", *args], cwd=project, check=False)


@pytest.fixture
def downloaded(project, small_archive):
    """A project whose dataset is in place, so training stages can run on their own."""
    download(str(small_archive[0]), small_archive[1], project / "data" / "cifar10")
    return project


def test_a_diverging_loss_stops_the_try_with_epoch_batch_and_lr(downloaded):
    edit_params(downloaded, lambda p: p["tries"]["lenet"].update(lr=1e30))
    assert stage(downloaded, "stages.configure").returncode == 0
    result = stage(downloaded, "stages.train", "lenet")
    assert result.returncode == 1
    assert "lenet: the training loss became nan at epoch 1, batch" in result.stderr
    assert "with lr 1e+30" in result.stderr and "Traceback" not in result.stderr
    assert "Lower its lr (tries.lenet.lr, or train.lr where the try takes train's) and rerun" in result.stderr
    assert not (downloaded / "metrics").exists() and not (downloaded / "models").exists()


def repro_lenet_stopped_at_epoch_2(project, stop, epochs=6, **options):
    """Runs `dvc repro train@lenet` for `epochs` epochs, with Popen's options, and calls stop(the dvc process) once
    epoch 2 is printed; returns its output lines, read to the end: the stage writes there too, and a closed
    pipe would stop it."""
    edit_params(project, lambda p: p["train"].update(epochs=epochs))
    command = [*DVC, "repro", "train@lenet"]  # and the stages before it
    options = {"env": tool_env(), **options}
    repro = subprocess.Popen(command, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             **options)  # fmt: skip
    epoch_2, output = f"epoch  2/{epochs}", []
    for line in repro.stdout:
        output.append(line)
        if line.startswith(epoch_2):
            stop(repro)
    repro.wait()
    assert any(line.startswith(epoch_2) for line in output), "".join(output)  # else nothing was stopped
    return output


@pytest.mark.e2e
def test_a_training_stage_killed_mid_run_leaves_nothing_complete_and_repro_redoes_it(project):
    # dvc and the stage it runs, with no chance to clean up. SIGKILL lands at once, two epochs (about a second)
    # before the stage would write: 4 epochs, which the rerun below trains in full.
    kill = lambda repro: os.killpg(repro.pid, signal.SIGKILL)  # noqa: E731
    repro_lenet_stopped_at_epoch_2(project, kill, epochs=4, start_new_session=True)
    assert not (project / "metrics" / "lenet.json").exists()
    assert not (project / "plots" / "lenet" / "predictions.csv").exists()
    result = dvc("repro", "train@lenet", cwd=project)
    assert "Running stage 'train@lenet'" in result.stdout
    metrics = json.loads((project / "metrics" / "lenet.json").read_text())
    assert metrics["epochs"] == 4 and not list(project.rglob(".*partial*"))
    assert dvc("status", "train@lenet", cwd=project).stdout.strip().endswith("up to date.")


def test_ctrl_c_stops_a_stage_with_one_line_and_ends_it_by_sigint(downloaded):
    edit_params(downloaded, lambda p: p["train"].update(epochs=6))
    assert stage(downloaded, "stages.configure").returncode == 0
    command = [sys.executable, "-m", "stages.train", "lenet"]
    # SIGINT as a terminal leaves it: a process started with it ignored (as from a background job) keeps ignoring it.
    as_in_a_terminal = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    training = subprocess.Popen(command, cwd=downloaded, env=tool_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)  # fmt: skip
    for line in training.stdout:
        if line.startswith("epoch  2/6"):
            training.send_signal(signal.SIGINT)  # what Ctrl-C sends
            break
    assert training.wait() == -signal.SIGINT  # as Python ends on Ctrl-C: a shell loop running it stops too
    assert training.stderr.read() == "interrupted; nothing half-written was kept\n"
    assert not (downloaded / "metrics").exists() and not (downloaded / "models").exists()


# The shells dvc may run a stage with: bash hands over to the stage, /bin/sh (dash on Debian, taken when SHELL
# is unset) stays between them (see stages.lineage.links_up_to_dvc).
SHELLS = {"bash": {"SHELL": shutil.which("bash")}, "sh": {}}


def env_with_shell(shell):
    """tool_env() with SHELL set as SHELLS[shell] gives it: dvc runs its stages with that shell."""
    return {key: value for key, value in tool_env().items() if key != "SHELL"} | SHELLS[shell]


# Where a stage watches the shell between it and dvc, and these tests find processes: Linux's /proc.
NEEDS_PROC = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)")


@pytest.mark.e2e
@pytest.mark.parametrize("shell", ["bash", pytest.param("sh", marks=NEEDS_PROC)])
def test_a_training_stage_stops_without_writing_when_dvc_is_killed_on_its_own(project, shell):
    # SIGTERM to dvc alone, as `kill <pid>` sends it.
    output = repro_lenet_stopped_at_epoch_2(project, lambda repro: repro.terminate(), env=env_with_shell(shell))
    assert "train@lenet: dvc, which ran this stage, has exited; stopped without writing outputs" in "".join(output)
    assert not any(line.startswith("epoch  4/6") for line in output)
    assert not (project / "metrics" / "lenet.json").exists() and not (project / "models" / "lenet.pt").exists()


@pytest.mark.e2e
@NEEDS_PROC
def test_a_training_stage_stops_when_dvc_is_killed_while_torch_loads(project):
    # The seconds before the stage can watch anything: it notes its parents as it starts (stages/lineage.py).
    # With sh between dvc and the stage, as the harder case: both the stage's parent and the shell's are noted.
    dvc("repro", "download", cwd=project)
    repro = subprocess.Popen([*DVC, "repro", "train@lenet"], cwd=project, env=env_with_shell("sh"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not training_that_loads_torch(repro.pid):
        assert repro.poll() is None and time.monotonic() < deadline, "the train stage never started"
        time.sleep(0.01)
    repro.terminate()
    output = repro.stdout.read()  # to the end: the stage writes there too, and ends it when it exits
    repro.wait()
    assert "train@lenet: dvc, which ran this stage, has exited; stopped without writing outputs" in output
    assert not re.search(r"^epoch ", output, re.M)  # stopped before its first epoch
    assert not (project / "metrics" / "lenet.json").exists() and not (project / "models" / "lenet.pt").exists()


def training_that_loads_torch(dvc_pid):
    """Whether a train stage that dvc_pid runs (with or without a shell between) has begun to load torch: its
    own start is behind it, the seconds until it trains are not."""
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_text().split("\0")[:-1]  # sh -c's one argument holds it too
            if arguments[-3:-1] == ["-m", "stages.train"] and dvc_pid in ancestors(int(entry.name), 2):
                return "libtorch" in (entry / "maps").read_text()
        except (OSError, ValueError):  # gone meanwhile, or not a process
            continue
    return False


def ancestors(pid, count):
    parents = [lineage.parent_of(pid)]
    while len(parents) < count and parents[-1] is not None:
        parents.append(lineage.parent_of(parents[-1]))
    return parents


def test_a_stage_notes_its_parents_before_it_loads_torch():
    # Deterministic, where the test above depends on when the kill lands: the notes come first.
    imports = run([sys.executable, "-X", "importtime", "-m", "stages.train", "--help"], cwd=ROOT).stderr
    names = [line.rsplit("|", 1)[1].strip() for line in imports.splitlines() if line.startswith("import time:")]
    first_of_torch = min(k for k, name in enumerate(names) if name.split(".")[0] == "torch")
    assert names.index("stages.lineage") < first_of_torch


@NEEDS_PROC
def test_the_shell_between_dvc_and_a_stage_is_told_apart_and_its_parent_read(tmp_path):
    named_oddly = tmp_path / "sl) eep"  # /proc/<pid>/stat puts the name in parentheses
    named_oddly.symlink_to(shutil.which("sleep"))
    shell = subprocess.Popen(["sh", "-c", "sleep 30; :"])  # `; :` keeps any shell in between, as dash does
    others = [subprocess.Popen([str(named_oddly), "30"]), subprocess.Popen(["sleep", "30"])]
    try:
        assert lineage.runs_a_shell_command(shell.pid, ["30;", ":"])
        assert not lineage.runs_a_shell_command(shell.pid, ["-m", "stages.train", "lenet"])  # not this stage's
        assert not any(lineage.runs_a_shell_command(other.pid, ["30"]) for other in others)
        assert all(lineage.parent_of(child.pid) == os.getpid() for child in [shell, *others])
        assert lineage.parent_of(os.getpid()) == os.getppid()
    finally:
        for child in [shell, *others]:
            child.kill()
            child.wait()
    assert lineage.parent_of(shell.pid) is None  # gone


# pickle's ways in: each runs whatever a file asks for.
UNPICKLERS = {f"{module}.{name}" for module in ("pickle", "_pickle") for name in ("load", "loads", "Unpickler")}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}  # safe with weights_only=True only


def imported_names(tree):
    """{name in the module: the dotted name it stands for}, from its imports (`import pickle as pk`: pk -> pickle)."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:  # `import torch.serialization` binds torch
                bound = alias.asname or alias.name.split(".")[0]
                names[bound] = alias.name if alias.asname else bound
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {alias.asname or alias.name: f"{node.module}.{alias.name}" for alias in node.names}
    return names


def dotted(node, names):
    """The imported dotted name that a name or attribute (pk.loads, load) stands for; None for anything else."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = dotted(node.value, names)
        return base and f"{base}.{node.attr}"
    return None


def is_constant(node, value):
    return isinstance(node, ast.Constant) and node.value is value


def unrestricted_unpickling(tree):
    """Lines of a module that could unpickle anything: pickle's loaders (but as the base of a class that
    overrides find_class), torch.load without weights_only=True, numpy's load with allow_pickle not False."""
    names = imported_names(tree)
    restricted_bases = {
        id(base)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any(getattr(f, "name", "") == "find_class" for f in node.body)
        for base in node.bases
    }
    for node in ast.walk(tree):
        if id(node) not in restricted_bases and dotted(node, names) in UNPICKLERS:
            yield node.lineno
        if isinstance(node, ast.Call):
            called, keywords = dotted(node.func, names), {k.arg: k.value for k in node.keywords}
            if called in TORCH_LOADS and not is_constant(keywords.get("weights_only"), True):
                yield node.lineno
            pickled = keywords.get("allow_pickle")
            if called == "numpy.load" and pickled is not None and not is_constant(pickled, False):
                yield node.lineno


def test_code_never_unpickles_without_restrictions():
    for path in [path for folder in ("stages", "benchmarks", "experiments") for path in (ROOT / folder).glob("*.py")]:
        assert not list(unrestricted_unpickling(ast.parse(path.read_text()))), path


@pytest.mark.parametrize(
    "code, unrestricted",
    [
        ("import pickle\npickle.loads(b'')", True),
        ("import pickle as pk\npk.loads(b'')", True),
        ("import _pickle\n_pickle.load(f)", True),
        ("from pickle import Unpickler\nUnpickler(f).load()", True),
        ("import pickle\nclass Open(pickle.Unpickler):\n    pass", True),
        ("import pickle\nclass Shut(pickle.Unpickler):\n    def find_class(self, module, name):\n        pass", False),
        ("from pickle import Unpickler\nclass Shut(Unpickler):\n    def find_class(self, m, n):\n        pass", False),
        ("import torch\ntorch.load('m.pt')", True),
        ("import torch\ntorch.load('m.pt', weights_only=False)", True),
        ("from torch import load\nload('m.pt')", True),
        ("import torch\ntorch.serialization.load('m.pt')", True),
        ("import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)", False),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", True),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=flag)", True),
        ("import numpy as np\nnp.load('a.npy')", False),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=False)", False),
    ],
)  # fmt: skip
def test_the_unpickling_check_sees_each_way_in_and_lets_safe_loads_be(code, unrestricted):
    assert bool(list(unrestricted_unpickling(ast.parse(code)))) is unrestricted


# What CUDA's and MPS's allocators raise (MPS's as users report it), raised where a training step would raise them.
OUT_OF_MEMORY = [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("MPS backend out of memory (MPS allocated: 7.64 GiB, other allocations: 68.91 GiB, "
                 "max allowed: 88.13 GiB). Tried to allocate 33.92 GiB on private pool."),
]  # fmt: skip


def lenet_whose_epoch_raises(error, tmp_path, monkeypatch, downloaded, **changes):
    """(a call that trains try lenet, with changes to its config, on downloaded's images, its outputs); the
    training epoch raises error."""

    def raising(*args, **kwargs):
        raise error

    monkeypatch.setattr(train_stage, "train_one_epoch", raising)
    params = load_params(downloaded / "params.yaml")
    outputs = outputs_in(tmp_path, "lenet")
    dataset = load_dataset(downloaded / "data" / "cifar10")
    config = {**resolve_try(params, "lenet"), **changes}
    return lambda: train_stage.train(config, params["augment"], dataset, outputs, "lenet"), outputs


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["cuda", "mps"])
def test_running_out_of_gpu_memory_says_so_and_suggests_a_smaller_batch(tmp_path, monkeypatch, downloaded, error):
    train_lenet, outputs = lenet_whose_epoch_raises(error, tmp_path, monkeypatch, downloaded)
    advice = "set a smaller batch_size (tries.lenet.batch_size, or train.batch_size where the try takes train's)"
    with pytest.raises(PipelineError, match=re.escape(f"lenet: out of GPU memory with batch_size 50; {advice}")):
        train_lenet()
    assert not any(path.exists() for path in outputs)


def test_a_device_the_machine_lacks_is_named_with_where_to_change_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PipelineError, match=re.escape("device 'cuda' is not available on this machine; set device")):
        pick_device("cuda")
    assert pick_device("auto").type in ("mps", "cpu")


def test_a_diverging_try_with_muon_names_both_of_its_learning_rates(tmp_path, monkeypatch, downloaded):
    diverged = NonFiniteLoss(batch=7, value=float("inf"))
    train_lenet, outputs = lenet_whose_epoch_raises(diverged, tmp_path, monkeypatch, downloaded, muon_lr=0.5)
    with pytest.raises(PipelineError) as raised:
        train_lenet()
    assert "the training loss became inf at epoch 1, batch 7, with lr 0.001 and muon_lr 0.5;" in str(raised.value)
    assert "Lower its lr or muon_lr (tries.lenet.lr, tries.lenet.muon_lr, or train.lr / train.muon_lr" in str(
        raised.value
    )
    assert not any(path.exists() for path in outputs)


def test_a_run_outside_dvc_leaves_no_earlier_metrics_beside_its_new_model(tmp_path, monkeypatch, downloaded):
    params = load_params(downloaded / "params.yaml")
    outputs = outputs_in(tmp_path, "lenet")
    outputs.metrics.parent.mkdir(parents=True)
    outputs.metrics.write_text('{"val": {"acc": 99.0}}\n')  # an earlier run's, complete

    def disk_full(*args):
        raise OSError("disk full")

    monkeypatch.setattr(train_stage, "write_csv", disk_full)  # after the model, before the metrics
    config = {**resolve_try(params, "lenet"), "epochs": 1}
    with pytest.raises(OSError, match="disk full"):
        train_stage.train(config, None, load_dataset(downloaded / "data" / "cifar10"), outputs, "lenet")
    assert outputs.model.exists() and not outputs.metrics.exists()  # the model is this run's: no metrics vouch for it


def test_another_runtime_error_in_training_is_not_taken_for_running_out_of_memory(tmp_path, monkeypatch, downloaded):
    broken = RuntimeError("mat1 and mat2 shapes cannot be multiplied (100x1250 and 1024x500)")
    train_lenet, _ = lenet_whose_epoch_raises(broken, tmp_path, monkeypatch, downloaded)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train_lenet()

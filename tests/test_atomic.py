"""Every file ogpsa writes is written atomically, and malformed state files name file and field
(issue 23 item 4).

Killed writers are real: a subprocess is stopped with SIGKILL while it is inside the write
(after the new bytes went to the temporary file, before the rename), and an exception is
injected mid-write in-process. Afterwards the old file must be intact and the directory must
hold no temporary file.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import ogpsa
from ogpsa import atomic
from ogpsa.integrations.common import STATE_FILE, SUBSPACE_FILE
from ogpsa.state_file import StateFileError, read_state


def _subspace(seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = [{"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g)} for _ in range(2)]
    return ogpsa.Subspace.from_gradients(grads, ogpsa.OGPSAConfig())


def _killed_while_writing(code: str, tmp_path, named_fallback: bool = False) -> None:
    """Run ``code`` in a subprocess whose fsync (called after the data is written, before the
    rename) announces itself and blocks; SIGKILL it there."""
    prelude = textwrap.dedent(f"""
        import os, sys, time
        import ogpsa.atomic as atomic
        if {named_fallback!r}:
            atomic._unnamed_temp = lambda directory: None   # the named-temporary-file path
        def blocking_fsync(fd):
            print("writing", flush=True)
            time.sleep(120)
        os.fsync = blocking_fsync
    """)
    proc = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline()
        assert line.strip() == "writing", (line, proc.stderr.read() if proc.poll() is not None else "")
        # the temporary file exists now and holds the new bytes (named path: visible in the directory)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _leftovers(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith(".") or n.endswith((".tmp", atomic.TMP_SUFFIX)))


def test_write_replaces_and_leaves_nothing(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["f.json"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic.write_text(tmp_path / "missing" / "x", "y")
    with pytest.raises(ValueError, match="mode"):
        with atomic.open_atomic(target, "a"):
            pass


@pytest.mark.parametrize("named", [False, True])
def test_exception_mid_write_keeps_the_old_file(tmp_path, monkeypatch, named):
    if named:
        monkeypatch.setattr(atomic, "_unnamed_temp", lambda directory: None)
    target = tmp_path / "data.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(RuntimeError, match="injected"):
        with atomic.open_atomic(target) as f:
            f.write(b"new, half written")
            raise RuntimeError("injected")
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["data.bin"]


@pytest.mark.parametrize("named", [False, True])
def test_killed_writer_keeps_the_old_file(tmp_path, named):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old contents")
    _killed_while_writing("atomic.write_bytes('data.bin', b'new contents' * 1000)", tmp_path, named)
    assert target.read_bytes() == b"old contents"
    if named:
        # A named temporary file of a killed process survives it; the next write removes it.
        assert len(_leftovers(tmp_path)) == 1
        atomic.write_bytes(tmp_path / "other.bin", b"x")
    assert _leftovers(tmp_path) == []


def test_subspace_save_exception_and_kill(tmp_path, monkeypatch):
    old, new = _subspace(0), _subspace(1)
    path = tmp_path / SUBSPACE_FILE
    old.save(path)
    # exception inside the write (after the temporary file holds part of the data)
    real_open = atomic.open_atomic

    def failing_write_bytes(p, data):
        with real_open(p) as f:
            f.write(data[: len(data) // 2])
            raise OSError("injected: disk full")

    monkeypatch.setattr(atomic, "write_bytes", failing_write_bytes)
    with pytest.raises(OSError, match="injected"):
        new.save(path)
    monkeypatch.undo()
    assert ogpsa.Subspace.load(path).equal(old) and _leftovers(tmp_path) == []
    # killed writer
    torch.save({"sub": None}, tmp_path / "unused.pt")  # a neighbour file that must survive too
    code = f"""
        import torch, ogpsa
        g = torch.Generator().manual_seed(1)
        grads = [{{"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g)}} for _ in range(2)]
        ogpsa.Subspace.from_gradients(grads, ogpsa.OGPSAConfig()).save({str(path)!r})
    """
    for named in (False, True):
        _killed_while_writing(code, tmp_path, named)
        loaded = ogpsa.Subspace.load(path)
        assert loaded.equal(old) and not loaded.equal(new)
        atomic.remove_stale_temporaries(tmp_path)  # what the next write does first
        assert _leftovers(tmp_path) == []


def test_save_pretrained_killed_over_an_existing_checkpoint(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(2)]
    sub = ogpsa.Subspace.from_gradients(grads, ogpsa.OGPSAConfig())
    og = ogpsa.OGPSA(model, opt, subspace=sub, refresh_every=0, progress=False)
    ckpt = tmp_path / "ckpt"
    og.save_pretrained(ckpt)
    state_before = (ckpt / STATE_FILE).read_bytes()
    code = f"""
        import torch, ogpsa
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        og = ogpsa.OGPSA.from_pretrained({str(ckpt)!r}, model, opt, progress=False)
        og.step = 99
        import ogpsa.atomic as a
        a.write_json({str(ckpt / STATE_FILE)!r}, og._schedule())
    """
    _killed_while_writing(code, tmp_path)
    assert (ckpt / STATE_FILE).read_bytes() == state_before
    assert _leftovers(ckpt) == []
    model2 = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    og2 = ogpsa.OGPSA.from_pretrained(ckpt, model2, torch.optim.SGD(model2.parameters(), lr=0.1), progress=False)
    assert og2.subspace.equal(sub) and og2.step == 0


@pytest.mark.parametrize("content, needle", [
    ("", "the file is empty"),
    ("{\"version\": 1, \"step\": 3", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ("{}", "field 'version' is missing"),
    ('{"version": 1, "step": "3", "built_at": 0, "refresh_every": 3, "refresh_steps": [0], "config": {}}',
     "field 'step' is '3', expected an integer >= 0"),
    ('{"version": 1, "step": 3, "built_at": 0, "refresh_every": 3, "refresh_steps": [0, -1], "config": {}}',
     "field 'refresh_steps'"),
    ('{"version": 1, "step": 3, "built_at": 0, "refresh_every": 3, "refresh_steps": [0], "config": {"mode": "x"}}',
     "field 'config' is invalid"),
])
def test_malformed_state_file_names_the_file_and_field(tmp_path, content, needle):
    path = tmp_path / STATE_FILE
    path.write_text(content)
    with pytest.raises(StateFileError) as info:
        read_state(path)
    assert str(path) in str(info.value) and needle in str(info.value), str(info.value)


def test_from_pretrained_reports_a_malformed_state_file(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}]
    og = ogpsa.OGPSA(model, opt, subspace=ogpsa.Subspace.from_gradients(grads, ogpsa.OGPSAConfig()),
                     refresh_every=0, progress=False)
    og.save_pretrained(tmp_path)
    og.remove()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    state["built_at"] = "zero"
    (tmp_path / STATE_FILE).write_text(json.dumps(state))
    with pytest.raises(StateFileError, match=rf"{STATE_FILE}: field 'built_at' is 'zero'"):
        ogpsa.OGPSA.from_pretrained(tmp_path, model, opt, progress=False)
    assert (tmp_path / SUBSPACE_FILE).is_file()


def test_every_writer_in_ogpsa_goes_through_ogpsa_atomic():
    """No module writes an output file directly (open(..., 'w'), write_text, savefig, json.dump...):
    everything goes through ogpsa.atomic. A deliberate exception carries 'atomic-exempt'."""
    import re
    from pathlib import Path

    root = Path(ogpsa.__file__).parent
    direct = re.compile(r"""open\([^)]*["'](w|wb|a|ab|x|w\+)["']|(?<!atomic)\.write_(text|bytes)\(|\.savefig\("""
                        r"""|json\.dump\(|save_file\(|torch\.save\(""")
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "atomic.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if direct.search(line) and "atomic-exempt" not in line and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "write these with ogpsa.atomic:\n" + "\n".join(offenders)


def test_save_figure_is_atomic(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    target = tmp_path / "plot.png"
    target.write_bytes(b"old png")
    atomic.save_figure(fig, target, dpi=50)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["plot.png"]

    class Broken:
        def savefig(self, f, **kw):
            f.write(b"\x89PNG half")
            raise RuntimeError("renderer failed")

    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="renderer failed"):
        atomic.save_figure(Broken(), target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["plot.png"]
    plt.close(fig)


def test_stale_temporaries_of_this_host_only_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f".f.bin.{atomic._host()}.{dead.pid}.abcd{atomic.TMP_SUFFIX}"
    live = tmp_path / f".f.bin.{atomic._host()}.{os.getpid()}.abcd{atomic.TMP_SUFFIX}"
    other = tmp_path / f".f.bin.some-other-node.{dead.pid}.abcd{atomic.TMP_SUFFIX}"
    for p in (mine, live, other):
        p.write_bytes(b"partial")
    assert atomic.remove_stale_temporaries(tmp_path) == [str(mine)]
    assert live.exists() and other.exists()  # a running writer's, and a file of another machine sharing the disk


def test_a_new_basis_next_to_an_old_schedule_is_detected(tmp_path):
    """save_pretrained replaces two files one after the other; killed between them, the new basis
    sits next to the old schedule. The schedule names its basis by checksum: loading says so."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(6)
    grads = [{n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()} for _ in range(2)]
    og = ogpsa.OGPSA(model, opt, subspace=ogpsa.Subspace.from_gradients(grads[:1], ogpsa.OGPSAConfig()),
                     refresh_every=0, progress=False)
    og.save_pretrained(tmp_path)
    og.remove()
    assert len(json.loads((tmp_path / STATE_FILE).read_text())["subspace_sha256"]) == 64
    ogpsa.OGPSA.from_pretrained(tmp_path, model, opt, progress=False).remove()  # a consistent pair loads
    ogpsa.Subspace.from_gradients(grads, ogpsa.OGPSAConfig()).save(tmp_path / SUBSPACE_FILE)  # only the basis
    with pytest.raises(StateFileError, match=r"field 'subspace_sha256' does not match .*ogpsa_subspace"):
        ogpsa.OGPSA.from_pretrained(tmp_path, model, opt, progress=False)
    deferred = ogpsa.OGPSA.deferred(subspace=None, refresh_every=0, reference=[["x"]])
    deferred.model = model
    with pytest.raises(StateFileError, match="subspace_sha256"):
        deferred._load_checkpoint(str(tmp_path))  # the trainers' resume path

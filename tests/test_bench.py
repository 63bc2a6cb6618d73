"""The benchmarks' one door (`python -m bench list / run`) and their one result writer.

No model loads: the CLI runs in subprocesses from the repository root, and the one script it
runs (compare_revisions.py --help) imports only the standard library."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _load(name: str):
    """bench/NAME.py as a module, without putting the repository root on sys.path (its app/,
    engine/ ... folders would shadow nothing today, but the tests import ccm_chat only)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


machine = _load("machine")
discover = _load("registry").discover


def bench_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def expected_names() -> set[str]:
    """Found independently of the registry: a .py with a main block, every gpu_*.sh."""
    own = {"__init__", "__main__", "registry"}
    py = {p.stem for p in BENCH.glob("*.py") if p.stem not in own
          and "__name__ == \"__main__\"" in p.read_text(encoding="utf-8")}
    sh = {p.stem for p in BENCH.glob("gpu_*.sh")}
    return py | sh


def test_list_names_every_script_with_a_main_and_every_gpu_sh() -> None:
    done = bench_cli("list", "--json")
    assert done.returncode == 0, done.stderr
    listed = {row["name"] for row in json.loads(done.stdout)}
    missing = expected_names() - listed
    assert not missing, f"python -m bench list misses {sorted(missing)}"
    assert not {"machine", "plots", "scoring"} & listed  # helpers without a main
    text = bench_cli("list")
    assert text.returncode == 0, text.stderr
    for name in expected_names():
        assert any(line.startswith(name + " ") for line in text.stdout.splitlines()), name


def test_list_rows_say_description_gpu_and_results() -> None:
    rows = {row["name"]: row for row in json.loads(bench_cli("list", "--json").stdout)}
    assert rows["decode_speed"]["description"].startswith("Decode speed")
    assert rows["decode_speed"]["writes"] == ["bench/results/decode_speed.json"]
    assert "decode_speed_cpu.json" in rows["decode_speed"]["results"]
    assert rows["hf_fast_check"]["gpu"] == "yes" and rows["threads"]["gpu"] == "no"
    assert rows["gpu_stage"]["sourced"] and all(
        r["gpu"] == "yes" for r in rows.values() if r["kind"] == "sh")


def test_discovery_finds_a_new_script_and_skips_helpers(tmp_path: Path) -> None:
    (tmp_path / "new_bench.py").write_text('"""A new one."""\n\nif __name__ == "__main__":\n'
                                           "    pass\n")
    (tmp_path / "helper.py").write_text('"""No main."""\n\ndef f():\n    pass\n')
    (tmp_path / "gpu_new.sh").write_text("#!/usr/bin/env bash\n# On the GPU.\necho hi\n")
    found = discover(tmp_path)
    assert set(found) == {"new_bench", "gpu_new"}
    assert found["new_bench"].description == "A new one."
    assert found["gpu_new"].description == "On the GPU." and found["gpu_new"].gpu == "yes"


def test_run_passes_the_args_through() -> None:
    done = bench_cli("run", "compare_revisions", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: compare_revisions.py" in done.stdout
    assert "--base" in done.stdout


def test_run_of_an_unknown_name_fails_clearly() -> None:
    done = bench_cli("run", "decode_sped")
    assert done.returncode != 0
    assert "no benchmark named 'decode_sped'" in done.stderr
    assert "decode_speed" in done.stderr  # the close match
    assert bench_cli("run").returncode != 0
    assert bench_cli("frobnicate").returncode != 0


def test_writer_records_commit_versions_and_keeps_the_payload(tmp_path: Path) -> None:
    path = machine.write_result(tmp_path / "sub" / "r.json", "cpu",
                                {"rows": [{"level": "off", "tok_s": 1.5}], "n_ctx": 8})
    got = json.loads(path.read_text())
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True)
    if head.returncode == 0:
        assert got["commit"]["hash"] == head.stdout.strip()
        assert isinstance(got["commit"]["dirty"], bool)
    assert {"python", "llama_cpp_python", "torch"} <= set(got["versions"])
    assert got["machine"] == machine.describe("cpu") and got["command"]
    assert got["rows"] == [{"level": "off", "tok_s": 1.5}] and got["n_ctx"] == 8
    # a payload's own machine line (or a merge's first part's) wins over the writer's
    own = json.loads(machine.write_result(tmp_path / "m.json", "cpu", {"machine": "x"},
                                          quiet=True).read_text())
    assert own["machine"] == "x"
    rows = json.loads(machine.write_result(tmp_path / "l.json", "cpu", [1, 2]).read_text())
    assert rows["rows"] == [1, 2]


def test_writer_without_git_takes_bench_commit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(machine, "ROOT", tmp_path)  # no checkout here
    monkeypatch.setenv("BENCH_COMMIT", "abc1234")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert machine.commit() == {"hash": "abc1234", "dirty": None}

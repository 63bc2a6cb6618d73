"""Shared fixtures: a temporary database, a fixed clock, the scripted and the real engine;
and the marks of the fast lane (real_model, subprocess), applied from the code, with a guard."""

from __future__ import annotations

import ast
import functools
import inspect
import multiprocessing.process
import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import llama_cpp
import pytest

from ccm_chat.app.service import ChatService
from ccm_chat.engine import Engine
from ccm_chat.storage import Store
from tests.device import TEST_DEVICE
from tests.helpers import TickingClock, scripted_factory
from tests.scripted_engine import ScriptedEngine

__all__ = ["TickingClock", "scripted_factory"]  # still imported from here by some modules


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the user's real data dir, database or model setting."""
    monkeypatch.setenv("CCM_CHAT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CCM_CHAT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CCM_CHAT_DB", raising=False)
    monkeypatch.delenv("CCM_CHAT_MODEL", raising=False)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path, clock=TickingClock())
    yield s
    s.close()


@pytest.fixture
def scripted() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def service(store: Store, scripted: ScriptedEngine) -> ChatService:
    return ChatService(store, engine_factory=scripted_factory(scripted))


@pytest.fixture(scope="session")
def real_engine() -> Iterator[Engine]:
    """The embedded default model on the CPU, loaded once for the whole run."""
    eng = Engine.load(n_ctx=2048, device=TEST_DEVICE)
    yield eng
    eng.close()


@pytest.fixture
def quick_store(db_path: Path) -> Iterator[Store]:
    """A store that gives up on a lock in a fraction of a second, so the tests stay fast."""
    s = Store(db_path, clock=TickingClock(), timeout=0.2)
    yield s
    s.close()


@pytest.fixture(scope="module")
def long_engine() -> Iterator[Engine]:
    """The default model with room for a message that takes seconds to take in."""
    eng = Engine.load(n_ctx=8192, device=TEST_DEVICE, compression="balanced")
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def hf_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """The embedded default GGUF on the transformers back end (CPU, float32), loaded once.

    The first load converts the GGUF into a cache dir, as the app does under the user's.
    """
    eng = Engine.load(backend="hf", n_ctx=512, device="cpu", compression="balanced",
                      cache_dir=tmp_path_factory.mktemp("hf-cache"), compressor=False)
    yield eng
    eng.close()


# --- The fast lane ---------------------------------------------------------------------------
# `make test-fast` runs `pytest -m "not real_model and not subprocess"`. The marks are applied
# here, from the code each test runs, never by hand: a test is `real_model` when its fixtures
# (item.fixturenames is their transitive closure), its own body, any helper of the test modules
# it calls, or its module's top level loads a model (Engine.load, load_engine, a llama_cpp
# Llama, the app on its real engine factory, the shared real_engine/hf_engine fixtures); it is
# `subprocess` when any of those start a process. A rule that reads code can miss a new way
# in, so a lane that deselects a mark also guards it: loading a model, or starting a process,
# from a test without the mark fails at once with a message that says which mark it needs.

REAL_MODEL_FIXTURES = {"real_engine", "hf_engine"}
LOADS_A_MODEL = re.compile(
    r"\bEngine\.load\(|\bload_engine\(|\bLlama\(|\bllama_model_load_from_file\("
    r"|\bload_pretrained\(|\bChatService\(\s*\w+\s*(,\s*resume\w*=[^,()]*)?\)"
    r"|\b(real_engine|hf_engine)\b")
STARTS_A_PROCESS = re.compile(
    r"\bsubprocess\.|\bPopen\(|\bsys\.executable\b|\bmultiprocessing\b|\bmp\.spawn\(")
KINDS = {"real_model": LOADS_A_MODEL, "subprocess": STARTS_A_PROCESS}


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _names(code: types.CodeType) -> set[str]:
    """The global names a function (with its nested functions and lambdas) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


_VISITING: set[object] = set()
ROOT = Path(__file__).resolve().parent.parent
# Code followed into from a test: the tests' own modules and the benchmark scripts they load
# (not the project's packages: what a test does with those is what the test's code shows).
FOLLOWED = (str(ROOT / "tests") + "/", str(ROOT / "bench") + "/")


def _followed(obj: object) -> bool:
    if inspect.ismodule(obj):
        path = getattr(obj, "__file__", None) or ""
    else:
        code = getattr(obj, "__code__", None)
        path = code.co_filename if code is not None else ""
    return path.startswith(FOLLOWED)


@functools.cache
def _function_kinds(func: Callable[..., object]) -> frozenset[str]:
    """The kinds a function of the tests reaches: in its own code or a test helper it calls."""
    func = inspect.unwrap(func)
    if func in _VISITING:  # a helper that (indirectly) calls itself
        return frozenset()
    _VISITING.add(func)
    try:
        return _reached(func)
    finally:
        _VISITING.discard(func)


def _reached(func: Callable[..., object]) -> frozenset[str]:
    text = _source(func)
    kinds = {kind for kind, pattern in KINDS.items() if pattern.search(text)}
    code = getattr(func, "__code__", None)
    if code is None:
        return frozenset(kinds)
    for name in _names(code):
        helper = func.__globals__.get(name)
        if helper is func:
            continue
        if inspect.ismodule(helper):  # `from tests import test_x as x`: x.helper(...)
            if _followed(helper):
                for attr in _names(code):
                    member = getattr(helper, attr, None)
                    if inspect.isfunction(member):
                        kinds |= _function_kinds(member)
            continue
        if inspect.isclass(helper):  # a helper class of the tests: each of its methods
            if (helper.__module__ or "").startswith("tests"):  # a class's methods have no file
                for member in vars(helper).values():
                    if inspect.isfunction(member):
                        kinds |= _function_kinds(member)
            continue
        if inspect.isfunction(helper) and _followed(helper):
            kinds |= _function_kinds(helper)
    return frozenset(kinds)


@functools.cache
def _module_kinds(path: str) -> frozenset[str]:
    """The kinds a test module's top level reaches when imported (not inside a def or class)."""
    text = Path(path).read_text()
    top = [ast.get_source_segment(text, node) or "" for node in ast.parse(text).body
           if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                             | ast.Import | ast.ImportFrom)
           and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    return frozenset(kind for kind, pattern in KINDS.items()
                     if any(pattern.search(segment) for segment in top))


def item_kinds(item: pytest.Item) -> set[str]:
    kinds = set(_module_kinds(str(item.path)))
    if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        kinds.add("real_model")
    function = getattr(item, "function", None)
    if function is not None:
        kinds |= _function_kinds(function)
    info = getattr(item, "_fixtureinfo", None)
    for name in getattr(item, "fixturenames", ()):
        for fixturedef in (info.name2fixturedefs.get(name, ()) if info else ()):
            if (fixturedef.func.__module__ or "").startswith("tests"):
                kinds |= _function_kinds(fixturedef.func)
    return kinds


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for kind in sorted(item_kinds(item) - {m.name for m in item.iter_markers()}):
            item.add_marker(kind)


def _deselected(config: pytest.Config, mark: str) -> bool:
    """Whether the run's -m expression leaves out the tests that carry `mark` (and no other)."""
    expr = config.getoption("markexpr", "") or ""
    if not expr:
        return False
    from _pytest.mark.expression import Expression

    return not Expression.compile(expr).evaluate(lambda name, **kwargs: name == mark)


def _refuse(mark: str, what: str, item: pytest.Item) -> Callable[..., object]:
    def refused(*args: object, **kwargs: object) -> object:
        raise pytest.fail.Exception(
            f"{item.nodeid} {what} in a lane run with -m 'not {mark}', but is not marked "
            f"{mark}: teach the rules in tests/conftest.py to see it (or mark it "
            f"@pytest.mark.{mark})", pytrace=False)
    return refused


def _guard(item: pytest.Item, patch: pytest.MonkeyPatch) -> None:
    marks = {m.name for m in item.iter_markers()}
    if "real_model" not in marks and _deselected(item.config, "real_model"):
        loads = _refuse("real_model", "loads a model", item)
        patch.setattr("ccm_chat.engine.engine.open_backend", loads)
        for name in ("llama_model_load_from_file", "llama_load_model_from_file"):
            if hasattr(llama_cpp, name):
                patch.setattr(llama_cpp, name, loads)
        patch.setattr(llama_cpp.Llama, "__init__", loads)
        for module in ("ccm_chat.engine.hf_weights", "ccm_chat.engine.hf_backend"):
            if module in sys.modules and hasattr(sys.modules[module], "load_pretrained"):
                patch.setattr(sys.modules[module], "load_pretrained", loads)
    if "subprocess" not in marks and _deselected(item.config, "subprocess"):
        starts = _refuse("subprocess", "starts a process", item)
        patch.setattr(subprocess.Popen, "__init__", starts)
        patch.setattr(multiprocessing.process.BaseProcess, "start", starts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """The guard spans the whole test, session fixtures set up for it included."""
    with pytest.MonkeyPatch.context() as patch:
        _guard(item, patch)
        yield

"""A pretraining corpus every machine already has: the docstrings of the installed Python standard library.

The demo model must train offline, so its text comes from the interpreter itself. Sources are parsed with `ast`
(nothing imported or executed); each module, class and function docstring becomes one document: a header naming
the object and its signature (``json.dumps(obj, *, skipkeys=False, ...)``), a blank line, the cleaned docstring.
Source docstrings are only ~1.5 MB and the most asked-about objects (`len`, `str.split`, `math.sqrt`) live in C,
so a fixed list of compiled modules (built in or `.so`: importing them runs no Python code) is introspected too,
plus the language-reference topics of `pydoc_data`. Sorted order and a name-hash held-out split make runs
reproducible. Lines are {"text", "name", "kind"}: trainers read "text"; chat-data templating uses the rest.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import inspect
import json
import os
import re
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Directories that hold tests, tools, vendored or platform files rather than library documentation.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                       "dist-packages", "__pycache__", "lib-dynload", "encodings", "distutils", "pydoc_data",
                       "__phello__", "msilib"})
# Pure-Python twins of C modules hold the documentation of the public name; os.path is posixpath here, plus the
# functions posixpath star-imports from genericpath. Earlier entries win where names collide.
ALIASES = {"_pydecimal": "decimal", "_pyio": "io", "_collections_abc": "collections.abc", "posixpath": "os.path",
           "genericpath": "os.path"}
# Compiled modules -> the public name their objects are used under ("" for builtins: `len`, `str.split`).
COMPILED = {"builtins": "", "posix": "os", **{m: m for m in (
    "sys", "math", "cmath", "itertools", "time", "gc", "marshal", "atexit", "faulthandler", "pwd", "grp", "array",
    "binascii", "zlib", "select", "mmap", "unicodedata", "fcntl", "resource")}, **{f"_{m}": m for m in (
    "collections", "functools", "operator", "io", "heapq", "bisect", "random", "datetime", "struct", "socket", "csv",
    "sqlite3", "signal", "contextvars", "codecs", "tracemalloc", "json", "pickle")}}
_DOC_SIGNATURE = re.compile(r"^[A-Za-z_][\w.]*\(.*\)")
HELDOUT_MOD = 50  # a document is held out when crc32(name) % 50 == 0 (2 %)
MIN_DOC_CHARS = 16


def heldout_path(path: str | Path) -> Path:
    """`x/corpus.jsonl` -> `x/corpus.heldout.jsonl` (the sibling file holding the held-out split)."""
    p = Path(path)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(stem + ".heldout.jsonl")


def is_heldout(name: str) -> bool:
    """The fixed split: independent of corpus size, so capped and full runs agree on it."""
    return zlib.crc32(name.encode("utf-8")) % HELDOUT_MOD == 0


def stdlib_modules(root: str | Path | None = None) -> list[tuple[str, int, Path]]:
    """(module name, priority, source path) of the documentable stdlib sources; aliases have priority > 0."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, int, Path]] = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for fname in sorted(filenames):
            if not fname.endswith(".py"):
                continue
            path = Path(dirpath) / fname
            parts = list(path.relative_to(base).with_suffix("").parts)
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            alias = ALIASES.get(".".join(parts))
            if not parts or not all(p.isidentifier() for p in parts) or (
                    alias is None and any(p.startswith("_") for p in parts)):
                continue  # the root, scripts with dashes, private modules and __main__ scripts
            found.append((alias or ".".join(parts), 1 + list(ALIASES).index(".".join(parts)) if alias else 0, path))
    return sorted(found, key=lambda t: (t[0], t[1], str(t[2])))


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, drop_first: bool = False) -> str:
    """`(a, b=1, *args, **kw) -> str` from the AST; `drop_first` removes `self` (class and bound signatures)."""
    args = fn.args
    if drop_first and (args.posonlyargs or args.args):
        pos, regular = (args.posonlyargs[1:], args.args) if args.posonlyargs else ([], args.args[1:])
        n = len(pos) + len(regular)
        args = ast.arguments(posonlyargs=pos, args=regular, vararg=args.vararg, kwonlyargs=args.kwonlyargs,
                             kw_defaults=args.kw_defaults, kwarg=args.kwarg, defaults=args.defaults[-n:] if n else [])
    text = f"({ast.unparse(args)})"
    if fn.returns is not None and fn.name != "__init__":
        text += f" -> {ast.unparse(fn.returns)}"
    return text


def _doc(node: ast.AST | None) -> str:
    """The cleaned docstring of a module, class or function node ("" when it has none)."""
    return (ast.get_docstring(node, clean=True) or "").strip() if node is not None else ""


def _body_defs(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Definitions in a body, looking into `if` / `try` blocks (platform and fallback definitions)."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node
        elif isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, *(h.body for h in getattr(node, "handlers", [])), node.orelse,
                          getattr(node, "finalbody", [])):
                yield from _body_defs(block)


def module_documents(module: str, tree: ast.Module) -> Iterator[dict]:
    """Documents ({"name", "kind", "text"}) for one parsed module: itself, its public classes, functions, methods."""
    doc = _doc(tree)
    if len(doc) >= MIN_DOC_CHARS:
        yield {"name": module, "kind": "module", "text": f"module {module}\n\n{doc}"}

    def walk(body: list[ast.stmt], prefix: str, in_class: bool) -> Iterator[dict]:
        for node in _body_defs(body):
            if node.name.startswith("_"):
                continue
            qual = f"{prefix}.{node.name}"
            if isinstance(node, ast.ClassDef):
                init = next((n for n in _body_defs(node.body)
                             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "__init__"), None)
                sig = _signature(init, drop_first=True) if init is not None else ""
                doc, init_doc = _doc(node), _doc(init)
                if init_doc and init_doc not in doc:
                    doc = f"{doc}\n\n{init_doc}".strip()
                if len(doc) >= MIN_DOC_CHARS:
                    yield {"name": qual, "kind": "class", "text": f"class {qual}{sig}\n\n{doc}"}
                yield from walk(node.body, qual, True)
            else:
                doc = _doc(node)
                if len(doc) < MIN_DOC_CHARS:
                    continue
                decorators = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
                prop = bool(decorators & {"property", "cached_property", "functools.cached_property"})
                header = f"{qual} (property)" if prop else (
                    ("async " if isinstance(node, ast.AsyncFunctionDef) else "") + qual + _signature(node))
                kind = "property" if prop else "method" if in_class else "function"
                yield {"name": qual, "kind": kind, "text": f"{header}\n\n{doc}"}

    yield from walk(tree.body, module, False)
    yield from _bound_functions(module, tree)


def _bound_functions(module: str, tree: ast.Module) -> Iterator[dict]:
    """Module functions that are methods of a hidden instance (random: `_inst = Random()`, `choice = _inst.choice`)."""
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    instances = {t.id: classes[n.value.func.id] for n in tree.body if isinstance(n, ast.Assign)
                 and isinstance(n.value, ast.Call) and getattr(n.value.func, "id", None) in classes
                 for t in n.targets if isinstance(t, ast.Name)}
    for node in tree.body:
        bound = getattr(node, "value", None)
        if not (isinstance(node, ast.Assign) and isinstance(bound, ast.Attribute)
                and getattr(bound.value, "id", None) in instances):
            continue
        fn = next((n for n in _body_defs(instances[bound.value.id].body) if n.name == bound.attr), None)
        doc = _doc(fn) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else ""
        for name in (t.id for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_")):
            if len(doc) >= MIN_DOC_CHARS:
                qual = f"{module}.{name}"
                yield {"name": qual, "kind": "function", "text": f"{qual}{_signature(fn, drop_first=True)}\n\n{doc}"}


def parse_source(path: Path) -> ast.Module | None:
    """Parse a source file (PEP 263 encodings honoured); None when it is not valid Python for this interpreter."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old sources
            return ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None


def _compiled_module(name: str) -> Any | None:
    """Import `name` only when it is built in or a C extension (so no Python code runs); None when absent."""
    if name not in sys.builtin_module_names:
        spec = importlib.util.find_spec(name)  # top-level names: None when absent
        if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
            return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _introspected(qual: str, obj: Any, kind: str) -> dict | None:
    """A document from a live object's `__doc__`; the signature from `inspect` or the docstring's first line."""
    raw = getattr(obj, "__doc__", None)
    doc = inspect.cleandoc(raw).strip() if isinstance(raw, str) else ""
    header = ("class " if kind == "class" else "") + qual
    if kind == "property":
        header += " (property)"
    else:
        try:
            header += str(inspect.signature(obj))
        except (TypeError, ValueError):
            first, _, rest = doc.partition("\n")
            short = qual.rsplit(".", 1)[-1]
            if _DOC_SIGNATURE.match(first) and first.split("(", 1)[0].rsplit(".", 1)[-1] == short:
                header += first[first.index("("):].strip()
                doc = rest.lstrip("\n")
                while doc.startswith(short + "("):  # further signature lines, e.g. range(start, stop[, step])
                    doc = doc.partition("\n")[2].lstrip("\n")
    if len(doc) < MIN_DOC_CHARS:
        return None
    return {"name": qual, "kind": kind, "text": f"{header}\n\n{doc}"}


def compiled_documents(cname: str, public: str) -> Iterator[dict]:
    """Documents of one compiled module's public functions, classes and their methods (names sorted)."""
    if (mod := _compiled_module(cname)) is None:
        return
    if public and isinstance(mod.__doc__, str) and len(mod.__doc__) >= MIN_DOC_CHARS:
        yield {"name": public, "kind": "module", "text": f"module {public}\n\n{inspect.cleandoc(mod.__doc__)}"}
    prefix = f"{public}." if public else ""
    for name in sorted(vars(mod)):
        obj = vars(mod)[name]
        if name.startswith("_") or (public and getattr(obj, "__module__", None) not in (cname, public)):
            continue  # private, or re-exported from elsewhere (builtins keep all: `open` is io.open)
        if isinstance(obj, type):
            if (doc := _introspected(prefix + name, obj, "class")) is not None:
                yield doc
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if attr.startswith("_"):
                    continue
                kind = "property" if inspect.isgetsetdescriptor(member) or isinstance(member, property) else "method"
                if kind == "method" and not callable(member) and not isinstance(member, (classmethod, staticmethod)):
                    continue
                if (doc := _introspected(f"{prefix}{name}.{attr}", member, kind)) is not None:
                    yield doc
        elif callable(obj) and (doc := _introspected(prefix + name, obj, "function")) is not None:
            yield doc


def topic_documents(root: str | Path | None = None) -> Iterator[dict]:
    """The language-reference topics of `pydoc_data/topics.py` (`help("assert")`), read as a literal."""
    path = Path(root or sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    tree = parse_source(path) if path.is_file() else None
    for node in tree.body if tree is not None else []:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            for key in sorted(topics):
                title, _, body = topics[key].strip().partition("\n")
                body = re.sub(r"^\*+\n", "", body.lstrip("\n")).strip()
                if len(body) >= MIN_DOC_CHARS:
                    yield {"name": f"topic:{key}", "kind": "topic", "text": f"{title.strip()}\n\n{body}"}


def iter_documents(root: str | Path | None = None) -> Iterator[dict]:
    """Every document in deterministic order, each name once: per module, its source first, then compiled code;
    the reference topics last."""
    sources: list[tuple[str, int, Any]] = list(stdlib_modules(root))
    sources += [(public or "builtins", len(ALIASES) + 1, cname) for cname, public in COMPILED.items()]
    seen: set[str] = set()

    def new(docs: Iterator[dict]) -> Iterator[dict]:
        for doc in docs:
            if doc["name"] not in seen:
                seen.add(doc["name"])
                yield doc

    for module, _, ref in sorted(sources, key=lambda t: (t[0], t[1], str(t[2]))):
        if isinstance(ref, str):  # a compiled module, after the sources of the same name
            yield from new(compiled_documents(ref, COMPILED[ref]))
        elif (tree := parse_source(ref)) is not None:
            yield from new(module_documents(module, tree))
    yield from new(topic_documents(root))


def build_corpus(out_path: str | Path, max_chars: int | None = None, root: str | Path | None = None) -> dict:
    """Write the train corpus to `out_path` and the held-out split beside it (see `heldout_path`); return stats.
    `max_chars` caps the total text (train + held-out): the walk stops before the first document that would pass it."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    held = heldout_path(out)
    stats = {"documents": 0, "chars": 0, "heldout_documents": 0, "heldout_chars": 0,
             "path": str(out), "heldout_path": str(held)}
    total = 0
    with out.open("w", encoding="utf-8") as f_train, held.open("w", encoding="utf-8") as f_held:
        for doc in iter_documents(root):
            n = len(doc["text"])
            if max_chars is not None and total + n > max_chars:
                break
            total += n
            line = json.dumps({"text": doc["text"], "name": doc["name"], "kind": doc["kind"]}, ensure_ascii=False)
            split = "heldout_" if is_heldout(doc["name"]) else ""
            (f_held if split else f_train).write(line + "\n")
            stats[split + "documents"] += 1
            stats[split + "chars"] += n
    return stats


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Lines of a jsonl file as dicts (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)

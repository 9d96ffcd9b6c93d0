#!/usr/bin/env python3
"""The crate's module graph is a DAG that follows its layers.

Reads every `src/**/*.rs` file (test code excluded: `tests.rs` files and `#[cfg(test)] mod`
blocks), finds each reference to another top-level module (`use crate::a::..`, nested `use
crate::{a, b::c}` groups, and `crate::a::x` paths in code), resolves names re-exported at the
crate root (`crate::Error` is `error`'s) through `src/lib.rs`, and fails when

* a module depends on one in a higher layer (`LAYERS` below), or
* the top-level modules depend on one another in a cycle, even within one layer.

Usage: .ci/module_graph.py [--dot]   (--dot prints the graph in Graphviz form).
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Lowest first. A module may use modules of its own layer (without a cycle) and of lower ones.
LAYERS = [
    ["sync"],
    ["error", "endpoint", "histogram", "config", "stats", "handoff", "breaker", "events"],
    ["table"],
    ["pick", "affinity"],
    ["control"],
    # `tls` (feature `tls`): the TLS settings of a service, used by health checks (same layer)
    # and by the pools, gRPC, discovery and export above.
    ["registry", "health", "failover", "rebalance", "tls"],
    ["balancer", "grpc", "discovery", "export", "pool", "docs"],
]
# Test and fuzz/loom plumbing: not part of the product's graph.
IGNORED = {"lib", "loom_hooks"}


def layer_of(module):
    for rank, layer in enumerate(LAYERS):
        if module in layer:
            return rank
    return None


def module_of(path):
    rel = os.path.relpath(path, SRC)
    return rel.split(os.sep)[0].removesuffix(".rs")


def strip_tests(text):
    """Drops `#[cfg(test)]`-gated module blocks (brace-matched) and comments."""
    out = []
    i = 0
    gate = re.compile(r"#\[cfg\((?:all\()?test\b[^\]]*\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{")
    while True:
        m = gate.search(text, i)
        if not m:
            out.append(text[i:])
            break
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    code = "".join(out)
    code = re.sub(r"//[^\n]*", "", code)
    return code


def root_exports():
    """Names re-exported at the crate root, mapped to the module that provides them."""
    text = open(os.path.join(SRC, "lib.rs")).read()
    names = {}
    for m in re.finditer(r"pub use (\w+)::(\{[^;]*\}|[^;]+);", text):
        module, items = m.group(1), m.group(2)
        for name in re.findall(r"(\w+)\s*(?:,|\}|$)", items.strip("{}") + ","):
            names[name] = module
    return names


def use_paths(code):
    """Every `crate::...` path in `code`, nested `use` groups expanded (first two segments)."""
    paths = []
    for m in re.finditer(r"\bcrate::", code):
        rest = code[m.end() :]
        if rest.startswith("{"):
            depth, j = 1, 1
            while depth and j < len(rest):
                depth += {"{": 1, "}": -1}.get(rest[j], 0)
                j += 1
            group = rest[1 : j - 1]
            # Top-level items of the group: split on commas at depth 0.
            items, depth, cur = [], 0, ""
            for ch in group:
                if ch in "{":
                    depth += 1
                elif ch in "}":
                    depth -= 1
                if ch == "," and depth == 0:
                    items.append(cur)
                    cur = ""
                else:
                    cur += ch
            items.append(cur)
            for item in items:
                item = item.strip()
                if item:
                    paths.append(re.split(r"::|\s", item)[0])
        else:
            seg = re.match(r"(\w+)", rest)
            if seg:
                paths.append(seg.group(1))
    return paths


def graph():
    exports = root_exports()
    modules = {module_of(os.path.join(SRC, f)) for f in os.listdir(SRC) if f.endswith(".rs") or os.path.isdir(os.path.join(SRC, f))}
    modules -= IGNORED
    edges = {}
    for dirpath, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs") or f == "tests.rs":
                continue
            path = os.path.join(dirpath, f)
            src = module_of(path)
            if src in IGNORED:
                continue
            code = strip_tests(open(path).read())
            for first in use_paths(code):
                target = first if first in modules else exports.get(first)
                if target is None or target == src or target in IGNORED:
                    continue
                edges.setdefault(src, {}).setdefault(target, set()).add(os.path.relpath(path, SRC))
    return modules, edges


def find_cycle(modules, edges):
    color = {m: 0 for m in modules}
    stack = []

    def visit(m):
        color[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, {})):
            if color.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if color.get(n) == 0:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[m] = 2
        return None

    for m in sorted(modules):
        if color[m] == 0:
            found = visit(m)
            if found:
                return found
    return None


def main():
    modules, edges = graph()
    if "--dot" in sys.argv:
        print("digraph modules {")
        for src in sorted(edges):
            for dst in sorted(edges[src]):
                print(f'  "{src}" -> "{dst}";')
        print("}")
        return 0
    problems = []
    for m in sorted(modules):
        if layer_of(m) is None:
            problems.append(f"module `{m}` has no layer in .ci/module_graph.py's LAYERS")
    for src in sorted(edges):
        for dst, files in sorted(edges[src].items()):
            ls, ld = layer_of(src), layer_of(dst)
            if ls is not None and ld is not None and ld > ls:
                problems.append(
                    f"`{src}` (layer {ls}) uses `{dst}` (layer {ld}, above it) in {', '.join(sorted(files))}"
                )
    cycle = find_cycle(modules, edges)
    if cycle:
        steps = []
        for a, b in zip(cycle, cycle[1:]):
            steps.append(f"{a} -> {b} ({', '.join(sorted(edges[a][b]))})")
        problems.append("cycle: " + "; ".join(steps))
    if problems:
        for p in problems:
            print("error:", p, file=sys.stderr)
        return 1
    n = sum(len(d) for d in edges.values())
    print(f"module graph: {len(modules)} modules, {n} edges, acyclic, every edge points down the layers")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The docs hold together: what they link, what the code cites, what the man
pages cover.

    check_docs.py links SOURCE_ROOT
        Every relative link in README.md, SECURITY.md and docs/*.md names a file
        that exists and, after '#', a heading in it. Every citation in the code,
        scripts and docs -- `docs/F.md "Heading"`, `docs/F.md §N`, `README
        "Heading"` -- names a file and a heading that exist. Every source path
        named (fs/..., vault/..., hsm/..., policy/..., tests/..., scripts/...)
        exists.

    check_docs.py man SOURCE_ROOT VAULTFS_BINARY
        Every subcommand the binary offers (walked through --help) has its entry
        in docs/man/vaultfs.8 (a `.B vaultfs SUB...` line), and every long option
        is there; every key vault/state/config.cpp parses is in
        docs/man/vaultfs.conf.5; `man --warnings` renders each page silently.

Prints every problem found (file:line: what) and exits 1 if there was one.
"""
import functools
import os
import re
import subprocess
import sys

problems = []


def problem(where, what):
    problems.append(f"{where}: {what}")


def tracked_files(root):
    out = subprocess.run(["git", "-C", root, "ls-files"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout:
        return [f for f in out.stdout.split("\n") if f]
    # Not a git checkout (an unpacked tarball): every file under the root.
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith((".", "build"))]
        found += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return found


def slug(heading):
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def headings(path):
    """The headings of a Markdown file, outside code blocks (read once)."""
    found, fence = [], False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("```"):
                fence = not fence
            elif not fence and re.match(r"#{1,6} ", line):
                found.append(line.lstrip("#").strip())
    return tuple(found)


@functools.lru_cache(maxsize=None)
def anchors(path):
    seen, result = {}, set()
    for h in headings(path):
        a = slug(h)
        n = seen.get(a, 0)
        seen[a] = n + 1
        result.add(a if n == 0 else f"{a}-{n}")
    return result


def plain(text):
    """A heading or a citation without Markdown's backquotes and emphasis."""
    return re.sub(r"[`*]", "", re.sub(r"\s+", " ", text)).strip()


def check_links(root):
    files = tracked_files(root)
    docs = [f for f in files if f.endswith(".md") and (f.startswith("docs/") or "/" not in f)]
    for doc in docs:
        base = os.path.dirname(doc)
        fence = False
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.startswith("```"):
                    fence = not fence
                    continue
                if fence:
                    continue
                for target in re.findall(r"\]\(([^)\s]+)\)", line):
                    if re.match(r"[a-z]+:", target):
                        continue  # http:, https:, mailto:
                    path, _, anchor = target.partition("#")
                    full = os.path.normpath(os.path.join(root, base, path)) if path else os.path.join(root, doc)
                    if not os.path.exists(full):
                        problem(f"{doc}:{n}", f"link to {target}: no such file")
                    elif anchor and full.endswith(".md") and anchor not in anchors(full):
                        problem(f"{doc}:{n}", f"link to {target}: no heading with that anchor")

    # Citations in code, scripts and docs.
    cited = re.compile(r'(?<![\w/])(README|SECURITY|docs/[\w\-/]+\.md)\s*(?:(?://|#)\s*)?(?:"([^"]+)"|§(\d+))', re.S)
    source_path = re.compile(r"(?<![\w./\-])((?:fs|vault|hsm|policy|tests|scripts)/[\w\-/]*\w\.(?:hpp|cpp|py|md))\b")
    for f in files:
        if not re.search(r"\.(cpp|hpp|md|py|build|service)$|^scripts/", f) or f.startswith(("tests/fuzz/corpus", "tests/docs/")):
            continue
        try:
            text = open(os.path.join(root, f), encoding="utf-8").read()
        except (UnicodeDecodeError, IsADirectoryError):
            continue
        for m in cited.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            doc = m.group(1)
            doc = doc + ".md" if doc in ("README", "SECURITY") else doc
            full = os.path.join(root, doc)
            if not os.path.exists(full):
                problem(f"{f}:{line}", f"cites {doc}, which does not exist")
                continue
            titles = [plain(h) for h in headings(full)]
            if m.group(2) is not None:
                # A comment may break a citation over lines: `// ` continues it.
                want = plain(re.sub(r"\s*\n\s*(?://|#)?\s*", " ", m.group(2)))
                if want not in titles:
                    problem(f"{f}:{line}", f'cites {doc} "{want}", which has no such heading')
            elif not any(t.startswith(m.group(3) + ". ") for t in titles):
                problem(f"{f}:{line}", f"cites {doc} §{m.group(3)}, which has no section {m.group(3)}")
        for m in source_path.finditer(text):
            if not os.path.exists(os.path.join(root, m.group(1))):
                line = text.count("\n", 0, m.start()) + 1
                problem(f"{f}:{line}", f"names {m.group(1)}, which does not exist")


def help_of(binary, path):
    out = subprocess.run([binary, *path, "--help"], capture_output=True, text=True)
    if out.returncode != 0:
        problem(" ".join(["vaultfs", *path]), f"--help failed: {out.stderr.strip()}")
        return "", []
    subs, options, section = [], [], None
    for line in out.stdout.split("\n"):
        if line.endswith(":") and not line.startswith(" "):
            section = line[:-1]
            continue
        if section == "Subcommands" and re.match(r"  \S", line):
            subs.append(line.split()[0])
        for opt in re.findall(r"(?<![\w-])--([a-z][\w-]*)", line if section == "Options" else ""):
            options.append(opt)
    return subs, options


def check_man(root, binary):
    page = os.path.join(root, "docs/man/vaultfs.8")
    conf = os.path.join(root, "docs/man/vaultfs.conf.5")
    policy = os.path.join(root, "docs/man/vaultfs-policy.5")
    for p in (page, conf, policy):
        if not os.path.exists(p):
            problem(p, "missing")
    if problems:
        return
    text = open(page, encoding="utf-8").read()
    entries = {line[len(".B vaultfs "):].strip() for line in text.split("\n") if line.startswith(".B vaultfs ")}
    options_in_page = set(re.findall(r"\\-\\-([a-z][\w\-\\]*)", text))
    options_in_page = {o.replace("\\-", "-").replace("\\", "") for o in options_in_page}

    # Walk the command tree. `takeover` is hidden from --help (a supervisor
    # starts it, never a person) but documented all the same.
    todo, commands = [[]], []
    while todo:
        path = todo.pop()
        subs, options = help_of(binary, path)
        for o in options:
            if o not in ("help", "version") and o not in options_in_page:
                problem("docs/man/vaultfs.8", f"option --{o} of `vaultfs {' '.join(path)}` is not described")
        if path and not subs:
            commands.append(" ".join(path))
        todo += [path + [s] for s in subs]
    for c in sorted(commands + ["takeover"]):
        if c not in entries:
            problem("docs/man/vaultfs.8", f"no entry for `vaultfs {c}` (a line `.B vaultfs {c}`)")

    source = open(os.path.join(root, "vault/state/config.cpp"), encoding="utf-8").read()
    keys = set(re.findall(r'key == "([a-z_0-9]+)"', source))
    if re.search(r'key\.substr\(0, \d+\) == "module_env\."', source):
        keys.add("module_env.")
    if len(keys) < 10:
        problem("vault/state/config.cpp", f"found only {len(keys)} config keys: has the parser changed shape?")
    conf_text = open(conf, encoding="utf-8").read().replace("\\_", "_").replace("\\&", "")
    for k in sorted(keys):
        if not re.search(r"(?<![\w.])" + re.escape(k) + (r"" if k.endswith(".") else r"(?![\w])"), conf_text):
            problem("docs/man/vaultfs.conf.5", f"config key {k} is not described")

    for p in (page, conf, policy):
        out = subprocess.run(["man", "--warnings", "-l", p], capture_output=True, text=True,
                             env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_FORMATTING": "0"})
        if out.returncode != 0 or out.stderr.strip():
            problem(p, f"man --warnings: {out.stderr.strip() or 'exit ' + str(out.returncode)}")
        elif len(out.stdout) < 1000:
            problem(p, "renders to almost nothing")


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("links", "man") or (sys.argv[1] == "man" and len(sys.argv) != 4):
        print(__doc__, file=sys.stderr)
        return 2
    root = sys.argv[2]
    if sys.argv[1] == "links":
        check_links(root)
    else:
        check_man(root, sys.argv[3])
    for p in problems:
        print(p)
    print(f"check_docs {sys.argv[1]}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

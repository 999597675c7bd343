"""Every distinct contract violation the fuzz suite finds, deduplicated (the tests stop at a test's first).

    .venv/bin/python -m tests.fuzz.survey [PROFILE] [pytest args...]

runs tests/fuzz under the hypothesis profile PROFILE (default fuzz-ci) with `FUZZ_COLLECT` set: each case's
outcome is recorded instead of failing, then this prints the exit codes per subcommand and, per kind of
violation, how often it happened and its shortest reproduction.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile


def main(argv: list[str]) -> int:
    import pytest

    profile = argv[0] if argv and argv[0].startswith("fuzz-") else "fuzz-ci"
    extra = argv[1:] if argv and argv[0].startswith("fuzz-") else argv
    with tempfile.NamedTemporaryFile(prefix="fuzz-survey-", suffix=".jsonl", delete=False) as handle:
        path = handle.name
    os.environ.update(FUZZ_COLLECT=path, HYPOTHESIS_PROFILE=profile)
    pytest.main(["-q", "-p", "no:cacheprovider", "tests/fuzz", *extra])
    with open(path, encoding="utf-8") as handle:
        entries = [json.loads(line) for line in handle]
    codes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    kinds: dict[str, list[dict]] = collections.defaultdict(list)
    for entry in entries:
        codes[entry["sub"]][entry["code"]] += 1
        if entry["kind"]:
            kinds[entry["kind"]].append(entry)
    print(f"\n{len(entries)} cases; exit codes per subcommand:")
    for sub, counter in sorted(codes.items()):
        print(f"  {sub}: {dict(counter)}")
    print(f"\n{len(kinds)} distinct violations:")
    for kind, hits in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        shortest = min(hits, key=lambda e: len(json.dumps(e["argv"])) + len(json.dumps(e["files"])))
        tests = sorted({e["test"].split("::")[-1] for e in hits})
        print(f"\n== {kind}  [{len(hits)} case(s); {', '.join(tests)}]")
        print(f"   argv: {shortest['argv']}")
        if shortest["files"]:
            print(f"   files: {json.dumps(shortest['files'])[:800]}")
        print("   " + "\n   ".join((shortest["detail"] or "").splitlines()[-6:]))
    print(f"\n(raw outcomes: {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

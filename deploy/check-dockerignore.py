#!/usr/bin/env python3
"""Lists the docker build context the way `docker build` filters it with
.dockerignore (patterns without `!`: a path is out when it or one of its
parent directories matches), then checks that the heavy directories are out
and every file the Dockerfile's `cargo build` needs is in. Run from the repo
root; exit 1 with the reason otherwise."""
import fnmatch
import os
import sys

patterns = []
for line in open(".dockerignore"):
    line = line.strip()
    if line and not line.startswith("#"):
        if line.startswith("!"):
            sys.exit(".dockerignore: `!` exceptions are not modelled by this check")
        patterns.append(line.rstrip("/").lstrip("/"))


def ignored(path):
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        for p in patterns:
            if fnmatch.fnmatchcase(prefix, p) or (
                p.startswith("**/") and fnmatch.fnmatchcase(prefix, p[3:])
            ):
                return True
    return False


# Everything the build stage reads: the manifest and lock, the sources, every
# target the manifest names (cargo refuses the manifest without them), and the
# config the runtime stage copies.
need = ["Cargo.toml", "Cargo.lock", "sluice.example.toml", "src/main.rs", "src/lib.rs"]
for line in open("Cargo.toml"):
    line = line.strip()
    if line.startswith("path = "):
        need.append(line.split("=", 1)[1].strip().strip('"'))
for name in os.listdir("benches"):
    if name.endswith(".rs"):
        need.append("benches/" + name)
must_be_out = ["target/debug/sluice", "fuzz/Cargo.toml", "fuzz/fuzz_targets", ".git/HEAD"]
bad = [p for p in need if ignored(p)]
bad += [p + " (must be ignored)" for p in must_be_out if not ignored(p)]
if bad:
    sys.exit(".dockerignore: wrong for " + ", ".join(bad))
print(f".dockerignore: {len(need)} build inputs in the context; target/, fuzz/, .git/ out")

#!/usr/bin/env bash
# Run the transformers-dependent tests (tests/compat_tests.txt) on other transformers releases.
#
#   bash scripts/compat.sh 5.0.0 5.24.0             what CI runs: oldest supported, newest tested
#   bash scripts/compat.sh 5.25.0rc0                an upcoming release (outside the declared
#                                                   range: a warning, tested anyway)
#   bash scripts/compat.sh --with peft==0.18.0 5.0.0   also replace other pins of the lock
#   bash scripts/compat.sh --without torchao 5.0.0     leave a locked package out (its tests skip)
#   bash scripts/compat.sh --fresh 5.0.0            rebuild the environment even if it is current
#   bash scripts/compat.sh 5.0.0 -- -k peft         arguments after -- go to pytest
#
# Each version gets a throwaway virtual environment .venv-compat/<version> (git-ignored): torch
# 2.13.0 first, then transformers at that version and everything else at the lock's versions
# (constraints.txt; a locked version that this transformers excludes, such as huggingface_hub
# 2.x for transformers 5.0.0, is resolved within transformers' range instead), then opendelta
# itself, editable. An environment built from the same lock, [project] table of
# pyproject.toml and options is reused. Prints each version's pytest summary; exits non-zero if any version fails.
# PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIST=tests/compat_tests.txt
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

fresh=0; overrides=(); removals=(); versions=(); pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; pytest_args=("$@"); break ;;
        --fresh) fresh=1 ;;
        --with) [ $# -ge 2 ] || usage; overrides+=("$2"); shift ;;
        --without) [ $# -ge 2 ] || usage; removals+=("$2"); shift ;;
        -h|--help) usage ;;
        -*) echo "compat.sh: unknown option $1" >&2; usage ;;
        *) [[ "$1" =~ ^[0-9]+(\.[0-9]+)*((a|b|rc)[0-9]+)?(\.post[0-9]+)?(\.dev[0-9]+)?$ ]] \
               || { echo "compat.sh: '$1' is not a transformers release version (e.g. 5.0.0)" >&2; exit 2; }
           versions+=("$1") ;;
    esac
    shift
done
[ ${#versions[@]} -gt 0 ] || usage

tests=()
while read -r line; do
    line=${line%%#*}; line=${line//[[:space:]]/}
    [ -n "$line" ] || continue
    if [ -f "$line" ]; then tests+=("$line"); else echo "compat.sh: $line (in $LIST) does not exist; skipped"; fi
done < "$LIST"
[ ${#tests[@]} -gt 0 ] || { echo "compat.sh: no test file of $LIST exists" >&2; exit 2; }

# Build .venv-compat/$1 unless an environment with the same stamp is there.
build() {
    local version=$1 dir=.venv-compat/$1
    local stamp
    # pyproject.toml's [project] table only: a change to a tool's settings needs no rebuild.
    stamp=$({ cat constraints.txt scripts/compat_lock.py; sed -n '/^\[project/,/^\[tool/p' pyproject.toml; } \
            | sha256sum | cut -c1-16)
    stamp="$stamp $version ${overrides[*]:-} without ${removals[*]:-}"
    if [ $fresh = 0 ] && [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ]; then
        echo "reusing $dir (same lock, pyproject.toml [project] table and options)"
        return 0
    fi
    rm -rf "$dir" && "$PY" -m venv "$dir" || return 1
    local pip=("$dir/bin/python" -m pip install -q)
    # torch first, held to the lock (a CPU build); packaging for compat_lock.py.
    "${pip[@]}" -c constraints.txt "torch==2.13.0" packaging || return 1
    "${pip[@]}" --no-deps "transformers==$version" || return 1
    "$dir/bin/python" scripts/compat_lock.py derive constraints.txt "$dir/lock.txt" "${overrides[@]}" || return 1
    "${pip[@]}" -c "$dir/lock.txt" -r "$dir/lock.txt" "transformers==$version" || return 1
    if [ ${#removals[@]} -gt 0 ]; then
        "$dir/bin/python" -m pip uninstall -y -q "${removals[@]}" || return 1
    fi
    # Without its dependencies (all installed above), so a release outside the range
    # opendelta declares can still be tried.
    "${pip[@]}" --no-deps --no-build-isolation -e . || return 1
    echo "$stamp" > "$dir/.stamp"
}

results=(); failed=0
for version in "${versions[@]}"; do
    dir=.venv-compat/$version
    echo
    echo "===== compat: transformers $version ($dir) ====="
    start=$SECONDS
    if ! build "$version"; then
        results+=("transformers $version: SET-UP FAILED (see the pip output above)")
        failed=1
        continue
    fi
    "$dir/bin/python" scripts/compat_lock.py report constraints.txt
    setup_s=$((SECONDS - start)); start=$SECONDS
    "$dir/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" "${pytest_args[@]}" 2>&1 | tee "$dir/pytest.log"
    rc=${PIPESTATUS[0]}
    summary=$(grep -E '(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s' "$dir/pytest.log" | tail -n 1)
    summary=${summary:-no pytest summary (exit status $rc)}
    status=$([ "$rc" = 0 ] && echo ok || echo FAILED)
    [ "$rc" = 0 ] || failed=1
    line="transformers $version: $status: $summary (set-up ${setup_s}s, tests $((SECONDS - start))s)"
    echo "===== compat: $line ====="
    results+=("$line")
done

echo
echo "===== compat summary ($LIST: ${#tests[@]} files) ====="
printf '%s\n' "${results[@]}"
exit $failed

#!/usr/bin/env bash
# A/B inside one device call: copy this tree to /tmp/variants/NAME, apply one sed edit to one file there,
# build the extension in place (NVCC_APPEND_FLAGS from the environment reaches nvcc), and run a command in
# that copy (PYTHONPATH points at it, so `import tokenweave` is the variant's).
#   bash bench/debug/variant.sh NAME FILE SED_EXPR build
#   bash bench/debug/variant.sh NAME - - run python bench/emulated_world.py --out-dir /tmp/variants/NAME/results
# FILE "-" builds the tree unchanged (e.g. with NVCC_APPEND_FLAGS=-DTOKENWEAVE_PHASE_TIMERS). The sed edit
# must change exactly one line, or the variant is refused (a silent no-op would make the A/B meaningless).
set -u
name=$1 file=$2 expr=$3 what=$4; shift 4
dir=/tmp/variants/$name
if [ "$what" = build ]; then
  rm -rf "$dir" && mkdir -p "$dir" && cp -r setup.py csrc tokenweave bench "$dir"/
  if [ "$file" != - ]; then
    before=$(md5sum < "$dir/$file")
    sed -i "$expr" "$dir/$file"
    changed=$(diff "$file" "$dir/$file" | grep -c '^>')
    if [ "$(md5sum < "$dir/$file")" = "$before" ] || [ "$changed" != 1 ]; then
      echo "variant $name: the edit changed $changed lines of $file (want 1)"; exit 2
    fi
  fi
  (cd "$dir" && python setup.py build_ext --inplace > build.log 2>&1) || { tail -20 "$dir/build.log"; exit 1; }
  echo "variant $name: built"
else
  cd "$dir" && PYTHONPATH="$dir" "$@"
fi

